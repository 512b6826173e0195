//! Plumbing the trainer's benchmarks share (`mod common;` in each).

use std::process::Command;

use serde_json::Value;

/// Runs one side of a benchmark and returns its JSON report (the last JSON line on stdout).
pub fn run_json(mut cmd: Command, what: &str) -> Result<Value, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("{what}: no JSON report in {stdout}"))
}
