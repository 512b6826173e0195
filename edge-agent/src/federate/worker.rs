//! Runs the training worker (`zk0-train train` by default) as a child process.
//!
//! Contract: `<worker…> --global <model.safetensors> --dataset <dir> --steps N --lr X --mu M
//! --batch B --out-delta <file> --out-metrics <file>`; the worker prints JSON-lines progress on
//! stdout, writes the delta (trained − global, f32 safetensors over the trainable tensors) and
//! a metrics JSON object, and exits 0. The daemon never links libtorch and survives a worker
//! crash: a failed run only forfeits this round.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Inputs of one training run.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub command: Vec<String>,
    pub global: PathBuf,
    pub dataset: PathBuf,
    pub steps: u32,
    pub lr: f64,
    pub mu: f64,
    pub batch: u32,
    pub out_dir: PathBuf,
}

/// The metrics file a worker writes. Unknown keys are ignored; missing ones default to 0.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct WorkerMetrics {
    pub loss: f64,
    pub fedprox_loss: f64,
    pub grad_norm: f64,
    pub update_norm: f64,
    pub steps: u64,
    pub seconds: f64,
    /// Training examples seen (the aggregation weight unless the config overrides it).
    pub examples: u64,
}

/// What a finished run produced.
#[derive(Debug)]
pub struct TrainOutput {
    pub delta_path: PathBuf,
    pub metrics: WorkerMetrics,
}

/// Runs the worker to completion. Progress lines are logged; stderr is passed through.
pub async fn run(job: &TrainJob) -> Result<TrainOutput> {
    std::fs::create_dir_all(&job.out_dir)
        .with_context(|| format!("creating {}", job.out_dir.display()))?;
    let delta_path = job.out_dir.join("delta.safetensors");
    let metrics_path = job.out_dir.join("metrics.json");
    let _ = std::fs::remove_file(&delta_path);
    let _ = std::fs::remove_file(&metrics_path);
    let (program, pre) = job.command.split_first().context("empty worker command")?;
    let mut cmd = Command::new(program);
    cmd.args(pre)
        .arg("--global")
        .arg(&job.global)
        .arg("--dataset")
        .arg(&job.dataset)
        .arg("--steps")
        .arg(job.steps.to_string())
        .arg("--lr")
        .arg(job.lr.to_string())
        .arg("--mu")
        .arg(job.mu.to_string())
        .arg("--batch")
        .arg(job.batch.to_string())
        .arg("--out-delta")
        .arg(&delta_path)
        .arg("--out-metrics")
        .arg(&metrics_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // If the daemon task is dropped (round abandoned, shutdown), the worker goes too.
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting worker {program:?}"))?;
    if let Some(out) = child.stdout.take() {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) => tracing::debug!(progress = %v, "worker"),
                Err(_) => tracing::debug!(line = %line, "worker (non-JSON)"),
            }
        }
    }
    let status = child.wait().await.context("waiting for the worker")?;
    anyhow::ensure!(status.success(), "worker exited with {status}");
    let metrics = read_metrics(&metrics_path)?;
    anyhow::ensure!(
        delta_path.exists(),
        "worker wrote no delta at {}",
        delta_path.display()
    );
    Ok(TrainOutput {
        delta_path,
        metrics,
    })
}

fn read_metrics(path: &Path) -> Result<WorkerMetrics> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading worker metrics {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("parsing worker metrics {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_tolerate_missing_and_extra_keys() {
        let m: WorkerMetrics =
            serde_json::from_str(r#"{"loss": 1.5, "examples": 7, "extra": true}"#).unwrap();
        assert_eq!(m.loss, 1.5);
        assert_eq!(m.examples, 7);
        assert_eq!(m.steps, 0);
    }

    #[tokio::test]
    async fn failing_worker_is_an_error_not_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let job = TrainJob {
            command: vec!["false".into()],
            global: d.path().join("g"),
            dataset: d.path().into(),
            steps: 1,
            lr: 0.1,
            mu: 0.0,
            batch: 1,
            out_dir: d.path().join("out"),
        };
        assert!(run(&job).await.is_err());
    }
}
