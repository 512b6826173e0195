//! `zk0-train bench`: timed training steps on one fixed batch, the zk0 side of
//! `cargo xtask bench train` (trainer/benches/train.rs runs this and LeRobot's step, each in
//! its own process, and prints the ratios).
//!
//! A step is exactly `zk0-train train`'s without the data loading: forward with the
//! flow-matching loss, backward, gradient clipping, AdamW (the SmolVLA preset's betas, eps and
//! weight decay). The batch, noise and time are the same every step, so both sides do the same
//! work; the first `warmup` steps are not timed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use smolvla::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

use crate::compare::{batch_of, input, read_tensors};
use crate::train::{batch_to, load_policy, train_step, Phases};

/// Options of one benchmark run.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub model: PathBuf,
    pub inputs: PathBuf,
    pub steps: usize,
    pub warmup: usize,
    pub device: Device,
    pub autocast: Option<Kind>,
}

/// Runs the steps and returns the JSON report.
pub fn run(args: &BenchArgs) -> Result<Value> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let t_load = Instant::now();
    let policy = load_policy(&args.model, None, args.device, args.autocast)?;
    let inputs = read_tensors(&args.inputs)?;
    let batch = batch_to(batch_of(&inputs), args.device);
    let noise = input(&inputs, "noise")?.to_device(args.device);
    let time = input(&inputs, "time")?.to_device(args.device);
    let params: Vec<Tensor> = policy
        .trainable_parameters()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let acfg = AdamWConfig::from_policy(&policy.config);
    let mut opt = AdamW::new(params.iter().map(Tensor::shallow_clone).collect(), acfg);
    let load_seconds = t_load.elapsed().as_secs_f64();
    let mut phases = Phases::default();
    let mut step = |timed: Option<&mut Phases>| {
        train_step(
            &policy,
            &mut opt,
            &params,
            None,
            &batch,
            Some((&noise, &time)),
            args.autocast,
            acfg.lr,
            timed,
        )
    };
    let first = step(None)?;
    for _ in 1..args.warmup {
        step(None)?;
    }
    let t0 = Instant::now();
    let mut last = first;
    for _ in 0..args.steps {
        last = step(Some(&mut phases))?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let batch_size = noise.size()[0];
    Ok(json!({
        "impl": "zk0",
        "steps": args.steps,
        "warmup": args.warmup.max(1),
        "batch_size": batch_size,
        "threads": tch::get_num_threads(),
        "device": format!("{:?}", args.device),
        "bf16": args.autocast.is_some(),
        "load_seconds": load_seconds,
        "seconds": seconds,
        "steps_per_s": args.steps as f64 / seconds,
        "first_loss": first.loss,
        "last_loss": last.loss,
        "trainable_tensors": params.len(),
        "phase_seconds": {
            "forward": phases.forward,
            "backward": phases.backward,
            "optimizer": phases.optimizer,
        },
        "peak_rss_kib": zk0_host::peak_rss_kib(),
    }))
}
