//! `cargo xtask bench infer`: per-chunk latency and peak RSS of one action chunk (prefix +
//! 10 denoising steps) in three implementations, each in its own process, in the same run:
//! - `ort`: the ONNX export (`zk0-train export-onnx`) on ONNX Runtime through `zk0-agent infer
//!   --bench` (libtorch-free; what the robot runs);
//! - `tch`: zk0's libtorch model, `SmolVlaPolicy::predict_action_chunk` (eager);
//! - `ort-int8`: the same with `--int8` (the prefix's linear layers dynamically quantized);
//! - `lerobot`: LeRobot's `predict_action_chunk` (trainer/benches/lerobot_infer_chunk.py
//!   through the LeRobot venv in `ZK0_LEROBOT_PYTHON`), the baseline of the ratios.
//!
//! Two configs, both sides from the same checkpoint files:
//! - `tiny`: the vendored parity fixture (tests/fixtures/smolvla-tiny);
//! - `full`: `lerobot/smolvla_base`'s architecture (SmolVLM2-500M cut to 16 layers, 512² images,
//!   48 language tokens, 50-action chunks) with two 480×640 cameras, randomly initialised here.
//!
//! Options (after `--`): `--only tiny|full`, `--threads N[,M]` (default `1,<all cores>`),
//! `--tiny-n N`, `--full-n N` (timed chunks after one warm-up), `--keep DIR` (work dir kept;
//! the full-size checkpoint and export are ~3.5 GB).
//!
//! The ORT side times the graphs on an already resized observation; tch and LeRobot resize
//! inside `predict_action_chunk` (a few ms at full size, included in theirs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use smolvla::{Batch, SmolVlaConfig, SmolVlaPolicy, Trace, VlmConfig};
use tch::{Device, Kind, Tensor};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/smolvla-tiny"
);
const LEROBOT_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/benches/lerobot_infer_chunk.py"
);

struct Opts {
    only: Option<String>,
    threads: Vec<usize>,
    tiny_n: usize,
    full_n: usize,
    keep: Option<PathBuf>,
    /// `--side tch --model DIR --n N --threads T`: this process is the tch side.
    side_tch: Option<(PathBuf, usize, usize)>,
}

fn parse_opts() -> Result<Opts, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut o = Opts {
        only: None,
        threads: if cores > 1 { vec![1, cores] } else { vec![1] },
        tiny_n: 20,
        full_n: 3,
        keep: None,
        side_tch: None,
    };
    let (mut side, mut model, mut n, mut thr) = (None, None, 1, 1);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |v: String, name: &str| -> Result<usize, String> {
            v.parse()
                .ok()
                .filter(|&n: &usize| n > 0)
                .ok_or_else(|| format!("{name}: positive number"))
        };
        match a.as_str() {
            "--only" => o.only = Some(val("--only")?),
            "--threads" => {
                let v = val("--threads")?;
                o.threads = v
                    .split(',')
                    .map(|t| num(t.to_string(), "--threads"))
                    .collect::<Result<_, _>>()?;
                thr = o.threads[0];
            }
            "--tiny-n" => o.tiny_n = num(val("--tiny-n")?, "--tiny-n")?,
            "--full-n" => o.full_n = num(val("--full-n")?, "--full-n")?,
            "--keep" => o.keep = Some(PathBuf::from(val("--keep")?)),
            "--side" => side = Some(val("--side")?),
            "--model" => model = Some(PathBuf::from(val("--model")?)),
            "--n" => n = num(val("--n")?, "--n")?,
            "--bench" => {}
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if let Some(s) = side {
        if s != "tch" {
            return Err(format!("--side tch, not {s:?}"));
        }
        o.side_tch = Some((model.ok_or("--side tch needs --model")?, n, thr));
    }
    if let Some(v) = &o.only {
        if v != "tiny" && v != "full" {
            return Err(format!("--only tiny|full, not {v:?}"));
        }
    }
    Ok(o)
}

/// The tch side, in this (child) process: `predict_action_chunk` on a fixed random batch.
fn tch_side(model: &Path, n: usize, threads: usize) -> Value {
    tch::set_num_threads(threads as i32);
    let t0 = std::time::Instant::now();
    let policy = SmolVlaPolicy::from_dir(model, Device::Cpu).unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = &policy.config;
    let opts = (Kind::Float, Device::Cpu);
    tch::manual_seed(0);
    let mut batch = Batch::new();
    for key in cfg.image_keys() {
        let s = &cfg.input_features.get(&key).unwrap().shape;
        batch.insert(key.clone(), Tensor::rand([1, s[0], s[1], s[2]], opts));
    }
    let sd = cfg.input_features.get("observation.state").unwrap().shape[0];
    batch.insert("observation.state".into(), Tensor::randn([1, sd], opts));
    let l = cfg.tokenizer_max_length;
    batch.insert(
        "observation.language.tokens".into(),
        (Tensor::arange(l, (Kind::Int64, Device::Cpu)).remainder(50) + 1).unsqueeze(0),
    );
    batch.insert(
        "observation.language.attention_mask".into(),
        Tensor::ones([1, l], (Kind::Bool, Device::Cpu)),
    );
    let noise = Tensor::randn([1, cfg.chunk_size, cfg.max_action_dim], opts);
    let mut times = Vec::new();
    for i in 0..=n {
        let s = std::time::Instant::now();
        let _ = policy
            .predict_action_chunk(&batch, Some(&noise), &mut Trace::off())
            .unwrap();
        if i > 0 {
            times.push(s.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    json!({
        "chunk_ms": {"p50": times[times.len() / 2], "p99": times[((times.len() - 1) as f64 * 0.99).round() as usize],
                     "mean": times.iter().sum::<f64>() / times.len() as f64},
        "peak_rss_kib": zk0_host::peak_rss_kib(),
        "load_s": load_s,
        "threads": threads,
    })
}

struct Case {
    name: &'static str,
    checkpoint: PathBuf,
    export: PathBuf,
    n: usize,
}

/// smolvla_base's architecture with two SO-100 cameras, random weights. `load_vlm_weights:
/// false` makes LeRobot build the backbone from `vlm_config.json` instead of downloading
/// SmolVLM2's weights (the checkpoint's own weights are loaded over it either way).
fn full_checkpoint(dir: &Path) {
    if dir.join("model.safetensors").is_file() {
        return;
    }
    let cfg: SmolVlaConfig = serde_json::from_value(json!({
        "type": "smolvla",
        "input_features": {
            "observation.state": {"type": "STATE", "shape": [6]},
            "observation.images.front": {"type": "VISUAL", "shape": [3, 480, 640]},
            "observation.images.wrist": {"type": "VISUAL", "shape": [3, 480, 640]}
        },
        "output_features": {"action": {"type": "ACTION", "shape": [6]}},
        "load_vlm_weights": false
    }))
    .unwrap();
    tch::manual_seed(0);
    let p = SmolVlaPolicy::new(cfg, VlmConfig::smolvlm2_500m(), Device::Cpu).unwrap();
    p.save_pretrained(dir).unwrap();
}

fn export(case_ckpt: &Path, out: &Path, extra: &[&str]) {
    if out.join("export.json").is_file() {
        return;
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zk0-train"));
    cmd.args(["export-onnx", "--model"])
        .arg(case_ckpt)
        .arg("--out")
        .arg(out)
        .args(extra);
    common::run_json(cmd, "zk0-train export-onnx").unwrap();
}

fn agent() -> PathBuf {
    // The ORT side's host code: the workspace's zk0-agent (xtask builds it first).
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("zk0-agent");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "no zk0-agent in {}: run `cargo build -p edge-agent`",
        target.display()
    );
}

fn mib(v: &Value) -> f64 {
    v["peak_rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0
}

fn main() {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench infer: {e}");
            std::process::exit(2);
        }
    };
    if let Some((model, n, thr)) = &opts.side_tch {
        println!("{}", tch_side(model, *n, *thr));
        return;
    }
    let py = match std::env::var_os("ZK0_LEROBOT_PYTHON").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            eprintln!("bench infer: ZK0_LEROBOT_PYTHON is not set (LeRobot is the baseline): run `cargo xtask setup --lerobot`");
            std::process::exit(2);
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = opts
        .keep
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let mut cases = Vec::new();
    if opts.only.as_deref() != Some("full") {
        cases.push(Case {
            name: "tiny",
            checkpoint: PathBuf::from(FIXTURE),
            export: root.join("tiny/export"),
            n: opts.tiny_n,
        });
    }
    if opts.only.as_deref() != Some("tiny") {
        let ckpt = root.join("full/checkpoint");
        eprintln!(
            "full-size checkpoint (random weights) in {} ...",
            ckpt.display()
        );
        full_checkpoint(&ckpt);
        cases.push(Case {
            name: "full",
            checkpoint: ckpt,
            export: root.join("full/export"),
            n: opts.full_n,
        });
    }
    println!("one action chunk (prefix + 10 denoising steps), batch 1, CPU, float32; ratios against LeRobot");
    println!(
        "{:5} {:8} {:>4} {:>10} {:>10} {:>8} {:>12} {:>8}",
        "model", "impl", "thr", "p50 ms", "p99 ms", "×LeRobot", "peak RSS MiB", "×LeRobot"
    );
    let mut failed = false;
    for case in &cases {
        let int8 = case.export.with_file_name("export-int8");
        export(&case.checkpoint, &case.export, &[]);
        export(&case.checkpoint, &int8, &["--int8"]);
        for &thr in &opts.threads {
            let ort = |dir: &Path| {
                let mut c = Command::new(agent());
                c.args(["infer", "--model"]).arg(dir).args([
                    "--bench",
                    &case.n.to_string(),
                    "--threads",
                    &thr.to_string(),
                ]);
                c
            };
            let mut tch_cmd = Command::new(std::env::current_exe().unwrap());
            tch_cmd
                .args(["--side", "tch", "--model"])
                .arg(&case.checkpoint)
                .args(["--n", &case.n.to_string(), "--threads", &thr.to_string()]);
            let mut lr = Command::new(&py);
            lr.arg(LEROBOT_SCRIPT)
                .arg("--model")
                .arg(&case.checkpoint)
                .args(["--n", &case.n.to_string(), "--threads", &thr.to_string()])
                .env("HF_HUB_OFFLINE", "1");
            let results: Vec<(&str, Result<Value, String>)> = vec![
                (
                    "lerobot",
                    common::run_json(lr, "LeRobot predict_action_chunk"),
                ),
                ("tch", common::run_json(tch_cmd, "tch predict_action_chunk")),
                (
                    "ort",
                    common::run_json(ort(&case.export), "zk0-agent infer --bench"),
                ),
                (
                    "ort-int8",
                    common::run_json(ort(&int8), "zk0-agent infer --bench (int8)"),
                ),
            ];
            let base = results[0].1.as_ref().ok().cloned();
            for (side, r) in &results {
                match r {
                    Ok(v) => {
                        let p50 = v["chunk_ms"]["p50"].as_f64().unwrap_or(f64::NAN);
                        let (lt, lm) = base
                            .as_ref()
                            .map(|b| {
                                (
                                    p50 / b["chunk_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
                                    mib(v) / mib(b),
                                )
                            })
                            .unwrap_or((f64::NAN, f64::NAN));
                        println!(
                            "{:5} {:8} {:>4} {:>10.1} {:>10.1} {:>8.2} {:>12.0} {:>8.2}",
                            case.name,
                            side,
                            thr,
                            p50,
                            v["chunk_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
                            lt,
                            mib(v),
                            lm
                        );
                        if side.starts_with("ort") {
                            println!(
                                "{:5} {:8} {:>4}   prefix {:.1} ms, denoise step {:.2} ms",
                                "",
                                "",
                                "",
                                v["prefix_ms"].as_f64().unwrap_or(f64::NAN),
                                v["denoise_step_ms"].as_f64().unwrap_or(f64::NAN)
                            );
                        }
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
