//! `zk0-fake-worker`: a TEST-ONLY stand-in for `zk0-train train` (fast, no libtorch), for the
//! protocol tests that need what the real worker never does (a failing worker, an agent that
//! subtracts the global model itself) or no libtorch; the round, mosquitto and fault tests run
//! the real worker.
//!
//! It honours the worker contract of `zk0-agent` (`train [--model <dir>] [--tokenizer <file>]
//! --global <model.safetensors> --dataset <dir> --steps N --batch-size B --lr X --mu M --seed S
//! (--out-params | --out-delta) <file> --out-metrics <file>`, JSON-lines progress on stdout;
//! `--out-params` gets global + delta, `--out-delta` the delta, as zk0-train writes them) but trains
//! nothing: the delta is a deterministic pseudo-random function
//! of the dataset directory's name and the global model's bytes, scaled by `lr`, so an
//! end-to-end test can recompute what every client sent. The example count is read from
//! `<dataset>/examples.txt` (default 100). Setting `ZK0_FAKE_WORKER_SLEEP_MS` slows each step,
//! `ZK0_FAKE_WORKER_SCALE` multiplies the delta (saturating at ±f32::MAX, so a huge factor
//! gives finite values that overflow a sum: robust-aggregation tests), and `<dataset>/fail`
//! makes it exit with an error (fault tests).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use shared_proto::tensor::{read_safetensors, write_safetensors, Tensor, TensorSet};

#[derive(Default)]
struct Args {
    global: PathBuf,
    dataset: PathBuf,
    steps: u64,
    lr: f64,
    out_delta: PathBuf,
    out_params: PathBuf,
    out_metrics: PathBuf,
}

fn parse() -> Result<Args> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    anyhow::ensure!(
        it.next().as_deref() == Some("train"),
        "usage: zk0-fake-worker train --global … (see module docs)"
    );
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--global" => a.global = v.into(),
            "--dataset" => a.dataset = v.into(),
            "--steps" => a.steps = v.parse()?,
            "--lr" => a.lr = v.parse()?,
            "--mu" | "--batch" | "--batch-size" | "--seed" | "--model" | "--tokenizer"
            | "--threads" => {}
            "--out-delta" => a.out_delta = v.into(),
            "--out-params" => a.out_params = v.into(),
            "--out-metrics" => a.out_metrics = v.into(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// splitmix64: tiny, deterministic, good enough for test data.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn main() -> Result<()> {
    let a = parse()?;
    anyhow::ensure!(
        !a.dataset.join("fail").exists(),
        "dataset asks this worker to fail"
    );
    let bytes =
        std::fs::read(&a.global).with_context(|| format!("reading {}", a.global.display()))?;
    let (global, _) = read_safetensors(&bytes)?;
    let name = a
        .dataset
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let seed_bytes = shared_proto::hash::sha256(&[name.as_bytes(), &bytes].concat());
    let mut state = u64::from_le_bytes(seed_bytes[..8].try_into()?);
    let sleep_ms: u64 = std::env::var("ZK0_FAKE_WORKER_SLEEP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for step in 1..=a.steps.max(1) {
        if sleep_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(sleep_ms));
        }
        println!(
            "{}",
            serde_json::json!({"event": "progress", "step": step, "steps": a.steps, "loss": 1.0 / step as f64})
        );
    }
    let scale: f64 = std::env::var("ZK0_FAKE_WORKER_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let max = f64::from(f32::MAX);
    let mut delta = TensorSet::new();
    let mut norm_sq = 0.0f64;
    for (k, t) in &global {
        let data: Vec<f32> = (0..t.data.len())
            .map(|_| {
                let u = (next(&mut state) >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
                let x = ((u * 2.0 - 1.0) * a.lr * scale).clamp(-max, max) as f32;
                norm_sq += f64::from(x) * f64::from(x);
                x
            })
            .collect();
        delta.insert(
            k.clone(),
            Tensor {
                shape: t.shape.clone(),
                data,
            },
        );
    }
    if !a.out_delta.as_os_str().is_empty() {
        std::fs::write(&a.out_delta, write_safetensors(&delta, &BTreeMap::new()))?;
    }
    if !a.out_params.as_os_str().is_empty() {
        let mut trained = global.clone();
        for (k, t) in trained.iter_mut() {
            for (x, d) in t.data.iter_mut().zip(&delta[k].data) {
                *x += d;
            }
        }
        std::fs::write(&a.out_params, write_safetensors(&trained, &BTreeMap::new()))?;
    }
    anyhow::ensure!(
        !a.out_delta.as_os_str().is_empty() || !a.out_params.as_os_str().is_empty(),
        "--out-params or --out-delta is required"
    );
    let examples: u64 = std::fs::read_to_string(a.dataset.join("examples.txt"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100);
    let metrics = shared_proto::worker::WorkerMetrics {
        report: shared_proto::message::ClientMetrics {
            loss: 1.0 / a.steps.max(1) as f64,
            grad_norm: 1.0,
            update_norm: norm_sq.sqrt(),
            steps: a.steps,
            ..Default::default()
        },
        examples,
        trainable_tensors: delta.len() as u64,
    };
    std::fs::write(&a.out_metrics, metrics.to_json())?;
    println!("{}", serde_json::json!({"event": "done"}));
    Ok(())
}
