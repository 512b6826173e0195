//! Checkpoint interop with LeRobot itself, through the Python venv that `cargo xtask setup
//! --lerobot` builds (`ZK0_LEROBOT_PYTHON`, exported by `cargo xtask env` / `cargo xtask test`):
//!
//! - a checkpoint that `zk0-train train --out-model` writes loads with LeRobot's
//!   `SmolVLAPolicy.from_pretrained` and gives the same loss on the same batch (same noise/time);
//! - checkpoints that LeRobot's `save_pretrained` writes (the fixture's, and one after a LeRobot
//!   AdamW step) load in `zk0-train` and give the same loss.
//!
//! Without `ZK0_LEROBOT_PYTHON` the tests are skipped with a message, except under CI (`CI` set),
//! where a missing venv is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/lerobot_interop.py");
/// Absolute tolerance on the loss (float32 on CPU; both sides run the same libtorch kernels).
const TOL: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// The LeRobot venv's python, or `None` (test skipped) when it is not configured outside CI.
fn lerobot_python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("ZK0_LEROBOT_PYTHON").filter(|v| !v.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "ZK0_LEROBOT_PYTHON={} does not exist; run `cargo xtask setup --lerobot`",
                p.display()
            );
            Some(p)
        }
        None if std::env::var_os("CI").is_some() => panic!(
            "{test}: ZK0_LEROBOT_PYTHON is not set under CI; run `cargo xtask setup --lerobot` \
             and the tests through `cargo xtask test`"
        ),
        None => {
            eprintln!(
                "SKIPPED {test}: ZK0_LEROBOT_PYTHON is not set (run `cargo xtask setup --lerobot`, \
                 then `eval \"$(cargo xtask env)\"` or `cargo xtask test`)"
            );
            None
        }
    }
}

fn json_of(what: &str, out: std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{what}: no JSON ({e}): {stdout}"))
}

/// LeRobot's loss (or one AdamW step + `save_pretrained` to `out`, then the loss).
fn lerobot(py: &Path, mode: &str, model: &Path, inputs: &Path, out: Option<&Path>) -> Value {
    let mut cmd = Command::new(py);
    cmd.arg(SCRIPT)
        .arg(mode)
        .arg("--model")
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .env("HF_HUB_OFFLINE", "1");
    if let Some(out) = out {
        cmd.arg("--out").arg(out);
    }
    json_of(
        &format!("lerobot {mode} {}", model.display()),
        cmd.output().unwrap(),
    )
}

fn zk0_train() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zk0-train"));
    cmd.args(["--threads", "1"]);
    cmd
}

fn zk0_loss(model: &Path, inputs: &Path) -> Value {
    let out = zk0_train()
        .arg("loss")
        .arg("--model")
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .output()
        .unwrap();
    json_of(&format!("zk0-train loss {}", model.display()), out)
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no `{key}` in {v}"))
}

fn assert_same_loss(ours: &Value, theirs: &Value, what: &str) {
    let (a, b) = (num(ours, "loss"), num(theirs, "loss"));
    assert!((a - b).abs() <= TOL, "{what}: zk0 loss {a} vs LeRobot {b}");
    let (pa, pb) = (
        ours["per_sample_loss"].as_array().unwrap(),
        theirs["per_sample_loss"].as_array().unwrap(),
    );
    assert_eq!(pa.len(), pb.len(), "{what}");
    for (x, y) in pa.iter().zip(pb) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!((x - y).abs() <= TOL, "{what}: per-sample {x} vs {y}");
    }
}

/// A complete LeRobot checkpoint: the pipeline fixture's model plus its processor files and
/// tokenizer, as LeRobot's training writes `pretrained_model/`.
fn full_checkpoint(to: &Path) {
    let pipeline = fixture("smolvla-tiny/pipeline");
    std::fs::create_dir_all(to).unwrap();
    for dir in [pipeline.join("model"), pipeline.clone()] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            let keep = dir != pipeline || name.starts_with("policy_") || name == "tokenizer.json";
            if p.is_file() && keep {
                std::fs::copy(&p, to.join(name)).unwrap();
            }
        }
    }
}

/// `zk0-train train --steps 2 --out-model` from `start`; returns the saved checkpoint.
fn zk0_train_and_save(start: &Path, tokenizer: Option<&Path>, work: &Path) -> PathBuf {
    let saved = work.join("pretrained_model");
    let mut cmd = zk0_train();
    cmd.args(["train", "--model"])
        .arg(start)
        .arg("--dataset")
        .arg(fixture("lerobot-v3-tiny"))
        .args([
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            "3",
        ])
        .arg("--out-params")
        .arg(work.join("params.safetensors"))
        .arg("--out-metrics")
        .arg(work.join("metrics.json"))
        .arg("--out-model")
        .arg(&saved);
    if let Some(t) = tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // LeRobot's `pretrained_model/` layout, processor files and tokenizer included.
    for f in [
        "config.json",
        "model.safetensors",
        "policy_preprocessor.json",
        "policy_preprocessor_step_5_normalizer_processor.safetensors",
        "policy_postprocessor.json",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
        "tokenizer.json",
    ] {
        assert!(saved.join(f).is_file(), "{f} not saved");
    }
    saved
}

/// LeRobot loads the zk0 checkpoint (policy and processors) and gets zk0's loss, both on the
/// fixture's model-boundary batch and on the pipeline fixture's raw batch run through the
/// checkpoint's own preprocessor.
fn check_zk0_checkpoint_in_lerobot(py: &Path, start: &Path, saved: &Path, work: &Path) {
    let inputs = fixture("smolvla-tiny/pipeline/model/inputs.safetensors");
    let before = zk0_loss(start, &inputs);
    let ours = zk0_loss(saved, &inputs);
    let theirs = lerobot(py, "loss", saved, &inputs, None);
    assert_same_loss(&ours, &theirs, "zk0-saved checkpoint");
    // The trained weights were saved (not the starting ones).
    assert!(
        (num(&before, "loss") - num(&ours, "loss")).abs() > 1e-4,
        "loss unchanged by training: {before} vs {ours}"
    );

    // The processors: LeRobot's PolicyProcessorPipeline loads them and makes the very batch
    // its own processors made from the same raw frames (pipeline fixture).
    let dump = work.join("lerobot_batch.safetensors");
    let out = Command::new(py)
        .arg(SCRIPT)
        .args(["pipeline", "--model"])
        .arg(saved)
        .arg("--pipeline")
        .arg(fixture("smolvla-tiny/pipeline"))
        .arg("--dump")
        .arg(&dump)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let report = json_of("lerobot pipeline", out);
    let errs = report["batch_max_abs_err"].as_object().unwrap();
    assert!(errs.len() >= 6, "{report}");
    for (k, e) in errs {
        assert!(e.as_f64().unwrap() <= TOL, "{k}: {e} ({report})");
    }
    assert!(num(&report, "postprocess_max_abs_err") <= 1e-4, "{report}");
    let ours = zk0_loss(saved, &dump);
    let (a, b) = (num(&ours, "loss"), num(&report, "pipeline_loss"));
    assert!(
        (a - b).abs() <= TOL,
        "pipeline batch: zk0 {a} vs LeRobot {b}"
    );
}

#[test]
fn lerobot_loads_a_zk0_checkpoint_and_computes_the_same_loss() {
    let Some(py) = lerobot_python("lerobot_loads_a_zk0_checkpoint_and_computes_the_same_loss")
    else {
        return;
    };
    // Starting from a complete LeRobot checkpoint: its processor files are carried over.
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start");
    full_checkpoint(&start);
    let saved = zk0_train_and_save(&start, None, dir.path());
    check_zk0_checkpoint_in_lerobot(&py, &start, &saved, dir.path());
}

#[test]
fn lerobot_loads_zk0_written_processors() {
    let Some(py) = lerobot_python("lerobot_loads_zk0_written_processors") else {
        return;
    };
    // Starting from weights and config only: zk0 writes LeRobot's SmolVLA processors itself
    // (statistics from the dataset's meta/stats.json).
    let dir = tempfile::tempdir().unwrap();
    let start = fixture("smolvla-tiny/pipeline/model");
    assert!(!start.join("policy_preprocessor.json").exists());
    let tok = fixture("smolvla-tiny/pipeline/tokenizer.json");
    let saved = zk0_train_and_save(&start, Some(&tok), dir.path());
    check_zk0_checkpoint_in_lerobot(&py, &start, &saved, dir.path());
}

#[test]
fn zk0_loads_lerobot_checkpoints_and_computes_the_same_loss() {
    let Some(py) = lerobot_python("zk0_loads_lerobot_checkpoints_and_computes_the_same_loss")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in ["smolvla-tiny", "smolvla-two-cameras"] {
        let model = fixture(name);
        let inputs = model.join("inputs.safetensors");
        // As the generator saved it with LeRobot's `save_pretrained`.
        let ours = zk0_loss(&model, &inputs);
        let theirs = lerobot(&py, "loss", &model, &inputs, None);
        assert_same_loss(&ours, &theirs, name);
        // After one LeRobot AdamW step, saved by LeRobot.
        let stepped = dir.path().join(name);
        let theirs2 = lerobot(&py, "step", &model, &inputs, Some(&stepped));
        let ours2 = zk0_loss(&stepped, &inputs);
        assert_same_loss(&ours2, &theirs2, &format!("{name} after a LeRobot step"));
        assert!(
            (num(&ours, "loss") - num(&ours2, "loss")).abs() > 1e-4,
            "{name}: the LeRobot step changed nothing"
        );
    }
}
