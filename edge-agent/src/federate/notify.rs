//! systemd integration (`Type=notify`): READY once started, watchdog pings while alive.
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
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    (std::env::var_os("NOTIFY_SOCKET").is_some()
        && sd_notify::watchdog_enabled(false, &mut usec)
        && usec > 0)
        .then(|| Duration::from_micros(usec / 2))
}

/// One watchdog ping. Sent from the event loop, so a wedged loop stops pinging and systemd
/// restarts the daemon.
pub fn watchdog() {
    if watchdog_interval().is_some() {
        let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
    }
}
