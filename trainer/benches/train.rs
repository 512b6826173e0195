//! `cargo xtask bench train`: training steps/s and peak RSS of `zk0-train` against LeRobot's own
//! SmolVLA training step, on the same machine in the same run.
//!
//! Three configs, both sides built from the same `config.json`, `vlm_config.json` and
//! `model.safetensors` (so they are the same model and the same weights):
//! - `tiny`: the vendored parity fixture (tests/fixtures/smolvla-tiny);
//! - `small`: SmolVLA's full-size architecture at a quarter of its widths (SmolVLM2-500M's text
//!   960→240, vision 768→192, same head counts, full vocabulary) with 4 VLM layers, 4 vision
//!   layers, 256×256 images and 50-step action chunks, randomly initialised here;
//! - `full`: `lerobot/smolvla_base`'s architecture (SmolVLM2-500M cut to 16 layers, 512² images,
//!   450 M parameters, 99.9 M trainable with the default freeze), random weights, 1 and 2
//!   cameras at 480×640, batch 1 and 4 (the matrix `--cameras`/`--batch` set).
//!
//! Each side runs as its own process (`zk0-train bench`, trainer/benches/lerobot_train_step.py
//! through the LeRobot venv in `ZK0_LEROBOT_PYTHON`) on the same batch file with the same
//! thread count; a step is forward with the loss, backward, grad clip and AdamW; warmup steps are
//! excluded from the timing; each process reports its own peak RSS (VmHWM). Without the venv
//! the LeRobot side is skipped with a message and only zk0's figures are printed.
//!
//! Options (after `--`): `--threads N` (default: all cores), `--only tiny|small|full`,
//! `--tiny-steps N`, `--small-steps N`, `--full-steps N`, `--warmup N`, `--precision
//! f32,bf16` (both sides autocast to bf16 for `bf16`; default `f32`, and both for `--only
//! full`), `--bf16` (= `--precision bf16`), `--cameras 1,2` and `--batch 1,4` (the full-size
//! matrix), `--keep DIR` (reuse/keep the work dir: the full-size checkpoint is 1.8 GB).
//! `full` runs only when asked for (`--only full`): at 2–20 s a step on 2 cores its matrix
//! takes about 10 minutes.
//!
//! `--only round` ([`round`]) is a local round end to end instead: `zk0-train train` against
//! `lerobot-train` on a generated 2-camera 640×480 AV1 dataset, data loading included. Its
//! options: `--round-model tiny|small|full` (default `small`), `--round-steps N` (20),
//! `--round-batch N` (8), `--round-episodes N` (20), `--round-frames N` (frames per episode,
//! 60), `--round-dataset DIR` (where the dataset is generated once and reused), `--workers
//! 0,1,...` (LeRobot's `num_workers`, one LeRobot run each; default 1), `--round-runs N` (runs
//! of each side, alternating order; 2), plus `--threads` and `--keep`.

mod common;
#[path = "train/round.rs"]
mod round;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use smolvla::{SmolVlaConfig, SmolVlaPolicy, VlmConfig};
use tch::{Device, Kind, Tensor};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/smolvla-tiny"
);
const LEROBOT_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/lerobot_train_step.py");

#[derive(Debug)]
struct Opts {
    threads: usize,
    only: Option<String>,
    tiny_steps: usize,
    small_steps: usize,
    full_steps: usize,
    warmup: usize,
    precisions: Vec<Precision>,
    cameras: Vec<usize>,
    batches: Vec<i64>,
    keep: Option<PathBuf>,
    round_model: String,
    round_steps: usize,
    round_batch: usize,
    round_episodes: usize,
    round_frames: usize,
    round_dataset: Option<PathBuf>,
    round_runs: usize,
    workers: Vec<usize>,
}

/// The matrix products' precision of one run (both sides alike).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Precision {
    F32,
    Bf16,
}

impl Precision {
    fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// `1,2` → `[1, 2]` (positive numbers only).
fn list<T: std::str::FromStr + PartialOrd + Default>(
    v: &str,
    name: &str,
) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|x| x.trim().parse::<T>().ok().filter(|n| *n > T::default()))
        .collect::<Option<Vec<T>>>()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("{name} needs a list of positive numbers, not {v:?}"))
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        only: None,
        tiny_steps: 40,
        small_steps: 8,
        full_steps: 3,
        warmup: 2,
        precisions: Vec::new(),
        cameras: vec![1, 2],
        batches: vec![1, 4],
        keep: None,
        round_model: "small".into(),
        round_steps: 20,
        round_batch: 8,
        round_episodes: 20,
        round_frames: 60,
        round_dataset: None,
        round_runs: 2,
        workers: vec![1],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--threads" => o.threads = num("--threads")?,
            "--tiny-steps" => o.tiny_steps = num("--tiny-steps")?,
            "--small-steps" => o.small_steps = num("--small-steps")?,
            "--full-steps" => o.full_steps = num("--full-steps")?,
            "--warmup" => o.warmup = num("--warmup")?,
            "--bf16" => o.precisions = vec![Precision::Bf16],
            "--precision" => {
                let v = args.next().unwrap_or_default();
                o.precisions = v
                    .split(',')
                    .map(|p| match p.trim() {
                        "f32" => Ok(Precision::F32),
                        "bf16" => Ok(Precision::Bf16),
                        other => Err(format!("--precision f32|bf16[,...], not {other:?}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--cameras" => o.cameras = list(&args.next().unwrap_or_default(), "--cameras")?,
            "--batch" => o.batches = list(&args.next().unwrap_or_default(), "--batch")?,
            "--round-steps" => o.round_steps = num("--round-steps")?,
            "--round-batch" => o.round_batch = num("--round-batch")?,
            "--round-episodes" => o.round_episodes = num("--round-episodes")?,
            "--round-frames" => o.round_frames = num("--round-frames")?,
            "--round-runs" => o.round_runs = num("--round-runs")?,
            "--round-model" => {
                let v = args.next().unwrap_or_default();
                if !["tiny", "small", "full"].contains(&v.as_str()) {
                    return Err(format!("--round-model tiny|small|full, not {v:?}"));
                }
                o.round_model = v;
            }
            "--round-dataset" => {
                o.round_dataset = Some(PathBuf::from(
                    args.next().ok_or("--round-dataset needs a directory")?,
                ))
            }
            "--workers" => {
                let v = args.next().unwrap_or_default();
                o.workers = v
                    .split(',')
                    .map(|w| w.trim().parse::<usize>().ok())
                    .collect::<Option<Vec<_>>>()
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| format!("--workers needs a list of numbers, not {v:?}"))?;
            }
            "--keep" => {
                o.keep = Some(PathBuf::from(
                    args.next().ok_or("--keep needs a directory")?,
                ))
            }
            "--only" => {
                let v = args.next().unwrap_or_default();
                if !["tiny", "small", "full", "round"].contains(&v.as_str()) {
                    return Err(format!("--only tiny|small|full|round, not {v:?}"));
                }
                o.only = Some(v);
            }
            // cargo bench passes --bench to harness-less targets.
            "--bench" => {}
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.precisions.is_empty() {
        o.precisions = if o.only.as_deref() == Some("full") {
            vec![Precision::F32, Precision::Bf16]
        } else {
            vec![Precision::F32]
        };
    }
    Ok(o)
}

/// One benchmark configuration: a checkpoint directory and a batch file for it.
struct Case {
    name: String,
    dir: PathBuf,
    inputs: PathBuf,
    steps: usize,
    batch: i64,
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// A random batch at the model boundary for `dir`'s config (what LeRobot's preprocessor
/// outputs), plus the flow-matching `noise` and `time`, in the fixture inputs format.
/// `valid` of the `tokens` language positions are real tokens, the rest padding.
fn write_inputs(dir: &Path, batch: i64, tokens: i64, valid: i64, out: &Path) {
    let cfg = SmolVlaConfig::from_file(dir.join("config.json")).unwrap();
    let vlm = VlmConfig::from_file(dir.join("vlm_config.json")).unwrap();
    let opts = (Kind::Float, Device::Cpu);
    let feature = |v: &Value| -> Vec<i64> { serde_json::from_value(v["shape"].clone()).unwrap() };
    let raw = read_json(&dir.join("config.json"));
    let state_dim = feature(&raw["input_features"]["observation.state"])[0];
    let action_dim = feature(&raw["output_features"]["action"])[0];
    let chunk = cfg.chunk_size;
    let mut t: Vec<(String, Tensor)> = Vec::new();
    for cam in cfg.image_keys() {
        let s = feature(&raw["input_features"][cam.as_str()]);
        t.push((cam, Tensor::rand([batch, s[0], s[1], s[2]], opts)));
    }
    t.push((
        "observation.state".into(),
        Tensor::randn([batch, state_dim], opts),
    ));
    t.push((
        "action".into(),
        Tensor::randn([batch, chunk, action_dim], opts),
    ));
    t.push((
        "action_is_pad".into(),
        Tensor::zeros([batch, chunk], (Kind::Uint8, Device::Cpu)),
    ));
    let vocab = vlm.text_config.vocab_size;
    // Ids below 100 avoid the special tokens of real vocabularies.
    t.push((
        "observation.language.tokens".into(),
        Tensor::randint_low(
            100.min(vocab - 1),
            vocab,
            [batch, tokens],
            (Kind::Int64, Device::Cpu),
        ),
    ));
    let positions = Tensor::arange(tokens, (Kind::Int64, Device::Cpu));
    t.push((
        "observation.language.attention_mask".into(),
        positions
            .lt(valid)
            .to_kind(Kind::Uint8)
            .unsqueeze(0)
            .repeat([batch, 1]),
    ));
    t.push((
        "noise".into(),
        Tensor::randn([batch, chunk, cfg.max_action_dim], opts),
    ));
    t.push(("time".into(), Tensor::rand([batch], opts) * 0.999 + 0.001));
    Tensor::write_safetensors(&t, out).unwrap();
}

/// The vendored tiny fixture's checkpoint files.
fn tiny(root: &Path, steps: usize) -> Case {
    let dir = root.join("tiny");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "vlm_config.json", "model.safetensors"] {
        std::fs::copy(Path::new(FIXTURE).join(f), dir.join(f)).unwrap();
    }
    let inputs = root.join("tiny-inputs.safetensors");
    let batch = 8;
    write_inputs(&dir, batch, 12, 12, &inputs);
    Case {
        name: "tiny".into(),
        dir,
        inputs,
        steps,
        batch,
    }
}

/// Quarter-width SmolVLA, 4 layers, random init (same files for both sides).
fn small(root: &Path, steps: usize) -> Case {
    let dir = root.join("small");
    std::fs::create_dir_all(&dir).unwrap();
    let mut vlm = read_json(&Path::new(FIXTURE).join("vlm_config.json"));
    for (k, v) in [
        ("hidden_size", 240),
        ("intermediate_size", 640),
        ("num_attention_heads", 15),
        ("num_key_value_heads", 5),
        ("head_dim", 16),
        ("num_hidden_layers", 4),
        ("vocab_size", 49280),
    ] {
        vlm["text_config"][k] = json!(v);
    }
    for (k, v) in [
        ("hidden_size", 192),
        ("intermediate_size", 768),
        ("num_attention_heads", 12),
        ("num_hidden_layers", 4),
        ("image_size", 256),
        ("patch_size", 16),
    ] {
        vlm["vision_config"][k] = json!(v);
    }
    vlm["scale_factor"] = json!(4);
    write_json(&dir.join("vlm_config.json"), &vlm);
    let mut cfg = read_json(&Path::new(FIXTURE).join("config.json"));
    cfg["input_features"]["observation.images.front"]["shape"] = json!([3, 240, 320]);
    cfg["resize_imgs_with_padding"] = json!([256, 256]);
    cfg["chunk_size"] = json!(50);
    cfg["n_action_steps"] = json!(50);
    cfg["num_vlm_layers"] = json!(4);
    cfg["tokenizer_max_length"] = json!(48);
    write_json(&dir.join("config.json"), &cfg);
    tch::manual_seed(0);
    let policy = SmolVlaPolicy::new(
        SmolVlaConfig::from_file(dir.join("config.json")).unwrap(),
        VlmConfig::from_file(dir.join("vlm_config.json")).unwrap(),
        Device::Cpu,
    )
    .unwrap();
    policy.save_weights(dir.join("model.safetensors")).unwrap();
    let inputs = root.join("small-inputs.safetensors");
    let batch = 4;
    write_inputs(&dir, batch, 24, 24, &inputs);
    Case {
        name: "small".into(),
        dir,
        inputs,
        steps,
        batch,
    }
}

/// smolvla_base's architecture with `cameras` SO-100 cameras at 480×640 (the same weights for
/// every camera count: cameras add no parameters), random init written once under `root`.
/// `load_vlm_weights: false` makes LeRobot build the backbone from `vlm_config.json`.
fn full(root: &Path, cameras: usize, batch: i64, steps: usize) -> Case {
    let weights = root.join("full-weights/model.safetensors");
    let names = ["front", "wrist", "top", "side"];
    assert!(cameras <= names.len(), "at most {} cameras", names.len());
    let mut inputs = serde_json::Map::new();
    inputs.insert(
        "observation.state".into(),
        json!({"type": "STATE", "shape": [6]}),
    );
    for n in &names[..cameras] {
        inputs.insert(
            format!("observation.images.{n}"),
            json!({"type": "VISUAL", "shape": [3, 480, 640]}),
        );
    }
    let cfg: SmolVlaConfig = serde_json::from_value(json!({
        "type": "smolvla",
        "input_features": inputs,
        "output_features": {"action": {"type": "ACTION", "shape": [6]}},
        "load_vlm_weights": false
    }))
    .unwrap();
    if !weights.is_file() {
        println!(
            "full-size weights (random, seed 0) in {} ...",
            weights.display()
        );
        tch::manual_seed(0);
        let p = SmolVlaPolicy::new(cfg.clone(), VlmConfig::smolvlm2_500m(), Device::Cpu).unwrap();
        let (all, trainable) = p.num_parameters();
        println!("  {all} parameters, {trainable} trainable");
        p.save_pretrained(weights.parent().unwrap()).unwrap();
    }
    let dir = root.join(format!("full-{cameras}cam"));
    std::fs::create_dir_all(&dir).unwrap();
    write_json(
        &dir.join("config.json"),
        &serde_json::to_value(&cfg).unwrap(),
    );
    write_json(
        &dir.join("vlm_config.json"),
        &serde_json::to_value(VlmConfig::smolvlm2_500m()).unwrap(),
    );
    let link = dir.join("model.safetensors");
    if !link.is_file() {
        std::fs::hard_link(&weights, &link)
            .or_else(|_| std::fs::copy(&weights, &link).map(|_| ()))
            .unwrap();
    }
    let inputs = root.join(format!("full-{cameras}cam-b{batch}-inputs.safetensors"));
    // A 16-token prompt padded to the tokenizer's 48, as LeRobot's preprocessor pads it.
    write_inputs(&dir, batch, cfg.tokenizer_max_length, 16, &inputs);
    Case {
        name: format!("full {cameras}cam"),
        dir,
        inputs,
        steps,
        batch,
    }
}

/// The options both sides take alike: the case's model, batch and step count, the warmup and
/// bf16 autocast.
fn step_args(cmd: &mut Command, case: &Case, opts: &Opts, precision: Precision) {
    cmd.arg("--model")
        .arg(&case.dir)
        .arg("--inputs")
        .arg(&case.inputs)
        .arg("--steps")
        .arg(case.steps.to_string())
        .arg("--warmup")
        .arg(opts.warmup.to_string());
    if precision == Precision::Bf16 {
        cmd.arg("--bf16");
    }
}

fn lerobot_python() -> Result<PathBuf, String> {
    match std::env::var_os("ZK0_LEROBOT_PYTHON").filter(|v| !v.is_empty()) {
        Some(p) if Path::new(&p).is_file() => Ok(PathBuf::from(p)),
        Some(p) => Err(format!(
            "ZK0_LEROBOT_PYTHON={} does not exist",
            Path::new(&p).display()
        )),
        None => Err("ZK0_LEROBOT_PYTHON is not set".into()),
    }
}

fn mib(v: &Value) -> f64 {
    v["peak_rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0
}

fn row(case: &Case, precision: Precision, side: &str, v: &Value) {
    let sps = v["steps_per_s"].as_f64().unwrap_or(f64::NAN);
    // Per-step milliseconds of each part, from the side's own timers.
    let ms =
        |k: &str| v["phase_seconds"][k].as_f64().unwrap_or(f64::NAN) * 1000.0 / case.steps as f64;
    println!(
        "{:10} {:>3} {:4} {:8} {:>8.3} {:>9.1} {:>12.0} {:>10.4} {:>4}   fwd {:.1} / bwd {:.1} / optim {:.1} ms",
        case.name,
        case.batch,
        precision.name(),
        side,
        sps,
        1000.0 / sps,
        mib(v),
        v["last_loss"].as_f64().unwrap_or(f64::NAN),
        v["threads"],
        ms("forward"),
        ms("backward"),
        ms("optimizer"),
    );
}

/// One side's run of `case` at `precision`: its JSON report, printed as a row.
fn side(
    case: &Case,
    precision: Precision,
    opts: &Opts,
    lerobot: Option<&Path>,
) -> Result<Value, String> {
    let (mut cmd, name) = match lerobot {
        None => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_zk0-train"));
            c.arg("--threads")
                .arg(opts.threads.to_string())
                .arg("bench")
                .arg("--device")
                .arg("cpu");
            (c, "zk0")
        }
        Some(py) => {
            let mut c = Command::new(py);
            c.arg(LEROBOT_SCRIPT)
                .arg("--threads")
                .arg(opts.threads.to_string())
                .env("HF_HUB_OFFLINE", "1");
            (c, "lerobot")
        }
    };
    step_args(&mut cmd, case, opts, precision);
    let v = common::run_json(cmd, &format!("{name} step ({})", case.name))?;
    row(case, precision, name, &v);
    Ok(v)
}

fn main() {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench train: {e}");
            std::process::exit(2);
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = opts
        .keep
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root).unwrap();
    let python = lerobot_python();
    if let Err(why) = &python {
        println!(
            "LeRobot side SKIPPED: {why} (run `cargo xtask setup --lerobot`; `cargo xtask bench` \
             exports it); printing zk0-train's figures only"
        );
    }
    if opts.only.as_deref() == Some("round") {
        let ok = round::run(&opts, &root, python.as_ref().ok().map(PathBuf::as_path));
        // exit() runs no destructors: remove the work dir (checkpoints) first.
        drop(tmp);
        std::process::exit(if ok { 0 } else { 1 });
    }
    let mut cases = Vec::new();
    match opts.only.as_deref() {
        Some("tiny") => cases.push(tiny(&root, opts.tiny_steps)),
        Some("small") => cases.push(small(&root, opts.small_steps)),
        Some("full") => {
            for &cams in &opts.cameras {
                for &b in &opts.batches {
                    cases.push(full(&root, cams, b, opts.full_steps));
                }
            }
        }
        _ => {
            cases.push(tiny(&root, opts.tiny_steps));
            cases.push(small(&root, opts.small_steps));
        }
    }
    println!(
        "training step (forward+loss, backward, grad clip, AdamW), {} thread(s), {} warmup \
         step(s) excluded; bf16 = both sides autocast to bfloat16",
        opts.threads, opts.warmup,
    );
    println!(
        "{:10} {:>3} {:4} {:8} {:>8} {:>9} {:>12} {:>10} {:>4}",
        "config", "b", "prec", "impl", "steps/s", "ms/step", "peak RSS MiB", "last loss", "thr"
    );
    let mut failed = false;
    let mut summary = Vec::new();
    let mut run = 0;
    for case in &cases {
        for &precision in &opts.precisions {
            // Alternate which side goes first, so a load change on the machine does not always
            // hit the same side.
            let mut sides: Vec<Option<&Path>> = vec![None];
            sides.extend(python.as_ref().ok().map(|p| Some(p.as_path())));
            if run % 2 == 1 {
                sides.reverse();
            }
            run += 1;
            let (mut ours, mut theirs) = (None, None);
            for who in sides {
                match side(case, precision, &opts, who) {
                    Ok(v) if who.is_none() => ours = Some(v),
                    Ok(v) => theirs = Some(v),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            let (Some(ours), Some(theirs)) = (ours, theirs) else {
                continue;
            };
            let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let speed = f(&ours, "steps_per_s") / f(&theirs, "steps_per_s");
            let rss = mib(&ours) / mib(&theirs);
            // Same model, same batch, same noise/time: the first losses must agree.
            let dl = (f(&ours, "first_loss") - f(&theirs, "first_loss")).abs();
            summary.push(format!(
                "{:10} batch {} {:4}: zk0/LeRobot steps/s {:.2}x, peak RSS zk0/LeRobot {:.2}x \
                 (first-step loss difference {:.1e})",
                case.name,
                case.batch,
                precision.name(),
                speed,
                rss,
                dl
            ));
        }
    }
    for s in &summary {
        println!("{s}");
    }
    if failed {
        std::process::exit(1);
    }
}
