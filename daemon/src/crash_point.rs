//! Named points where a crash test stops a daemon, so it can `kill -9` it there.
//!
//! A crash at an arbitrary instant is what a restart must repair, but a test that kills at a
//! random time mostly kills between the interesting steps. So the daemons name the steps that
//! matter (`aggregate`, `server_eval`, `outputs`, `checkpoint`, each of a round) and, when the
//! `ZK0_HOLD_AT` environment variable names one (`<point>` or `<point>:<round>`), stop there
//! for good after logging `holding at crash point …`: the test then sends SIGKILL, restarts
//! the daemon without the variable and checks what the restart made of the state on disk.
//! Nobody sets the variable in production; unset, a point costs one environment lookup.

/// The environment variable naming the point to hold at.
pub const ENV: &str = "ZK0_HOLD_AT";

/// Whether `ZK0_HOLD_AT` names `point` (for any round, or for `round`).
pub fn armed(point: &str, round: u64) -> bool {
    std::env::var(ENV).is_ok_and(|v| matches(&v, point, round))
}

fn matches(spec: &str, point: &str, round: u64) -> bool {
    match spec.split_once(':') {
        Some((p, r)) => p == point && r.parse() == Ok(round),
        None => spec == point,
    }
}

/// Blocks this thread for good when the point is armed (a blocking thread: aggregation,
/// output writing).
pub fn hold(point: &str, round: u64) {
    if armed(point, round) {
        tracing::warn!(
            point,
            round,
            "holding at crash point ({ENV}); waiting to be killed"
        );
        loop {
            std::thread::park();
        }
    }
}

/// [`hold`] for async code: the task never resumes when the point is armed.
pub async fn hold_async(point: &str, round: u64) {
    if armed(point, round) {
        tracing::warn!(
            point,
            round,
            "holding at crash point ({ENV}); waiting to be killed"
        );
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn a_point_matches_by_name_and_optional_round() {
        assert!(matches("outputs", "outputs", 3));
        assert!(matches("outputs:3", "outputs", 3));
        assert!(!matches("outputs:2", "outputs", 3));
        assert!(!matches("outputs:x", "outputs", 3));
        assert!(!matches("checkpoint", "outputs", 3));
        assert!(!matches("", "outputs", 3));
    }
}
