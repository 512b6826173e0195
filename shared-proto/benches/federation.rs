//! `cargo xtask bench federation` (= `cargo bench -p shared-proto --bench federation -- [opts]`).
//!
//! Prints, in one run:
//! - per codec (`f32`, `bf16`, `int8`, `topk:0.01`, `topk:0.1`, each + zstd): encode and decode
//!   MB/s (MB = 10⁶ bytes of f32 delta in or out per second) and the compression ratio
//!   (f32 bytes / encoded bytes), on a synthetic delta shaped like SmolVLA's trainable set;
//! - the aggregator's streaming weighted accumulate `acc += w·Δ` over f32, as a fraction of the
//!   memcpy bandwidth measured in the same run on the same tensors.
//!
//! The delta is SYNTHETIC (no real fine-tuning delta exists yet): names and shapes are the
//! `trainable: true` parameters of `tests/fixtures/smolvla-base-manifest.json`; values are drawn
//! as described in [`synth_delta`].
//!
//! Options: `--scale F` (shrink every tensor's first dimension by F; default 1 = the full ~100M
//! parameters), `--reps N` (timed repetitions, median reported; default 5), `--warmup N`
//! (untimed runs first; default 1), `--zstd-level L` (default 3), `--manifest PATH`, `--seed S`.
//! An unoptimised build (`cargo test --benches`) defaults to `--scale 0.01 --reps 1`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use shared_proto::codec::{self, Codec, EncodeOptions};
use shared_proto::{ModelSpec, Tensor, TensorSet};

struct Opts {
    scale: f64,
    reps: usize,
    warmup: usize,
    zstd_level: i32,
    manifest: PathBuf,
    seed: u64,
}

fn parse_args() -> Result<Opts, String> {
    // An unoptimised build (`cargo test --benches`) only smoke-tests: 1 % of the model, once.
    let debug = cfg!(debug_assertions);
    let mut o = Opts {
        scale: if debug { 0.01 } else { 1.0 },
        reps: if debug { 1 } else { 5 },
        warmup: 1,
        zstd_level: 3,
        manifest: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/smolvla-base-manifest.json"),
        seed: 0x5eed,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            // cargo bench passes `--bench` to harness-less targets.
            "--bench" => {}
            "--scale" => {
                o.scale = val("--scale")?
                    .parse()
                    .map_err(|e| format!("--scale: {e}"))?;
                if !(o.scale > 0.0 && o.scale <= 1.0) {
                    return Err("--scale must be in (0, 1]".into());
                }
            }
            "--reps" => {
                o.reps = val("--reps")?.parse().map_err(|e| format!("--reps: {e}"))?;
                o.reps = o.reps.max(1);
            }
            "--warmup" => o.warmup = val("--warmup")?.parse().map_err(|e| format!("{e}"))?,
            "--zstd-level" => {
                o.zstd_level = val("--zstd-level")?.parse().map_err(|e| format!("{e}"))?
            }
            "--manifest" => o.manifest = PathBuf::from(val("--manifest")?),
            "--seed" => o.seed = val("--seed")?.parse().map_err(|e| format!("{e}"))?,
            "-h" | "--help" => {
                return Err("usage: federation [--scale F] [--reps N] [--warmup N] \
                            [--zstd-level L] [--manifest PATH] [--seed S]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// Trainable tensor names and shapes from the SmolVLA manifest, first dims scaled by `scale`.
fn trainable_spec(path: &PathBuf, scale: f64) -> Result<ModelSpec, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let params = json["parameters"]
        .as_object()
        .ok_or("manifest has no `parameters` object")?;
    let mut tensors = BTreeMap::new();
    for (name, p) in params {
        if p["trainable"].as_bool() != Some(true) {
            continue;
        }
        let mut shape: Vec<usize> = p["shape"]
            .as_array()
            .ok_or(format!("{name}: no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .ok_or(format!("{name}: bad dim"))
            })
            .collect::<Result<_, _>>()?;
        if let Some(d0) = shape.first_mut() {
            *d0 = ((*d0 as f64 * scale).round() as usize).max(1);
        }
        tensors.insert(name.clone(), shape);
    }
    if tensors.is_empty() {
        return Err("manifest lists no trainable parameters".into());
    }
    Ok(ModelSpec { tensors })
}

/// SplitMix64: tiny, fast, deterministic across crate versions.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal pair (Box–Muller).
    fn normal2(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let t = std::f64::consts::TAU * self.uniform();
        (r * t.cos(), r * t.sin())
    }
}

const REL_SCALE: f64 = 1e-4;
const ROW_SIGMA: f64 = 0.5;
const OUTLIER_P: f64 = 0.01;
const OUTLIER_MUL: f64 = 10.0;

/// Synthetic fine-tuning delta: for a tensor with weight scale σ_w and row r,
/// Δ = 1e-4 · σ_w · ρ_r · z, where ρ_r = exp(0.5·N(0,1)) is a per-row (first-dim) scale and
/// z ~ N(0,1) with probability 0.99, N(0,10²) with probability 0.01 (heavy tail).
/// σ_w = 1/√fan_in for ≥2-d tensors (fan_in = numel / dim 0), 1 for 1-d tensors named `*norm*`,
/// 0.02 for other 1-d tensors (biases).
fn synth_delta(spec: &ModelSpec, seed: u64) -> TensorSet {
    let mut rng = Rng(seed);
    let mut set = TensorSet::new();
    for (name, shape) in &spec.tensors {
        let numel: usize = shape.iter().product();
        let (rows, sigma_w) = if shape.len() >= 2 {
            let fan_in = (numel / shape[0]).max(1);
            (shape[0], 1.0 / (fan_in as f64).sqrt())
        } else if name.contains("norm") {
            (1, 1.0)
        } else {
            (1, 0.02)
        };
        let row_len = numel / rows.max(1);
        let mut data = Vec::with_capacity(numel);
        for _ in 0..rows {
            let rho = (ROW_SIGMA * rng.normal2().0).exp();
            let s = REL_SCALE * sigma_w * rho;
            let mut i = 0;
            while i < row_len {
                let (a, b) = rng.normal2();
                for z in [a, b].into_iter().take(row_len - i) {
                    let z = if rng.uniform() < OUTLIER_P {
                        z * OUTLIER_MUL
                    } else {
                        z
                    };
                    data.push((s * z) as f32);
                    i += 1;
                }
            }
        }
        set.insert(
            name.clone(),
            Tensor {
                shape: shape.clone(),
                data,
            },
        );
    }
    set
}

/// Median of `reps` timed runs after `warmup` untimed ones; also returns the last result.
fn time<T>(warmup: usize, reps: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    for _ in 0..warmup {
        black_box(f());
    }
    let mut times = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = black_box(f());
        times.push(t0.elapsed());
        last = Some(out);
    }
    times.sort();
    (times[times.len() / 2], last.expect("reps >= 1"))
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let spec = match trainable_spec(&opts.manifest, opts.scale) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("federation bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let f32_bytes = spec.f32_bytes();
    let started = Instant::now();

    println!("zk0 federation bench (shared-proto)");
    println!(
        "machine: {cores} cores available ({} {}), build: {}",
        std::env::consts::ARCH,
        std::env::consts::OS,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "delta: SYNTHETIC (no real fine-tuning delta yet), shapes of SmolVLA's trainable set \
         from {}",
        opts.manifest
            .file_name()
            .map_or("?".into(), |n| n.to_string_lossy())
    );
    println!(
        "       {} tensors, {} params ({:.1} MB as f32), scale {}",
        spec.tensors.len(),
        spec.numel(),
        f32_bytes as f64 / 1e6,
        opts.scale
    );
    println!(
        "       values: 1e-4·σ_w·ρ_row·z, ρ_row = exp(0.5·N(0,1)), z ~ N(0,1) w.p. 0.99 else \
         N(0,10²); σ_w = 1/√fan_in (≥2-d), 1 (norms), 0.02 (biases); seed {:#x}",
        opts.seed
    );
    println!(
        "timing: median of {} reps after {} warm-up, single thread; MB = 10⁶ bytes of f32 delta",
        opts.reps, opts.warmup
    );

    let delta = synth_delta(&spec, opts.seed);
    let cap = f32_bytes.saturating_mul(2).saturating_add(16 << 20);

    println!();
    println!(
        "{:<18} {:>12} {:>12} {:>10} {:>12} {:>12}",
        "codec (+zstd-L)", "encode MB/s", "decode MB/s", "ratio", "encoded MB", "rel. L2 err"
    );
    let codecs = [
        Codec::F32,
        Codec::Bf16,
        Codec::Int8,
        Codec::TopK { fraction: 0.01 },
        Codec::TopK { fraction: 0.1 },
    ];
    let norm = shared_proto::tensor::l2_norm_sq(&delta).sqrt();
    for codec in codecs {
        let eo = EncodeOptions {
            codec,
            zstd_level: opts.zstd_level,
        };
        let (t_enc, blob) = time(opts.warmup, opts.reps, || {
            codec::encode_delta(black_box(&delta), &eo, None).expect("encode")
        });
        let (t_dec, decoded) = time(opts.warmup, opts.reps, || {
            codec::decode_delta(black_box(&blob), &spec, cap).expect("decode")
        });
        let err: f64 = delta
            .iter()
            .map(|(n, t)| {
                t.data
                    .iter()
                    .zip(&decoded[n].data)
                    .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            .sqrt();
        drop(decoded);
        let err = if err == 0.0 {
            "0 (exact)".to_string()
        } else {
            format!("{:.2e}", err / norm)
        };
        println!(
            "{:<18} {:>12.0} {:>12.0} {:>10.2} {:>12.2} {:>12}",
            format!("{codec}+zstd-{}", opts.zstd_level),
            mb_per_s(f32_bytes, t_enc),
            mb_per_s(f32_bytes, t_dec),
            f32_bytes as f64 / blob.len() as f64,
            blob.len() as f64 / 1e6,
            err
        );
    }

    // Aggregation: the aggregator folds each decoded delta into one f32 accumulator,
    // tensor by tensor: `acc += w·Δ` (aggregator::aggregate::Accumulator::add; the same loop as
    // shared_proto::codec::apply_delta). Baseline: memcpy of the same tensors (copy_from_slice).
    // Traffic: accumulate reads acc and Δ and writes acc (12 B/param); memcpy reads and writes
    // once (8 B/param).
    let mut acc: TensorSet = delta
        .iter()
        .map(|(n, t)| (n.clone(), Tensor::zeros(t.shape.clone())))
        .collect();
    let mut dst = acc.clone();
    let (t_copy, ()) = time(opts.warmup.max(1), opts.reps, || {
        for (d, s) in dst.values_mut().zip(delta.values()) {
            d.data.copy_from_slice(black_box(&s.data));
        }
        black_box(&mut dst);
    });
    let w = black_box(0.37f32);
    let (t_acc, ()) = time(opts.warmup.max(1), opts.reps, || {
        codec::apply_delta(&mut acc, black_box(&delta), w);
        black_box(&mut acc);
    });
    let params = spec.numel();
    let copy_bw = (8 * params) as f64 / 1e9 / t_copy.as_secs_f64();
    let acc_bw = (12 * params) as f64 / 1e9 / t_acc.as_secs_f64();
    println!();
    println!(
        "{:<30} {:>10} {:>12} {:>10}",
        "aggregation (f32, 1 thread)", "ms", "Mparam/s", "GB/s"
    );
    println!(
        "{:<30} {:>10.1} {:>12.0} {:>10.2}",
        "memcpy (8 B/param)",
        t_copy.as_secs_f64() * 1e3,
        params as f64 / 1e6 / t_copy.as_secs_f64(),
        copy_bw
    );
    println!(
        "{:<30} {:>10.1} {:>12.0} {:>10.2}",
        "acc += w·Δ (12 B/param)",
        t_acc.as_secs_f64() * 1e3,
        params as f64 / 1e6 / t_acc.as_secs_f64(),
        acc_bw
    );
    println!(
        "accumulate bandwidth = {:.2} × memcpy bandwidth (time per param: {:.2} × memcpy)",
        acc_bw / copy_bw,
        t_acc.as_secs_f64() / t_copy.as_secs_f64()
    );
    println!();
    println!("total bench time {:.1} s", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}
