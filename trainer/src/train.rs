//! `zk0-train train`: FedProx local training of SmolVLA on a LeRobot dataset.
//!
//! Each step: a batch of random frames with their action chunks (delta timestamps, padding
//! flags as LeRobot makes them), LeRobot's preprocessing (task + "\n" tokenized, MEAN_STD
//! state/action), the flow-matching loss plus the proximal term (mu/2)·‖θ − θ_global‖² over the
//! trainable parameters, clip to the preset's norm, AdamW at a constant learning rate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lerobot_dataset::{DeltaSample, FeatureValue, LeRobotDataset, Prefetcher};
use serde_json::json;
use shared_proto::message::ClientMetrics;
use shared_proto::worker::WorkerMetrics;
use smolvla::optim::{sq_distance, AdamW, AdamWConfig};
use smolvla::policy::{ACTION, ACTION_IS_PAD, OBS_STATE, OBS_TOKENS, OBS_TOKEN_MASK};
use smolvla::processor::{Stats, TaskTokenizer};
use smolvla::{Batch, SmolVlaPolicy, Trace};
use tch::{Device, Kind, Tensor};

/// Batches read ahead of the training step.
const PREFETCH_BATCHES: usize = 2;

/// Options of one local training run.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// LeRobot checkpoint directory (config.json, model.safetensors, optional vlm_config.json,
    /// processor files and tokenizer.json).
    pub model: PathBuf,
    /// Global model weights (all parameters or any subset, LeRobot names) applied on top.
    pub global: Option<PathBuf>,
    pub dataset: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: Option<f64>,
    pub mu: f64,
    pub seed: i64,
    /// What to write of the trained tensors, and where.
    pub out: TrainedOut,
    pub out_metrics: PathBuf,
    /// Where to write the trained policy as a LeRobot checkpoint directory, if anywhere.
    pub out_model: Option<PathBuf>,
    /// Where the model and the batches live.
    pub device: Device,
    /// Reduced precision of the matrix products (`--bf16`), see `smolvla::layers::autocast`.
    pub autocast: Option<Kind>,
}

/// The trainable tensors a run writes (safetensors, LeRobot names, f32).
#[derive(Debug, Clone)]
pub enum TrainedOut {
    /// Their trained values (`--out-params`).
    Params(PathBuf),
    /// Trained − the values they started from (`--out-delta`): the update an agent sends, so
    /// it need not read the global model again to subtract it.
    Delta(PathBuf),
}

/// Moves every tensor of a batch to `device` (a no-op on the CPU).
pub(crate) fn batch_to(batch: Batch, device: Device) -> Batch {
    if device == Device::Cpu {
        return batch;
    }
    batch
        .into_iter()
        .map(|(k, v)| (k, v.to_device(device)))
        .collect()
}

/// The checkpoint at `model` on `device`, with the `global` weights (any subset) on top; under
/// `autocast` its frozen matrix weights are stored in that precision
/// ([`SmolVlaPolicy::store_frozen_as`]: the same results, half their memory).
pub(crate) fn load_policy(
    model: &Path,
    global: Option<&Path>,
    device: Device,
    autocast: Option<Kind>,
) -> Result<SmolVlaPolicy> {
    let mut policy = SmolVlaPolicy::from_dir(model, device)
        .with_context(|| format!("loading {}", model.display()))?;
    if let Some(g) = global {
        let tensors =
            Tensor::read_safetensors(g).with_context(|| format!("reading {}", g.display()))?;
        policy
            .load_subset(&tensors)
            .with_context(|| format!("applying {}", g.display()))?;
    }
    if let Some(k) = autocast {
        policy.store_frozen_as(k);
    }
    Ok(policy)
}

/// What one optimisation step reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepOut {
    pub loss: f64,
    pub prox: f64,
    pub grad_norm: f64,
}

/// Seconds spent in each part of the training steps (CPU work is synchronous, so wall time
/// per part is meaningful there; on CUDA it measures launch time unless a sync intervenes).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Phases {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
}

/// One optimisation step, the work of LeRobot's `update_policy`: forward with the flow-matching
/// loss (under `autocast`), plus the proximal term (mu/2)·‖θ − θ_global‖² when `global` is
/// given, backward, clip to the preset's norm, AdamW at `lr`.
pub(crate) fn train_step(
    policy: &SmolVlaPolicy,
    opt: &mut AdamW,
    params: &[Tensor],
    global: Option<(&[Tensor], f64)>,
    batch: &Batch,
    noise_time: Option<(&Tensor, &Tensor)>,
    autocast: Option<Kind>,
    lr: f64,
    mut phases: Option<&mut Phases>,
) -> Result<StepOut> {
    let mut t = Instant::now();
    // Adds the time since the last lap to part `i` (0 forward, 1 backward, 2 optimizer).
    let mut lap = |i: usize, phases: &mut Option<&mut Phases>| {
        if let Some(p) = phases.as_deref_mut() {
            let slot = match i {
                0 => &mut p.forward,
                1 => &mut p.backward,
                _ => &mut p.optimizer,
            };
            *slot += t.elapsed().as_secs_f64();
        }
        t = Instant::now();
    };
    opt.zero_grad();
    let lo = smolvla::layers::autocast(autocast, || {
        policy.forward(
            batch,
            noise_time.map(|n| n.0),
            noise_time.map(|n| n.1),
            &mut Trace::off(),
        )
    })?;
    let (total, prox) = match global {
        Some((g, mu)) => {
            let prox = sq_distance(params, g) * (mu / 2.0);
            (&lo.loss + &prox, prox.double_value(&[]))
        }
        None => (lo.loss.shallow_clone(), 0.0),
    };
    lap(0, &mut phases);
    total.backward();
    lap(1, &mut phases);
    let grad_norm = opt.clip_and_step(lr, policy.config.optimizer_grad_clip_norm);
    lap(2, &mut phases);
    Ok(StepOut {
        loss: lo.loss.double_value(&[]),
        prox,
        grad_norm,
    })
}

fn floats(v: &FeatureValue, what: &str) -> Result<Vec<f32>> {
    match v {
        FeatureValue::Float(x) => Ok(x.iter().map(|&f| f as f32).collect()),
        FeatureValue::Int(x) => Ok(x.iter().map(|&i| i as f32).collect()),
        _ => bail!("{what}: not numeric"),
    }
}

/// Normalization statistics: the checkpoint's preprocessor state when present (what LeRobot
/// uses), else the dataset's `meta/stats.json`.
pub(crate) fn load_stats(model: &Path, ds: &LeRobotDataset) -> Result<Stats> {
    if model.join("policy_preprocessor.json").exists() {
        return crate::pipeline::stats_of(
            model,
            "policy_preprocessor.json",
            "normalizer_processor",
        );
    }
    let v = ds
        .stats()
        .context("the dataset has no meta/stats.json and the model no preprocessor")?;
    Ok(Stats::from_stats_json(v))
}

/// LeRobot's `delta_timestamps` of a training item: the action chunk at the dataset's rate.
pub(crate) fn action_deltas(
    ds: &LeRobotDataset,
    policy: &SmolVlaPolicy,
) -> BTreeMap<String, Vec<f64>> {
    let fps = f64::from(ds.fps());
    let chunk = policy.config.chunk_size;
    [(
        ACTION.to_string(),
        (0..chunk).map(|k| k as f64 / fps).collect(),
    )]
    .into_iter()
    .collect()
}

/// One training batch at the model boundary (LeRobot's preprocessor applied).
pub(crate) fn make_batch(
    ds: &LeRobotDataset,
    policy: &SmolVlaPolicy,
    tok: &TaskTokenizer,
    stats: &Stats,
    indices: &[usize],
) -> Result<Batch> {
    let deltas = action_deltas(ds, policy);
    let samples = indices
        .iter()
        .map(|&i| {
            ds.get_deltas(i, &deltas)
                .with_context(|| format!("dataset item {i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    batch_of(&samples, policy, tok, stats)
}

/// The batch of dataset items read with [`action_deltas`], LeRobot's preprocessor applied.
pub(crate) fn batch_of(
    samples: &[DeltaSample],
    policy: &SmolVlaPolicy,
    tok: &TaskTokenizer,
    stats: &Stats,
) -> Result<Batch> {
    let cams = policy.config.image_keys();
    let (mut states, mut actions, mut pads, mut tasks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut images: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
    for s in samples {
        let i = s.frame.index;
        let st = s
            .frame
            .features
            .get(OBS_STATE)
            .with_context(|| format!("item {i} has no {OBS_STATE}"))?;
        states.push(Tensor::from_slice(&floats(st, OBS_STATE)?));
        let acts = s.values.get(ACTION).context("no action chunk")?;
        let rows: Vec<Tensor> = acts
            .iter()
            .map(|a| floats(a, ACTION).map(|v| Tensor::from_slice(&v)))
            .collect::<Result<_>>()?;
        actions.push(Tensor::stack(&rows, 0));
        let pad = s
            .is_pad
            .get(&format!("{ACTION}_is_pad"))
            .context("no action padding flags")?;
        pads.push(Tensor::from_slice(pad));
        tasks.push(s.frame.task.clone());
        for cam in &cams {
            let img = s
                .frame
                .images
                .get(cam)
                .with_context(|| format!("item {i} has no camera {cam}"))?;
            let (w, h) = (img.width() as i64, img.height() as i64);
            // HWC u8 → CHW float in [0, 1], as LeRobot's dataset returns frames.
            let t = Tensor::from_slice(img.as_raw().as_slice())
                .view([h, w, 3])
                .permute([2, 0, 1])
                .to_kind(Kind::Float)
                / 255.0;
            images.entry(cam.clone()).or_default().push(t);
        }
    }
    let mut batch = Batch::new();
    for (cam, frames) in images {
        batch.insert(cam, Tensor::stack(&frames, 0));
    }
    batch.insert(
        OBS_STATE.into(),
        stats.normalize(OBS_STATE, &Tensor::stack(&states, 0))?,
    );
    batch.insert(
        ACTION.into(),
        stats.normalize(ACTION, &Tensor::stack(&actions, 0))?,
    );
    batch.insert(ACTION_IS_PAD.into(), Tensor::stack(&pads, 0));
    let (tokens, mask) = tok.encode(&tasks)?;
    batch.insert(OBS_TOKENS.into(), tokens);
    batch.insert(OBS_TOKEN_MASK.into(), mask);
    Ok(batch)
}

/// Runs the training; prints JSON lines of progress and returns the metrics.
pub fn run(args: &TrainArgs) -> Result<WorkerMetrics> {
    let t0 = Instant::now();
    tch::manual_seed(args.seed);
    let policy = load_policy(
        &args.model,
        args.global.as_deref(),
        args.device,
        args.autocast,
    )?;
    let ds = LeRobotDataset::open(&args.dataset)
        .with_context(|| format!("opening {}", args.dataset.display()))?;
    if ds.is_empty() {
        bail!("dataset {} is empty", args.dataset.display());
    }
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

    let trainable = policy.trainable_parameters();
    let params: Vec<Tensor> = trainable.iter().map(|(_, p)| p.shallow_clone()).collect();
    let global: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
    let mut acfg = AdamWConfig::from_policy(&policy.config);
    if let Some(lr) = args.lr {
        acfg.lr = lr;
    }
    let mut opt = AdamW::new(params.iter().map(|p| p.shallow_clone()).collect(), acfg);
    let (mut sum_loss, mut sum_prox, mut last_gn) = (0.0, 0.0, 0.0);
    // Every step's items drawn up front and read ahead on a background thread, so decoding
    // overlaps the training step (what LeRobot's dataloader workers do).
    let idx = Tensor::randint(
        ds.len() as i64,
        [(args.steps * args.batch_size) as i64],
        (Kind::Int64, Device::Cpu),
    );
    let indices: Vec<usize> = Vec::<i64>::try_from(&idx)?
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let deltas = action_deltas(&ds, &policy);
    let mut batches = Prefetcher::new(
        Arc::new(ds),
        indices,
        args.batch_size,
        deltas,
        PREFETCH_BATCHES,
    );
    for step in 0..args.steps {
        // `data_s` / `update_s` in the step line: LeRobot's names for the same two parts of
        // `lerobot-train`'s loop (batch read and preprocessed; forward, backward, optimizer).
        let t_data = Instant::now();
        let samples = batches
            .next()
            .context("the batch reader stopped early")?
            .with_context(|| format!("reading the batch of step {}", step + 1))?;
        let batch = batch_to(batch_of(&samples, &policy, &tok, &stats)?, args.device);
        let data_s = t_data.elapsed().as_secs_f64();
        let t_update = Instant::now();
        let o = train_step(
            &policy,
            &mut opt,
            &params,
            // mu 0: no proximal term to compute (a pass over every trainable tensor).
            (args.mu != 0.0).then_some((global.as_slice(), args.mu)),
            &batch,
            None,
            args.autocast,
            acfg.lr,
            None,
        )?;
        let update_s = t_update.elapsed().as_secs_f64();
        let (l, p, gn) = (o.loss, o.prox, o.grad_norm);
        sum_loss += l;
        sum_prox += p;
        last_gn = gn;
        println!(
            "{}",
            json!({"event": "step", "step": step + 1, "steps": args.steps, "loss": l, "fedprox_loss": p,
                   "grad_norm": gn, "lr": acfg.lr, "data_s": data_s, "update_s": update_s})
        );
    }
    let update_norm = tch::no_grad(|| sq_distance(&params, &global))
        .double_value(&[])
        .sqrt();
    let out: Vec<(String, Tensor)> = tch::no_grad(|| {
        trainable
            .iter()
            .zip(&global)
            .map(|((n, p), g)| {
                let t = match &args.out {
                    TrainedOut::Params(_) => p.detach(),
                    TrainedOut::Delta(_) => p.detach() - g,
                };
                (n.clone(), t.to_device(Device::Cpu).contiguous())
            })
            .collect()
    });
    let (TrainedOut::Params(out_path) | TrainedOut::Delta(out_path)) = &args.out;
    Tensor::write_safetensors(&out, out_path)
        .with_context(|| format!("writing {}", out_path.display()))?;
    if let Some(dir) = &args.out_model {
        save_checkpoint(&policy, &args.model, &stats, dir)?;
        // The tokenizer trained with (given by --tokenizer), for a self-contained checkpoint.
        let tok_out = dir.join("tokenizer.json");
        if !tok_out.exists() {
            std::fs::copy(&tok_path, &tok_out).with_context(|| {
                format!("copying {} to {}", tok_path.display(), tok_out.display())
            })?;
        }
    }
    let n = args.steps.max(1) as f64;
    let metrics = WorkerMetrics {
        report: ClientMetrics {
            loss: sum_loss / n,
            fedprox_loss: sum_prox / n,
            grad_norm: last_gn,
            update_norm,
            steps: args.steps as u64,
            seconds: t0.elapsed().as_secs_f64(),
        },
        examples: (args.steps * args.batch_size) as u64,
        trainable_tensors: out.len() as u64,
    };
    std::fs::write(&args.out_metrics, metrics.to_json())
        .with_context(|| format!("writing {}", args.out_metrics.display()))?;
    Ok(metrics)
}

/// Files of a LeRobot checkpoint besides the policy's own (`config.json`, `model.safetensors`):
/// the processor pipelines with their state and the tokenizer, carried over unchanged (training
/// changes no normalization statistics).
fn is_processor_file(name: &str) -> bool {
    name.starts_with("policy_preprocessor")
        || name.starts_with("policy_postprocessor")
        || matches!(
            name,
            "tokenizer.json" | "tokenizer_config.json" | "special_tokens_map.json"
        )
}

/// Writes `policy` as LeRobot's `save_pretrained` does (config.json, model.safetensors, plus
/// vlm_config.json for the backbone shape) with the processor files: those of the checkpoint it
/// was loaded from when it has them, else LeRobot's SmolVLA processors with the statistics
/// used in training, so the result is a complete LeRobot `pretrained_model/` directory.
pub fn save_checkpoint(
    policy: &SmolVlaPolicy,
    from: &Path,
    stats: &Stats,
    dir: &Path,
) -> Result<()> {
    policy
        .save_pretrained(dir)
        .with_context(|| format!("saving the policy to {}", dir.display()))?;
    if from == dir {
        return Ok(());
    }
    if !from.join("policy_preprocessor.json").exists() {
        smolvla::processor::save_processors(dir, &policy.config, stats)
            .with_context(|| format!("saving the processors to {}", dir.display()))?;
    }
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_file() && is_processor_file(name) {
            std::fs::copy(&path, dir.join(name))
                .with_context(|| format!("copying {} to {}", path.display(), dir.display()))?;
        }
    }
    Ok(())
}
