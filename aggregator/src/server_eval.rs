//! Server-side evaluation: `zk0-train eval` as a child process on a held-out dataset.
//!
//! The aggregator never links libtorch; the worker applies the global trainable tensors to the
//! base LeRobot checkpoint and reports the policy (flow-matching) loss as JSON. A failure or a
//! timeout is an error for the caller to log and count; it never stops the federation.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::outputs::{ServerEval, ServerEvalConfig};

/// The worker binary: the configured path, else `zk0-train` next to this executable, else
/// `zk0-train` on PATH.
pub fn worker_path(cfg: &ServerEvalConfig) -> PathBuf {
    if !cfg.worker.is_empty() {
        return PathBuf::from(&cfg.worker);
    }
    let name = format!("zk0-train{}", std::env::consts::EXE_SUFFIX);
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(&name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Evaluates `global` (trainable tensors, safetensors) applied to `base_dir` on the configured
/// dataset, for `round`. `scratch` receives the worker's report and log, named after this
/// process too: a worker orphaned by a crashed aggregator may still be writing its own.
pub async fn evaluate(
    cfg: &ServerEvalConfig,
    base_dir: &Path,
    global: &Path,
    model_id: &str,
    round: u64,
    scratch: &Path,
) -> Result<ServerEval> {
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let stem = format!("eval-{model_id}-{}", std::process::id());
    let out = scratch.join(format!("{stem}.json"));
    let log = scratch.join(format!("{stem}.log"));
    let _ = std::fs::remove_file(&out);
    let worker = worker_path(cfg);
    let mut cmd = tokio::process::Command::new(&worker);
    cmd.args(&cfg.worker_args)
        .arg("eval")
        .arg("--model")
        .arg(base_dir)
        .arg("--global")
        .arg(global)
        .arg("--dataset")
        .arg(&cfg.dataset)
        .args(["--batch-size", &cfg.batch_size.to_string()])
        .args(["--seed", &cfg.seed.to_string()])
        .arg("--out")
        .arg(&out);
    if cfg.episodes > 0 {
        cmd.args(["--episodes", &cfg.episodes.to_string()]);
    }
    if !cfg.tokenizer.is_empty() {
        cmd.arg("--tokenizer").arg(&cfg.tokenizer);
    }
    let logf =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .kill_on_drop(true);
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", worker.display()))?;
    zk0_daemon::crash_point::hold_async("server_eval", round).await;
    let status =
        match tokio::time::timeout(Duration::from_secs_f64(cfg.timeout_s), child.wait()).await {
            Ok(st) => st.context("waiting for the eval worker")?,
            Err(_) => {
                let _ = child.kill().await;
                anyhow::bail!(
                    "{} eval timed out after {} s (log: {})",
                    worker.display(),
                    cfg.timeout_s,
                    log.display()
                );
            }
        };
    anyhow::ensure!(
        status.success(),
        "{} eval failed with {status}: {}",
        worker.display(),
        tail(&log)
    );
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?,
    )
    .with_context(|| format!("parsing {}", out.display()))?;
    let policy_loss = report["loss"]
        .as_f64()
        .filter(|l| l.is_finite())
        .with_context(|| format!("{} has no finite \"loss\"", out.display()))?;
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&log);
    Ok(ServerEval {
        policy_loss,
        model_id: model_id.to_string(),
        dataset: cfg.dataset.clone(),
        seconds: t0.elapsed().as_secs_f64(),
        report,
    })
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("worker.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn cfg(worker: &Path) -> ServerEvalConfig {
        ServerEvalConfig {
            dataset: "held-out".into(),
            worker: worker.display().to_string(),
            timeout_s: 5.0,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_the_loss_and_reports_failures() {
        let d = tempfile::tempdir().unwrap();
        // Writes a report whose loss depends on the arguments, so the wiring is checked.
        let ok = script(
            d.path(),
            r#"out=""; seed=""
while [ $# -gt 0 ]; do case "$1" in --out) out="$2"; shift;; --seed) seed="$2"; shift;; esac; shift; done
echo "{\"loss\": 1.$seed, \"frames\": 3}" > "$out""#,
        );
        let mut c = cfg(&ok);
        c.seed = 25;
        let e = evaluate(
            &c,
            d.path(),
            &d.path().join("g"),
            "m1",
            1,
            &d.path().join("s"),
        )
        .await
        .unwrap();
        assert_eq!(e.policy_loss, 1.25);
        assert_eq!(e.report["frames"], 3);

        let bad = script(d.path(), "echo boom >&2; exit 3");
        let err = evaluate(&cfg(&bad), d.path(), d.path(), "m2", 1, &d.path().join("s"))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("boom"), "{err:#}");

        let slow = script(d.path(), "sleep 30");
        let mut c = cfg(&slow);
        c.timeout_s = 0.3;
        let t = Instant::now();
        let err = evaluate(&c, d.path(), d.path(), "m3", 1, &d.path().join("s"))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
