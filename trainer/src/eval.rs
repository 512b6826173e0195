//! `zk0-train eval`: the policy's flow-matching loss over a LeRobot dataset (all frames of all
//! episodes, or of the first N), with LeRobot's preprocessing, as JSON.
//!
//! Every frame is evaluated once, in order, in batches; noise and time are drawn from a seeded
//! generator so that a run is reproducible. The dataset loss is the mean over every valid
//! (non-padding) action entry, i.e. what one batch holding every frame would give.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lerobot_dataset::LeRobotDataset;
use serde_json::{json, Value};
use smolvla::policy::ACTION_IS_PAD;
use smolvla::processor::TaskTokenizer;
use smolvla::Trace;
use tch::{Device, Kind};

use crate::train::{batch_to, load_stats, make_batch};

/// Options of one evaluation.
#[derive(Debug, Clone)]
pub struct EvalArgs {
    /// LeRobot checkpoint directory.
    pub model: PathBuf,
    /// Weights (all or a subset, LeRobot names) applied on top of the checkpoint's.
    pub global: Option<PathBuf>,
    pub dataset: PathBuf,
    pub tokenizer: Option<PathBuf>,
    /// Only the first N episodes (default: all).
    pub episodes: Option<usize>,
    pub batch_size: usize,
    pub seed: i64,
    pub out: PathBuf,
    /// Where the model and the batches live.
    pub device: Device,
    /// Reduced precision of the matrix products (`--bf16`).
    pub autocast: Option<Kind>,
}

/// Runs the evaluation, writes the JSON report to `args.out` and returns it.
pub fn run(args: &EvalArgs) -> Result<Value> {
    let t0 = Instant::now();
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    tch::manual_seed(args.seed);
    let policy = crate::train::load_policy(
        &args.model,
        args.global.as_deref(),
        args.device,
        args.autocast,
    )?;
    let ds = LeRobotDataset::open(&args.dataset)
        .with_context(|| format!("opening {}", args.dataset.display()))?;
    let tok_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let tok = TaskTokenizer::from_file(
        &tok_path,
        policy.config.tokenizer_max_length as usize,
        &crate::pipeline::pad_token(&args.model),
    )?;
    let stats = load_stats(&args.model, &ds)?;
    let n_eps = args
        .episodes
        .unwrap_or(ds.episodes().len())
        .min(ds.episodes().len());
    if n_eps == 0 {
        bail!(
            "dataset {} has no episodes to evaluate",
            args.dataset.display()
        );
    }

    let (mut sum, mut count, mut frames) = (0.0f64, 0.0f64, 0usize);
    let mut per_episode = Vec::with_capacity(n_eps);
    for ep in &ds.episodes()[..n_eps] {
        let (mut ep_sum, mut ep_count) = (0.0f64, 0.0f64);
        let indices: Vec<usize> = (ep.dataset_from_index..ep.dataset_to_index).collect();
        for chunk in indices.chunks(args.batch_size) {
            let batch = batch_to(make_batch(&ds, &policy, &tok, &stats, chunk)?, args.device);
            let out = tch::no_grad(|| {
                smolvla::layers::autocast(args.autocast, || {
                    policy.forward(&batch, None, None, &mut Trace::off())
                })
            })?;
            // Valid action entries per sample: per_sample is a mean over them.
            let valid = batch[ACTION_IS_PAD]
                .to_kind(Kind::Bool)
                .logical_not()
                .sum_dim_intlist(1, false, Kind::Double);
            let per: Vec<f64> =
                Vec::try_from(&out.per_sample.to_kind(Kind::Double).to_device(Device::Cpu))?;
            let n: Vec<f64> = Vec::try_from(&valid.to_device(Device::Cpu))?;
            for (l, v) in per.iter().zip(&n) {
                ep_sum += l * v;
                ep_count += v;
            }
        }
        frames += indices.len();
        sum += ep_sum;
        count += ep_count;
        per_episode.push(json!({
            "episode_index": ep.episode_index,
            "frames": indices.len(),
            "loss": ep_sum / ep_count.max(1.0),
        }));
    }
    let report = json!({
        "loss": sum / count.max(1.0),
        "frames": frames,
        "episodes": n_eps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "seconds": t0.elapsed().as_secs_f64(),
        "per_episode": per_episode,
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(report)
}
