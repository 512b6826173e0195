//! systemd integration for both daemons (`Type=notify`): READY once started, watchdog pings
//! while alive.
//! Everything is a no-op when `NOTIFY_SOCKET` is unset (not under systemd).

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the daemon is up.
pub fn ready() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready]) {
            tracing::warn!(error = %e, "sd_notify READY failed");
        }
    }
}

/// Half the watchdog timeout systemd asked for, if it asked.
///
/// As sd_watchdog_enabled(3): `WATCHDOG_USEC` enables it, and `WATCHDOG_PID`, when set, must
/// name this process (so a child such as `zk0-train` that inherited the variables never pings).
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let usec: u64 = std::env::var("WATCHDOG_USEC")
        .ok()?
        .parse()
        .ok()
        .filter(|u| *u > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// One watchdog ping. Sent from the event loop, so a wedged loop stops pinging and systemd
/// restarts the daemon.
pub fn watchdog() {
    if watchdog_interval().is_some() {
        let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
    }
}
