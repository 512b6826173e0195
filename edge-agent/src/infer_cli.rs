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

pub fn run(a: InferArgs) -> Result<()> {
    zk0_infer::init(a.onnxruntime.as_deref()).context("loading onnxruntime")?;
    let opts = RuntimeOptions {
        provider: a.provider,
        threads: a.threads,
        ..Default::default()
    };
    let loaded = Instant::now();
    let mut policy = OnnxPolicy::load(&a.model, &opts)
        .with_context(|| format!("--model {}", a.model.display()))?;
    let load_s = loaded.elapsed().as_secs_f64();
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
    let (chunk, dim, max_dim) = (
        m.chunk_size as usize,
        m.action_dim as usize,
        m.max_action_dim as usize,
    );
    let step = m.n_action_steps.max(1) as usize;
    let fixed = a
        .noise
        .as_deref()
        .map(|p| read_noise(p, &[chunk, max_dim]))
        .transpose()?;
    let mut noise = Noise::new(fixed, a.seed);
    // Recorded actions of the whole episode (parquet only, no decoding).
    let mut recorded = Vec::with_capacity(ep.length);
    for i in 0..ep.length {
        let f = ds.get_values(ep.dataset_from_index + i)?;
        let v = f
            .features
            .get("action")
            .context("the dataset has no `action`")?;
        recorded.push(floats(v, "action")?);
    }
    let (mut actions, mut frames, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    let (mut abs, mut sq, mut first, mut pairs) = (vec![0f64; dim], 0f64, 0f64, 0usize);
    let starts: Vec<usize> = (0..ep.length).step_by(step).collect();
    for &fi in &starts {
        let frame = ds.get_episode_frame(a.episode, fi)?;
        let state = floats(
            frame
                .features
                .get("observation.state")
                .context("the dataset has no `observation.state`")?,
            "observation.state",
        )?;
        let images = m
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
        let t0 = Instant::now();
        let inputs = proc.inputs(&obs)?;
        let sampled = policy.sample(&inputs, &noise.next(chunk * max_dim), false)?;
        let act = proc.actions(&sampled)?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        for (k, row) in act.chunks(dim).enumerate() {
            let Some(rec) = recorded.get(fi + k) else {
                break;
            };
            for (j, (p, r)) in row.iter().zip(rec).enumerate() {
                let e = (*p as f64 - *r as f64).abs();
                abs[j] += e;
                sq += e * e;
                if k == 0 {
                    first += e;
                }
            }
            pairs += 1;
        }
        actions.extend(act);
        frames.push(fi as i64);
    }
    if let Some(out) = &a.out {
        write_out(out, &actions, &frames, frames.len(), chunk, dim)?;
    }
    lat.sort_by(f64::total_cmp);
    let n_el = (pairs * dim).max(1) as f64;
    let report = serde_json::json!({
        "episode": a.episode,
        "frames": ep.length,
        "predictions": frames.len(),
        "chunk_size": chunk,
        "n_action_steps": step,
        "compared_actions": pairs,
        "mae": abs.iter().sum::<f64>() / n_el,
        "rmse": (sq / n_el).sqrt(),
        "mae_per_joint": abs.iter().map(|e| e / pairs.max(1) as f64).collect::<Vec<_>>(),
        "first_action_mae": first / (frames.len() * dim).max(1) as f64,
        "chunk_ms": {"p50": percentile(&lat, 0.5), "max": lat.last().copied().unwrap_or(0.0)},
        "load_s": load_s,
        "provider": format!("{:?}", a.provider).to_lowercase(),
        "out": a.out,
    });
    println!("{report}");
    Ok(())
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
    let shape = [m.chunk_size as usize, m.max_action_dim as usize];
    let fixed = a
        .noise
        .as_deref()
        .map(|p| read_noise(p, &shape))
        .transpose()?;
    let mut noise = Noise::new(fixed, a.seed);
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
