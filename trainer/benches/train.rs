//! `cargo xtask bench train`: training steps/s and peak RSS of `zk0-train` against LeRobot's own
//! SmolVLA training step, on the same machine in the same run.
//!
//! Two configs, both sides built from the same `config.json`, `vlm_config.json` and
//! `model.safetensors` (so they are the same model and the same weights):
//! - `tiny`: the vendored parity fixture (tests/fixtures/smolvla-tiny);
//! - `small`: SmolVLA's full-size architecture at a quarter of its widths (SmolVLM2-500M's text
//!   960→240, vision 768→192, same head counts, full vocabulary) with 4 VLM layers, 4 vision
//!   layers, 256×256 images and 50-step action chunks, randomly initialised here.
//!
//! Each side runs as its own process (`zk0-train bench`, trainer/benches/lerobot_train_step.py
//! through the LeRobot venv in `ZK0_LEROBOT_PYTHON`) on the same batch file with the same
//! thread count; a step is forward with the loss, backward, grad clip and AdamW; warmup steps are
//! excluded from the timing; each process reports its own peak RSS (VmHWM). Without the venv
//! the LeRobot side is skipped with a message and only zk0's figures are printed.
//!
//! Options (after `--`): `--threads N` (default: all cores), `--only tiny|small`,
//! `--tiny-steps N`, `--small-steps N`, `--warmup N`, `--bf16` (both sides autocast to bf16).

mod common;

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
    warmup: usize,
    bf16: bool,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        only: None,
        tiny_steps: 40,
        small_steps: 8,
        warmup: 2,
        bf16: false,
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
            "--warmup" => o.warmup = num("--warmup")?,
            "--bf16" => o.bf16 = true,
            "--only" => {
                let v = args.next().unwrap_or_default();
                if v != "tiny" && v != "small" {
                    return Err(format!("--only tiny|small, not {v:?}"));
                }
                o.only = Some(v);
            }
            // cargo bench passes --bench to harness-less targets.
            "--bench" => {}
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

/// One benchmark configuration: a checkpoint directory and a batch file for it.
struct Case {
    name: &'static str,
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
fn write_inputs(dir: &Path, batch: i64, tokens: i64, out: &Path) {
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
    t.push((
        "observation.language.attention_mask".into(),
        Tensor::ones([batch, tokens], (Kind::Uint8, Device::Cpu)),
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
    write_inputs(&dir, batch, 12, &inputs);
    Case {
        name: "tiny",
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
    write_inputs(&dir, batch, 24, &inputs);
    Case {
        name: "small",
        dir,
        inputs,
        steps,
        batch,
    }
}

/// The options both sides take alike: the case's model, batch and step count, the warmup and
/// bf16 autocast.
fn step_args(cmd: &mut Command, case: &Case, opts: &Opts) {
    cmd.arg("--model")
        .arg(&case.dir)
        .arg("--inputs")
        .arg(&case.inputs)
        .arg("--steps")
        .arg(case.steps.to_string())
        .arg("--warmup")
        .arg(opts.warmup.to_string());
    if opts.bf16 {
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

fn row(case: &Case, side: &str, v: &Value) {
    let sps = v["steps_per_s"].as_f64().unwrap_or(f64::NAN);
    // Per-step milliseconds of each part, from the side's own timers.
    let ms =
        |k: &str| v["phase_seconds"][k].as_f64().unwrap_or(f64::NAN) * 1000.0 / case.steps as f64;
    println!(
        "{:6} {:8} {:>10.2} {:>10.1} {:>12.0} {:>12.4} {:>6}   fwd {:.1} / bwd {:.1} / optim {:.1} ms",
        case.name,
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

fn main() {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench train: {e}");
            std::process::exit(2);
        }
    };
    let root = tempfile::tempdir().unwrap();
    let python = lerobot_python();
    if let Err(why) = &python {
        println!(
            "LeRobot side SKIPPED: {why} (run `cargo xtask setup --lerobot`; `cargo xtask bench` \
             exports it); printing zk0-train's figures only"
        );
    }
    let mut cases = Vec::new();
    if opts.only.as_deref() != Some("small") {
        cases.push(tiny(root.path(), opts.tiny_steps));
    }
    if opts.only.as_deref() != Some("tiny") {
        cases.push(small(root.path(), opts.small_steps));
    }
    println!(
        "training step (forward+loss, backward, grad clip, AdamW), {} thread(s), {} warmup \
         step(s) excluded, {}",
        opts.threads,
        opts.warmup,
        if opts.bf16 {
            "bf16 autocast"
        } else {
            "float32"
        }
    );
    println!(
        "{:6} {:8} {:>10} {:>10} {:>12} {:>12} {:>6}",
        "config", "impl", "steps/s", "ms/step", "peak RSS MiB", "last loss", "thr"
    );
    let mut failed = false;
    let mut summary = Vec::new();
    for case in &cases {
        let mut zk0 = Command::new(env!("CARGO_BIN_EXE_zk0-train"));
        zk0.arg("--threads")
            .arg(opts.threads.to_string())
            .arg("bench")
            .arg("--device")
            .arg("cpu");
        step_args(&mut zk0, case, &opts);
        let ours = match common::run_json(zk0, "zk0-train bench") {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{e}");
                failed = true;
                continue;
            }
        };
        row(case, "zk0", &ours);
        let Ok(py) = &python else { continue };
        let mut lr = Command::new(py);
        lr.arg(LEROBOT_SCRIPT)
            .arg("--threads")
            .arg(opts.threads.to_string())
            .env("HF_HUB_OFFLINE", "1");
        step_args(&mut lr, case, &opts);
        let theirs = match common::run_json(lr, "LeRobot step") {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{e}");
                failed = true;
                continue;
            }
        };
        row(case, "lerobot", &theirs);
        let speed = ours["steps_per_s"].as_f64().unwrap_or(f64::NAN)
            / theirs["steps_per_s"].as_f64().unwrap_or(f64::NAN);
        let rss = mib(&ours) / mib(&theirs);
        // Same model, same batch, same noise/time: the first losses must agree.
        let dl = (ours["first_loss"].as_f64().unwrap_or(f64::NAN)
            - theirs["first_loss"].as_f64().unwrap_or(f64::NAN))
        .abs();
        summary.push(format!(
            "{:6} batch {}: zk0/LeRobot steps/s {:.2}x, peak RSS zk0/LeRobot {:.2}x \
             (first-step loss difference {:.1e})",
            case.name, case.batch, speed, rss, dl
        ));
    }
    for s in &summary {
        println!("{s}");
    }
    if failed {
        std::process::exit(1);
    }
}
