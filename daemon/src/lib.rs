//! Plumbing shared by zk0's two daemons (`zk0-aggregator`, `zk0-agent`), written once.
//!
//! Nothing here knows the federation protocol's rules; it is the I/O edge around them.
//!
//! | module | what |
//! |---|---|
//! | [`url`] | [`BrokerUrl`]: `mqtt[s]://host[:port]` parsed once |
//! | [`tls`] | the rustls (ring) client transport pinned to a CA file |
//! | [`mqtt`] | [`mqtt::connect`]: an `AsyncClient` plus a polling task that forwards into a *bounded* [`mqtt::Inbox`] of `Bytes` payloads, shedding (and counting) what does not fit |
//! | [`lifecycle`] | [`Lifecycle`]: systemd READY, watchdog pings, SIGTERM / Ctrl-C |
//! | [`fs`] | [`write_atomic`] with a stated [`Durability`], owner-only files |
//! | [`keys`] | ed25519 key files (the I/O half of `shared_proto::sign`) |
//! | [`crash_point`] | named steps where crash tests hold a daemon to `kill -9` it |
//!
//! Errors are one [`Error`] enum; binaries wrap it in `anyhow`. The crate links neither the
//! embedded broker (rumqttd) nor libtorch.

pub mod crash_point;
pub mod error;
pub mod fs;
pub mod keys;
pub mod lifecycle;
pub mod mqtt;
pub mod tls;
pub mod url;

pub use error::Error;
pub use fs::{write_atomic, write_private, Durability};
pub use lifecycle::{Lifecycle, Stop};
pub use url::BrokerUrl;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
