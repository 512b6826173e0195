//! The reference implementation this host was provisioned with, for interop tests and
//! benchmarks: LeRobot's venv python (`cargo xtask setup --lerobot` builds it, `cargo xtask
//! env` exports `ZK0_LEROBOT_PYTHON`).

use std::path::PathBuf;

/// LeRobot's venv python (`ZK0_LEROBOT_PYTHON`), or `None` with a note on stderr. Under `CI`
/// its absence panics: there a LeRobot comparison is never skipped.
pub fn lerobot_python() -> Option<PathBuf> {
    match std::env::var_os("ZK0_LEROBOT_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but ZK0_LEROBOT_PYTHON is not: run `eval \"$(cargo xtask env)\"` \
                 after `cargo xtask setup --lerobot`"
            );
            eprintln!(
                "SKIPPED (LeRobot half): ZK0_LEROBOT_PYTHON is unset (eval \"$(cargo xtask env)\" \
                 after `cargo xtask setup --lerobot`)"
            );
            None
        }
    }
}
