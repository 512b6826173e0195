//! `zk0-agent infer`: open-loop evaluation of an ONNX export (`zk0-train export-onnx`) on a
//! recorded episode, through ONNX Runtime: every `n_action_steps` frames from the episode's
//! first, the frame is preprocessed as LeRobot does, a chunk is sampled and unnormalized, and
//! compared with the actions recorded at the same frames.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lerobot_dataset::{FeatureValue, LeRobotDataset};
use rand::SeedableRng;
use zk0_infer::{Observation, OnnxPolicy, Processor, Provider, RgbFrame, RuntimeOptions};

#[derive(clap::Args, Debug)]
pub struct InferArgs {
    /// Export directory (export.json, prefix.onnx, denoise.onnx, processor files).
    #[arg(long)]
    model: PathBuf,
    /// LeRobot dataset directory (v3.0 or v2.1) with the export's cameras.
    #[arg(long, required_unless_present = "bench")]
    dataset: Option<PathBuf>,
    /// Instead of a dataset: time N chunks on a fixed synthetic observation at the model
    /// boundary (after one untimed warm-up) and report latency and peak memory.
    #[arg(long, conflicts_with = "dataset")]
    bench: Option<usize>,
    /// Episode index.
    #[arg(long, default_value_t = 0)]
    episode: usize,
    /// safetensors with a tensor `noise` [chunk_size, max_action_dim]: used for every
    /// prediction (deterministic comparisons with other implementations).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Seed of the noise when --noise is not given (a fresh draw per prediction).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output safetensors: `actions` [n, chunk_size, action_dim] (unnormalized) and
    /// `frame_index` [n].
    #[arg(long)]
    out: Option<PathBuf>,
    /// tokenizer.json (default: the export's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Execution provider: cpu, cuda or tensorrt.
    #[arg(long, default_value = "cpu")]
    provider: Provider,
    /// Intra-op threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// libonnxruntime.so (default: $ORT_DYLIB_PATH, else the system's).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    onnxruntime: Option<PathBuf>,
}

/// Noise for one prediction: the file's, or N(0, 1) from a seeded ChaCha (Box–Muller).
pub(crate) enum Noise {
    Fixed(Vec<f32>),
    Seeded(Box<rand_chacha::ChaCha8Rng>),
}

impl Noise {
    /// The file's noise if given, else a seeded draw per call.
    pub(crate) fn new(fixed: Option<Vec<f32>>, seed: u64) -> Self {
        match fixed {
            Some(v) => Noise::Fixed(v),
            None => Noise::Seeded(Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed))),
        }
    }

    pub(crate) fn next(&mut self, n: usize) -> Vec<f32> {
        match self {
            Noise::Fixed(v) => v.clone(),
            Noise::Seeded(rng) => {
                use rand::Rng;
                (0..n)
                    .map(|_| {
                        let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
                        let u2: f64 = rng.gen();
                        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                    })
                    .collect()
            }
        }
    }
}

pub(crate) fn read_noise(path: &Path, want: &[usize]) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("--noise {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("--noise {}: not safetensors", path.display()))?;
    let t = st
        .tensor("noise")
        .with_context(|| format!("--noise {}: no tensor `noise`", path.display()))?;
    let shape: Vec<usize> = t.shape().iter().copied().filter(|&d| d != 1).collect();
    let want_sq: Vec<usize> = want.iter().copied().filter(|&d| d != 1).collect();
    if shape != want_sq || t.dtype() != safetensors::Dtype::F32 {
        bail!(
            "--noise {}: `noise` is {:?} {:?}, expected F32 {want:?}",
            path.display(),
            t.dtype(),
            t.shape()
        );
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn floats(v: &FeatureValue, what: &str) -> Result<Vec<f32>> {
    match v {
        FeatureValue::Float(x) => Ok(x.iter().map(|&f| f as f32).collect()),
        FeatureValue::Int(x) => Ok(x.iter().map(|&f| f as f32).collect()),
        _ => bail!("{what} is not numeric"),
    }
}

fn write_out(
    path: &Path,
    actions: &[f32],
    frames: &[i64],
    n: usize,
    chunk: usize,
    dim: usize,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    let a: Vec<u8> = actions.iter().flat_map(|x| x.to_le_bytes()).collect();
    let f: Vec<u8> = frames.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        (
            "actions",
            TensorView::new(safetensors::Dtype::F32, vec![n, chunk, dim], &a)?,
        ),
        (
            "frame_index",
            TensorView::new(safetensors::Dtype::I64, vec![n], &f)?,
        ),
    ];
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// An export loaded on ONNX Runtime, with the options it was loaded with (a swapped-in export
/// is loaded the same way) and how long the load alone took.
pub(crate) struct LoadedExport {
    pub policy: OnnxPolicy,
    pub opts: RuntimeOptions,
    pub load_s: f64,
}

/// Loads onnxruntime (`onnxruntime`: the library's path, default the system's), then the
/// export in `model`: the first step of both `infer` and `act`.
pub(crate) fn load_export(
    onnxruntime: Option<&Path>,
    model: &Path,
    provider: Provider,
    threads: Option<usize>,
) -> Result<LoadedExport> {
    zk0_infer::init(onnxruntime).context("loading onnxruntime")?;
    let opts = RuntimeOptions {
        provider,
        threads,
        ..Default::default()
    };
    let loaded = Instant::now();
    let policy =
        OnnxPolicy::load(model, &opts).with_context(|| format!("--model {}", model.display()))?;
    Ok(LoadedExport {
        policy,
        opts,
        load_s: loaded.elapsed().as_secs_f64(),
    })
}

/// `--noise FILE` read and checked against the export's `[chunk_size, max_action_dim]`;
/// `None` without the flag.
pub(crate) fn fixed_noise(path: Option<&Path>, policy: &OnnxPolicy) -> Result<Option<Vec<f32>>> {
    let m = &policy.manifest;
    path.map(|p| read_noise(p, &[m.chunk_size as usize, m.max_action_dim as usize]))
        .transpose()
}

/// `zk0-agent infer`: the export, then `--bench` or the episode's open-loop comparison.
pub fn run(a: InferArgs) -> Result<()> {
    let LoadedExport {
        mut policy, load_s, ..
    } = load_export(a.onnxruntime.as_deref(), &a.model, a.provider, a.threads)?;
    let Some(dataset) = &a.dataset else {
        return bench(&mut policy, a.bench.unwrap_or(1), load_s, &a);
    };
    let ds = LeRobotDataset::open(dataset)
        .with_context(|| format!("--dataset {}", dataset.display()))?;
    let m = policy.manifest.clone();
    let proc = Processor::new(&a.model, &m, ds.stats(), a.tokenizer.as_deref())?;
    let have = ds.camera_keys();
    for c in &m.cameras {
        if !have.contains(&c.key) {
            bail!("the dataset has no camera {} (it has {have:?})", c.key);
        }
    }
    let ep = ds.episode(a.episode)?.clone();
    let (chunk, dim) = (m.chunk_size as usize, m.action_dim as usize);
    let step = m.n_action_steps.max(1) as usize;
    let mut noise = Noise::new(fixed_noise(a.noise.as_deref(), &policy)?, a.seed);
    let recorded = recorded_actions(&ds, ep.dataset_from_index, ep.length)?;
    let (mut actions, mut frames, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = Errors::new(dim);
    for fi in (0..ep.length).step_by(step) {
        let frame = ds.get_episode_frame(a.episode, fi)?;
        let (act, ms) = predict(&frame, &proc, &mut policy, &mut noise)?;
        lat.push(ms);
        errors.add(&act, &recorded[fi.min(recorded.len())..], dim);
        actions.extend(act);
        frames.push(fi as i64);
    }
    if let Some(out) = &a.out {
        write_out(out, &actions, &frames, frames.len(), chunk, dim)?;
    }
    lat.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "episode": a.episode,
        "frames": ep.length,
        "predictions": frames.len(),
        "chunk_size": chunk,
        "n_action_steps": step,
        "compared_actions": errors.pairs,
        "mae": errors.mae(),
        "rmse": errors.rmse(),
        "mae_per_joint": errors.mae_per_joint(),
        "first_action_mae": errors.first_action_mae(frames.len()),
        "chunk_ms": {"p50": percentile(&lat, 0.5), "max": lat.last().copied().unwrap_or(0.0)},
        "load_s": load_s,
        "provider": format!("{:?}", a.provider).to_lowercase(),
        "out": a.out,
    });
    println!("{report}");
    Ok(())
}

/// The recorded actions of the episode's `length` frames from `from` (parquet only, no
/// video decoding): what the predictions are compared with.
fn recorded_actions(ds: &LeRobotDataset, from: usize, length: usize) -> Result<Vec<Vec<f32>>> {
    let mut recorded = Vec::with_capacity(length);
    for i in 0..length {
        let f = ds.get_values(from + i)?;
        let v = f
            .features
            .get("action")
            .context("the dataset has no `action`")?;
        recorded.push(floats(v, "action")?);
    }
    Ok(recorded)
}

/// One chunk for a recorded frame, as the robot would get it: LeRobot's preprocessing, the
/// sampled chunk, unnormalized (`[chunk_size × action_dim]`, row-major); and the milliseconds
/// those three took (the frame's decoding and copying are not timed).
fn predict(
    frame: &lerobot_dataset::Frame,
    proc: &Processor,
    policy: &mut OnnxPolicy,
    noise: &mut Noise,
) -> Result<(Vec<f32>, f64)> {
    let state = floats(
        frame
            .features
            .get("observation.state")
            .context("the dataset has no `observation.state`")?,
        "observation.state",
    )?;
    let images = policy
        .manifest
        .cameras
        .iter()
        .map(|c| {
            let img = &frame.images[&c.key];
            RgbFrame {
                rgb: img.as_raw(),
                height: img.height() as usize,
                width: img.width() as usize,
            }
        })
        .collect();
    let obs = Observation {
        images,
        state: &state,
        task: &frame.task,
    };
    let m = &policy.manifest;
    let n = (m.chunk_size * m.max_action_dim) as usize;
    let t0 = Instant::now();
    let inputs = proc.inputs(&obs)?;
    let sampled = policy.sample(&inputs, &noise.next(n), false)?;
    let act = proc.actions(&sampled)?;
    Ok((act, t0.elapsed().as_secs_f64() * 1e3))
}

/// Absolute errors of predicted against recorded actions, summed per joint, squared, and for
/// each chunk's first action.
struct Errors {
    abs: Vec<f64>,
    sq: f64,
    first: f64,
    pairs: usize,
}

impl Errors {
    fn new(dim: usize) -> Self {
        Self {
            abs: vec![0f64; dim],
            sq: 0.0,
            first: 0.0,
            pairs: 0,
        }
    }

    /// A chunk (`dim` values per action) against the recorded actions from its frame on;
    /// actions past the episode's end are not compared.
    fn add(&mut self, chunk: &[f32], recorded: &[Vec<f32>], dim: usize) {
        for (k, (row, rec)) in chunk.chunks(dim).zip(recorded).enumerate() {
            for (j, (p, r)) in row.iter().zip(rec).enumerate() {
                let e = (*p as f64 - *r as f64).abs();
                self.abs[j] += e;
                self.sq += e * e;
                if k == 0 {
                    self.first += e;
                }
            }
            self.pairs += 1;
        }
    }

    /// Elements compared: each action's joints.
    fn elements(&self) -> f64 {
        (self.pairs * self.abs.len()).max(1) as f64
    }

    fn mae(&self) -> f64 {
        self.abs.iter().sum::<f64>() / self.elements()
    }

    fn rmse(&self) -> f64 {
        (self.sq / self.elements()).sqrt()
    }

    fn mae_per_joint(&self) -> Vec<f64> {
        self.abs
            .iter()
            .map(|e| e / self.pairs.max(1) as f64)
            .collect()
    }

    /// The first action of each of `predictions` chunks.
    fn first_action_mae(&self, predictions: usize) -> f64 {
        self.first / (predictions * self.abs.len()).max(1) as f64
    }
}

/// `--bench N`: a fixed synthetic observation (uniform images, ramp state, every token real),
/// the same noise for each chunk; prefix and denoising loop timed apart.
fn bench(policy: &mut OnnxPolicy, n: usize, load_s: f64, a: &InferArgs) -> Result<()> {
    let m = policy.manifest.clone();
    let px = (3 * m.image.height * m.image.width) as usize;
    let l = m.language.max_length as usize;
    let inputs = zk0_infer::ModelInputs {
        images: (0..m.cameras.len())
            .map(|c| {
                (0..px)
                    .map(|i| ((i * 7 + c * 13) % 255) as f32 / 255.0)
                    .collect()
            })
            .collect(),
        image_masks: vec![true; m.cameras.len()],
        tokens: (0..l).map(|i| (i % 50) as i64 + 1).collect(),
        token_mask: vec![true; l],
        state: (0..m.state_dim).map(|i| i as f32 * 0.1).collect(),
    };
    let mut noise = Noise::new(fixed_noise(a.noise.as_deref(), policy)?, a.seed);
    let x = noise.next((m.chunk_size * m.max_action_dim) as usize);
    let (mut prefix_ms, mut loop_ms, mut chunk_ms) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=n {
        let t0 = Instant::now();
        let cache = policy.prefix(&inputs)?;
        let t1 = Instant::now();
        policy.sample_from(&cache, &x, false)?;
        let t2 = Instant::now();
        if i > 0 {
            prefix_ms.push((t1 - t0).as_secs_f64() * 1e3);
            loop_ms.push((t2 - t1).as_secs_f64() * 1e3);
            chunk_ms.push((t2 - t0).as_secs_f64() * 1e3);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (p_mean, l_mean) = (mean(&prefix_ms), mean(&loop_ms));
    chunk_ms.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "bench": n,
        "chunk_ms": {"p50": percentile(&chunk_ms, 0.5), "p99": percentile(&chunk_ms, 0.99), "mean": mean(&chunk_ms)},
        "prefix_ms": p_mean,
        "denoise_step_ms": l_mean / m.num_steps.max(1) as f64,
        "peak_rss_kib": zk0_host::peak_rss_kib(),
        "load_s": load_s,
        "threads": a.threads,
        "provider": format!("{:?}", a.provider).to_lowercase(),
        "precision": m.precision,
        "prefix_len": m.prefix_len,
    });
    println!("{report}");
    Ok(())
}
