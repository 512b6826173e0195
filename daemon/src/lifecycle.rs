//! A daemon's life under systemd (`Type=notify`) or a terminal: READY once started, watchdog
//! pings while the event loop turns, and a clean stop on SIGTERM or Ctrl-C.
//!
//! ```no_run
//! # async fn demo() -> Result<(), zk0_daemon::Error> {
//! let mut life = zk0_daemon::Lifecycle::start()?;
//! loop {
//!     tokio::select! {
//!         stop = life.stopped() => { tracing::info!(?stop, "leaving"); break; }
//!         // … the daemon's own events …
//!     }
//! }
//! # Ok(()) }
//! ```

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::Error;

/// Why the daemon is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: how systemd (and `zk0-* stop`) stop a service.
    Terminated,
    /// SIGINT: Ctrl-C in a terminal.
    Interrupted,
}

/// Signal handlers and the watchdog timer of a running daemon.
pub struct Lifecycle {
    sigterm: Signal,
    sigint: Signal,
    watchdog: Option<tokio::time::Interval>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("watchdog", &self.watchdog.as_ref().map(|w| w.period()))
            .finish()
    }
}

impl Lifecycle {
    /// Installs the SIGTERM and SIGINT handlers, then tells systemd the daemon is ready.
    /// Call it from inside the tokio runtime, once the daemon can serve.
    pub fn start() -> Result<Self, Error> {
        let install = |kind, name| {
            signal(kind).map_err(|source| Error::Signal {
                signal: name,
                source,
            })
        };
        let life = Lifecycle {
            sigterm: install(SignalKind::terminate(), "SIGTERM")?,
            sigint: install(SignalKind::interrupt(), "SIGINT")?,
            watchdog: zk0_host::systemd::watchdog_interval().map(tokio::time::interval),
        };
        zk0_host::systemd::ready();
        Ok(life)
    }

    /// Resolves when a stop signal arrives, pinging the systemd watchdog meanwhile. Cancel-safe:
    /// use it as one branch of the event loop's `select!`, so a wedged loop stops pinging.
    pub async fn stopped(&mut self) -> Stop {
        loop {
            tokio::select! {
                _ = self.sigterm.recv() => return Stop::Terminated,
                _ = self.sigint.recv() => return Stop::Interrupted,
                _ = tick(&mut self.watchdog) => zk0_host::systemd::watchdog(),
            }
        }
    }
}

async fn tick(w: &mut Option<tokio::time::Interval>) {
    match w {
        Some(w) => {
            w.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sigterm_stops() {
        let mut life = Lifecycle::start().unwrap();
        // Raising SIGTERM at ourselves: the handler installed by `start` takes it, so the test
        // process is not killed.
        let pid = std::process::id();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        let stop = tokio::time::timeout(Duration::from_secs(10), life.stopped())
            .await
            .expect("SIGTERM seen");
        assert_eq!(stop, Stop::Terminated);
    }
}
