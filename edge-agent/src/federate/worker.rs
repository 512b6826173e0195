//! Runs the training worker (`zk0-train train` by default) as a child process.
//!
//! Contract (zk0-train's own CLI): `<worker…> [<worker_args>…] [--model <checkpoint dir>]
//! [--tokenizer <tokenizer.json>] --global <model.safetensors> --dataset <dir> --steps N
//! --batch-size B --lr X --mu M --seed S (--out-params | --out-delta) <file> --out-metrics <file>`.
//! `--global` is the cached global model exactly as the aggregator publishes it (f32
//! safetensors of the trainable tensors only); `--model` is the full base checkpoint the worker
//! loads first (frozen backbone, config, processor). The worker prints JSON-lines progress on
//! stdout and writes either the trained trainable tensors (`worker_output = "params"`, what
//! zk0-train on this branch does: the agent then reads the global model again and subtracts)
//! or the delta trained − global (`"delta"`: one file read, checked against the manifest's
//! tensor list), plus the metrics JSON ([`WorkerMetrics`]), and exits 0. The daemon never links
//! libtorch and survives a worker crash: a failed run only forfeits this round.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use shared_proto::tensor::{read_safetensors, ModelSpec, Tensor, TensorSet};
pub use shared_proto::worker::WorkerMetrics;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// What the worker writes: the trained tensors or the delta itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerOutput {
    /// Trained trainable tensors (`--out-params`); the agent subtracts the global model.
    Params,
    /// The delta, trained − global (`--out-delta`, what zk0-train writes): one file read, no
    /// second read of the global model.
    #[default]
    Delta,
}

/// Inputs of one training run.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub command: Vec<String>,
    /// Extra arguments after the command (e.g. `--threads 1`).
    pub extra_args: Vec<String>,
    /// Base LeRobot checkpoint directory (`--model`), if any.
    pub model: Option<PathBuf>,
    /// Tokenizer file (`--tokenizer`), if any.
    pub tokenizer: Option<PathBuf>,
    pub global: PathBuf,
    /// The global model's tensors (from its signed manifest; empty: unknown).
    pub spec: ModelSpec,
    pub dataset: PathBuf,
    pub steps: u32,
    pub lr: f64,
    pub mu: f64,
    pub batch: u32,
    pub seed: u64,
    pub output: WorkerOutput,
    pub out_dir: PathBuf,
}

/// What a finished run produced.
#[derive(Debug)]
pub struct TrainOutput {
    /// The file the worker wrote (trained tensors or delta, per `output`).
    pub out_path: PathBuf,
    pub output: WorkerOutput,
    /// The global model the run started from, and its tensors.
    pub global: PathBuf,
    pub spec: ModelSpec,
    pub metrics: WorkerMetrics,
}

impl TrainOutput {
    /// The delta over the global model's tensors (f32). A `delta` output is read as written
    /// and checked against the global model's tensor list; a `params` output is turned into
    /// trained − global, which reads the global model again. Tensors the worker wrote beyond
    /// the global model's are ignored; a missing tensor or a shape change is an error.
    pub fn delta(&self) -> Result<TensorSet> {
        let mut out = read_tensors(&self.out_path)?;
        let expected: Vec<(String, Vec<usize>, Option<Vec<f32>>)> = match self.output {
            WorkerOutput::Delta if !self.spec.tensors.is_empty() => self
                .spec
                .tensors
                .iter()
                .map(|(n, s)| (n.clone(), s.clone(), None))
                .collect(),
            // No tensor list (a model cached without one): the delta is what the worker wrote.
            WorkerOutput::Delta => return Ok(out),
            WorkerOutput::Params => read_tensors(&self.global)?
                .into_iter()
                .map(|(n, g)| (n, g.shape, Some(g.data)))
                .collect(),
        };
        let mut delta = TensorSet::new();
        for (name, shape, global) in expected {
            let t = out.remove(&name).with_context(|| {
                format!(
                    "the worker's output {} lacks {name}",
                    self.out_path.display()
                )
            })?;
            anyhow::ensure!(
                t.shape == shape,
                "{name}: the worker wrote shape {:?}, the global model has {shape:?}",
                t.shape,
            );
            let data = match global {
                None => t.data,
                Some(g) => t.data.iter().zip(&g).map(|(a, b)| a - b).collect(),
            };
            delta.insert(name, Tensor { shape, data });
        }
        Ok(delta)
    }
}

fn read_tensors(p: &Path) -> Result<TensorSet> {
    let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(read_safetensors(&bytes)
        .with_context(|| format!("parsing {}", p.display()))?
        .0)
}

/// Runs the worker to completion. Progress lines are logged; stderr is passed through.
pub async fn run(job: &TrainJob) -> Result<TrainOutput> {
    std::fs::create_dir_all(&job.out_dir)
        .with_context(|| format!("creating {}", job.out_dir.display()))?;
    let (out_path, out_flag) = match job.output {
        WorkerOutput::Params => (job.out_dir.join("trained.safetensors"), "--out-params"),
        WorkerOutput::Delta => (job.out_dir.join("delta.safetensors"), "--out-delta"),
    };
    let metrics_path = job.out_dir.join("metrics.json");
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&metrics_path);
    let (program, pre) = job.command.split_first().context("empty worker command")?;
    let mut cmd = Command::new(program);
    cmd.args(pre).args(&job.extra_args);
    if let Some(m) = &job.model {
        cmd.arg("--model").arg(m);
    }
    if let Some(t) = &job.tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    cmd.arg("--global")
        .arg(&job.global)
        .arg("--dataset")
        .arg(&job.dataset)
        .arg("--steps")
        .arg(job.steps.to_string())
        .arg("--batch-size")
        .arg(job.batch.to_string())
        .arg("--lr")
        .arg(job.lr.to_string())
        .arg("--mu")
        .arg(job.mu.to_string())
        .arg("--seed")
        .arg(job.seed.to_string())
        .arg(out_flag)
        .arg(&out_path)
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
        out_path.exists(),
        "worker wrote nothing at {}",
        out_path.display()
    );
    Ok(TrainOutput {
        out_path,
        output: job.output,
        global: job.global.clone(),
        spec: job.spec.clone(),
        metrics,
    })
}

/// A deterministic per-client, per-round seed (31 bits, so any worker's integer parses it).
pub fn seed_for(client_id: &str, round: u64) -> u64 {
    let h = shared_proto::hash::sha256(&[client_id.as_bytes(), &round.to_le_bytes()].concat());
    u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) & 0x7fff_ffff
}

fn read_metrics(path: &Path) -> Result<WorkerMetrics> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading worker metrics {}", path.display()))?;
    WorkerMetrics::from_json(&bytes)
        .with_context(|| format!("parsing worker metrics {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failing_worker_is_an_error_not_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let job = TrainJob {
            command: vec!["false".into()],
            extra_args: Vec::new(),
            model: None,
            tokenizer: None,
            global: d.path().join("g"),
            spec: ModelSpec::default(),
            dataset: d.path().into(),
            steps: 1,
            lr: 0.1,
            mu: 0.0,
            batch: 1,
            seed: 1,
            output: WorkerOutput::Params,
            out_dir: d.path().join("out"),
        };
        assert!(run(&job).await.is_err());
    }

    fn write(path: &Path, set: &TensorSet) {
        std::fs::write(
            path,
            shared_proto::tensor::write_safetensors(set, &Default::default()),
        )
        .unwrap();
    }

    fn set(entries: &[(&str, Vec<usize>, Vec<f32>)]) -> TensorSet {
        entries
            .iter()
            .map(|(n, shape, data)| {
                (
                    n.to_string(),
                    Tensor {
                        shape: shape.clone(),
                        data: data.clone(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn delta_from_trained_params_or_as_written() {
        let d = tempfile::tempdir().unwrap();
        let (g, o) = (d.path().join("g"), d.path().join("o"));
        write(&g, &set(&[("a", vec![2], vec![1.0, 2.0])]));
        // The worker may write more tensors than the global model has: they are ignored.
        write(
            &o,
            &set(&[
                ("a", vec![2], vec![1.5, 1.0]),
                ("frozen", vec![1], vec![9.0]),
            ]),
        );
        let spec = ModelSpec::from_tensors(&set(&[("a", vec![2], vec![0.0, 0.0])]));
        let mut out = TrainOutput {
            out_path: o.clone(),
            output: WorkerOutput::Params,
            global: g.clone(),
            spec,
            metrics: WorkerMetrics::default(),
        };
        let delta = out.delta().unwrap();
        assert_eq!(delta.len(), 1);
        assert_eq!(delta["a"].data, vec![0.5, -1.0]);
        // A delta output is taken as written, checked against the manifest's tensor list:
        // the global model is not read again.
        std::fs::remove_file(&g).unwrap();
        out.output = WorkerOutput::Delta;
        let delta = out.delta().unwrap();
        assert_eq!(delta.len(), 1, "extra tensors are dropped");
        assert_eq!(delta["a"].data, vec![1.5, 1.0]);
        // A missing tensor or a changed shape is an error.
        write(&o, &set(&[("b", vec![2], vec![0.0, 0.0])]));
        assert!(out.delta().is_err());
        write(&o, &set(&[("a", vec![1, 2], vec![0.0, 0.0])]));
        assert!(out.delta().is_err());
        out.output = WorkerOutput::Params;
        assert!(out.delta().is_err(), "params need the global model");
    }

    #[test]
    fn seeds_differ_by_client_and_round() {
        assert_eq!(seed_for("a", 1), seed_for("a", 1));
        assert_ne!(seed_for("a", 1), seed_for("a", 2));
        assert_ne!(seed_for("a", 1), seed_for("b", 1));
        assert!(seed_for("a", 1) <= 0x7fff_ffff);
    }
}
