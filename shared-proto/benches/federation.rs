//! `cargo xtask bench federation` (= `cargo bench -p shared-proto --bench federation -- [opts]`).
//!
//! Prints, in one run:
//! - per codec (`f32`, `bf16`, `int8`, `topk:0.01`, `topk:0.1`, each + zstd): encode and decode
//!   MB/s (MB = 10⁶ bytes of f32 delta in or out per second), the compression ratio
//!   (f32 bytes / encoded bytes) and the relative L2 error, for each delta:
//!   1. REAL (when given): `trained − global` of a real `zk0-train train` run, read from two
//!      safetensors files (`--real-global`, `--real-trained`; `cargo xtask bench federation`
//!      makes them by running zk0-train on the tiny SmolVLA fixture, see xtask/src/tasks.rs);
//!   2. SYNTHETIC: shaped like SmolVLA's full trainable set (~100M parameters), names and shapes
//!      from the `trainable: true` parameters of `tests/fixtures/smolvla-base-manifest.json`,
//!      values drawn as described in [`synth_delta`] (the real model is not available offline);
//! - the aggregator's streaming weighted accumulate `acc += w·Δ` over f32, as a fraction of the
//!   memcpy bandwidth measured in the same run on the same tensors (the synthetic delta).
//!
//! This crate never links libtorch: the real delta comes from files that the zk0-train binary
//! wrote.
//!
//! Options: `--real-global FILE --real-trained FILE [--real-label TEXT]` (the real delta and
//! what made it), `--scale F` (shrink every synthetic tensor's first dimension by F; default
//! 1 = the full ~100M parameters), `--reps N` (timed repetitions, median reported; default 5),
//! `--warmup N` (untimed runs first; default 1), `--zstd-level L` (default 3),
//! `--manifest PATH`, `--seed S`. An unoptimised build (`cargo test --benches`) defaults to
//! `--scale 0.01 --reps 1`.

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
    real_global: Option<PathBuf>,
    real_trained: Option<PathBuf>,
    real_label: String,
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
        real_global: None,
        real_trained: None,
        real_label: "(no description given)".into(),
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
            "--real-global" => o.real_global = Some(PathBuf::from(val("--real-global")?)),
            "--real-trained" => o.real_trained = Some(PathBuf::from(val("--real-trained")?)),
            "--real-label" => o.real_label = val("--real-label")?,
            "-h" | "--help" => {
                return Err("usage: federation [--real-global FILE --real-trained FILE \
                            [--real-label TEXT]] [--scale F] [--reps N] [--warmup N] \
                            [--zstd-level L] [--manifest PATH] [--seed S]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.real_global.is_some() != o.real_trained.is_some() {
        return Err("--real-global and --real-trained go together".into());
    }
    Ok(o)
}

/// The real fine-tuning delta `trained − global` (f32) over the trained file's tensors, as an
/// agent computes it (every trained tensor must be in the global file with the same shape).
fn real_delta(global: &PathBuf, trained: &PathBuf) -> Result<TensorSet, String> {
    let read = |p: &PathBuf| -> Result<TensorSet, String> {
        let bytes = std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
        shared_proto::tensor::read_safetensors(&bytes)
            .map(|(t, _)| t)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let (g, t) = (read(global)?, read(trained)?);
    let mut delta = TensorSet::new();
    for (name, tt) in t {
        let gt = g.get(&name).ok_or(format!(
            "{name} is in {} but not in {}",
            trained.display(),
            global.display()
        ))?;
        if gt.shape != tt.shape {
            return Err(format!(
                "{name}: shape {:?} trained vs {:?} global",
                tt.shape, gt.shape
            ));
        }
        let data = tt.data.iter().zip(&gt.data).map(|(a, b)| a - b).collect();
        delta.insert(
            name,
            Tensor {
                shape: tt.shape,
                data,
            },
        );
    }
    if delta.is_empty() {
        return Err(format!("{} holds no tensors", trained.display()));
    }
    // Codec errors are relative to ‖Δ‖: a zero delta (no steps taken) would measure nothing.
    if shared_proto::tensor::l2_norm_sq(&delta) == 0.0 {
        return Err(format!(
            "{} equals {}: the delta is zero (did the training take no step?)",
            trained.display(),
            global.display()
        ));
    }
    Ok(delta)
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

/// One row per codec: encode/decode speed, ratio, size and error on `delta`.
fn codec_table(delta: &TensorSet, opts: &Opts) {
    let spec = ModelSpec::from_tensors(delta);
    let f32_bytes = spec.f32_bytes();
    let cap = f32_bytes.saturating_mul(2).saturating_add(16 << 20);
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
    let norm = shared_proto::tensor::l2_norm_sq(delta).sqrt();
    for codec in codecs {
        let eo = EncodeOptions {
            codec,
            zstd_level: opts.zstd_level,
        };
        let (t_enc, blob) = time(opts.warmup, opts.reps, || {
            codec::encode_delta(black_box(delta), &eo, None).expect("encode")
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
}

/// Size and value statistics of a delta, for the case header.
fn describe(delta: &TensorSet) -> String {
    let spec = ModelSpec::from_tensors(delta);
    let n = spec.numel().max(1);
    let zeros = delta
        .values()
        .map(|t| t.data.iter().filter(|&&x| x == 0.0).count())
        .sum::<usize>();
    let rms = (shared_proto::tensor::l2_norm_sq(delta) / n as f64).sqrt();
    format!(
        "{} tensors, {} params ({:.2} MB as f32), rms {:.2e}, {:.1} % exact zeros",
        spec.tensors.len(),
        spec.numel(),
        spec.f32_bytes() as f64 / 1e6,
        rms,
        100.0 * zeros as f64 / n as f64
    )
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let real = match (&opts.real_global, &opts.real_trained) {
        (Some(g), Some(t)) => match real_delta(g, t) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("federation bench: real delta: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let spec = match trainable_spec(&opts.manifest, opts.scale) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("federation bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
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
        "timing: median of {} reps after {} warm-up, single thread; MB = 10⁶ bytes of f32 delta",
        opts.reps, opts.warmup
    );

    println!();
    match &real {
        Some(d) => {
            println!(
                "delta 1: REAL fine-tuning delta (trained − global, f32): {}",
                opts.real_label
            );
            println!("       {}", describe(d));
            println!();
            codec_table(d, &opts);
        }
        None => println!(
            "delta 1: REAL fine-tuning delta: not given (`cargo xtask bench federation` makes one)"
        ),
    }

    let delta = synth_delta(&spec, opts.seed);
    println!();
    println!(
        "delta 2: SYNTHETIC, shapes of SmolVLA's trainable set from {}, scale {}",
        opts.manifest
            .file_name()
            .map_or("?".into(), |n| n.to_string_lossy()),
        opts.scale
    );
    println!("       {}", describe(&delta));
    println!(
        "       values: 1e-4·σ_w·ρ_row·z, ρ_row = exp(0.5·N(0,1)), z ~ N(0,1) w.p. 0.99 else \
         N(0,10²); σ_w = 1/√fan_in (≥2-d), 1 (norms), 0.02 (biases); seed {:#x}",
        opts.seed
    );
    println!();
    codec_table(&delta, &opts);

    // Aggregation: the aggregator folds each decoded delta into the f32 global model, tensor by
    // tensor: `g += f·Δ` (aggregator::aggregate::ServerStep::add_tensor; the same loop as
    // shared_proto::codec::apply_delta). Baseline: memcpy of the same tensors (copy_from_slice).
    // Traffic: the fold reads g and Δ and writes g (12 B/param); memcpy reads and writes
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
        "aggregation on delta 2 (the synthetic one, {} params)",
        spec.numel()
    );
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
