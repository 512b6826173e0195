//! `--model` by Hub id (hf-hub cache layout, offline), `--device`, `--bf16` and the `bench`
//! subcommand, through the real `zk0-train` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tch::Tensor;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/smolvla-tiny"
);
const DATASET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/lerobot-v3-tiny"
);

fn pipeline() -> PathBuf {
    PathBuf::from(FIXTURE).join("pipeline")
}

/// `zk0-train` with no Hub settings inherited from the caller's environment.
fn zk0_train() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zk0-train"));
    for v in ["HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT"] {
        c.env_remove(v);
    }
    c.arg("--threads").arg("1");
    c
}

/// `eval` of the first episode of the tiny dataset; `model` is a directory or a Hub id.
fn eval_cmd(model: &str, out: &Path, extra: &[&str]) -> Command {
    let mut c = zk0_train();
    c.args(["eval", "--model", model, "--tokenizer"])
        .arg(pipeline().join("tokenizer.json"))
        .arg("--dataset")
        .arg(DATASET)
        .args(["--episodes", "1"])
        .args(extra)
        .arg("--out")
        .arg(out);
    c
}

fn ok_json(out: Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap();
    serde_json::from_str(last).unwrap()
}

/// Lays out `repo_id` in hf-hub's cache format under `cache` (blobs, a snapshot of symlinks to
/// them, refs/main naming the revision), with the files of `from`.
#[cfg(unix)]
fn hub_cache(cache: &Path, repo_id: &str, from: &Path) -> PathBuf {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let rev = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), rev).unwrap();
    for (i, entry) in std::fs::read_dir(from).unwrap().enumerate() {
        let p = entry.unwrap().path();
        if !p.is_file() {
            continue;
        }
        let blob = repo.join("blobs").join(format!("blob{i:04}"));
        std::fs::copy(&p, &blob).unwrap();
        let link = snap.join(p.file_name().unwrap());
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(blob.file_name().unwrap()),
            &link,
        )
        .unwrap();
    }
    snap
}

#[cfg(unix)]
#[test]
fn eval_loads_a_model_by_hub_id_from_the_offline_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipeline().join("model");
    let by_dir = ok_json(
        eval_cmd(model.to_str().unwrap(), &dir.path().join("d.json"), &[])
            .output()
            .unwrap(),
    );
    // HF_HUB_CACHE points at the hub directory itself.
    let cache = dir.path().join("hub-cache");
    hub_cache(&cache, "zk0-test/smolvla-tiny", &model);
    let by_id = ok_json(
        eval_cmd("zk0-test/smolvla-tiny", &dir.path().join("i.json"), &[])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap(),
    );
    assert_eq!(by_id["loss"], by_dir["loss"], "{by_id} vs {by_dir}");
    assert_eq!(by_id["frames"], 24);
    // HF_HOME: the cache is HF_HOME/hub.
    let home = dir.path().join("hf-home");
    hub_cache(&home.join("hub"), "zk0-test/smolvla-tiny", &model);
    let by_home = ok_json(
        eval_cmd("zk0-test/smolvla-tiny", &dir.path().join("h.json"), &[])
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap(),
    );
    assert_eq!(by_home["loss"], by_dir["loss"]);
}

#[test]
fn a_hub_id_missing_from_the_offline_cache_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("empty-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let out = eval_cmd("zk0-test/absent", &dir.path().join("x.json"), &[])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zk0-test/absent"), "{err}");
    assert!(err.contains(cache.to_str().unwrap()), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Neither a directory nor an id.
    let out = eval_cmd("no/such/dir", &dir.path().join("y.json"), &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no/such/dir") && err.contains("not a checkpoint directory"),
        "{err}"
    );
}

#[test]
fn device_option_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipeline().join("model");
    let out = eval_cmd(
        model.to_str().unwrap(),
        &dir.path().join("g.json"),
        &["--device", "gpu"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    if !tch::Cuda::is_available() {
        // This CPU-only libtorch cannot run CUDA: asking for it is an error, auto means CPU.
        let out = eval_cmd(
            model.to_str().unwrap(),
            &dir.path().join("c.json"),
            &["--device", "cuda:0"],
        )
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("CUDA device"), "{err}");
        let auto = ok_json(
            eval_cmd(
                model.to_str().unwrap(),
                &dir.path().join("a.json"),
                &["--device", "auto"],
            )
            .output()
            .unwrap(),
        );
        assert!(auto["loss"].as_f64().unwrap() > 0.0);
    }
}

/// bf16 autocast of the matrix products gives the float32 loss up to bf16 rounding.
#[test]
fn bf16_eval_loss_is_close_to_float32() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipeline().join("model");
    let f32 = ok_json(
        eval_cmd(
            model.to_str().unwrap(),
            &dir.path().join("f.json"),
            &["--device", "cpu"],
        )
        .output()
        .unwrap(),
    );
    let bf16 = ok_json(
        eval_cmd(
            model.to_str().unwrap(),
            &dir.path().join("b.json"),
            &["--bf16"],
        )
        .output()
        .unwrap(),
    );
    let (a, b) = (
        f32["loss"].as_f64().unwrap(),
        bf16["loss"].as_f64().unwrap(),
    );
    let rel = (a - b).abs() / a;
    eprintln!("eval loss float32 {a}, bf16 {b}, relative difference {rel:.2e}");
    // bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 0.2 %): every linear layer rounds
    // its inputs and weights, ~20 of them lie between the inputs and the velocity, and the loss
    // squares the velocity error; 1 % bounds that (measured: 8e-4 on this fixture), while a
    // wrong result (a missing layer, a dtype mix-up) moves the loss by far more. The difference
    // must not be zero, or bf16 was not used.
    assert!(
        rel > 0.0,
        "bf16 gave the float32 loss exactly: autocast not applied"
    );
    assert!(
        rel < 0.01,
        "bf16 loss {b} vs float32 {a}: relative error {rel}"
    );
}

/// `bench` times the real training step: its first loss is the fixture's LeRobot loss (same
/// weights, batch, noise and time), and repeated AdamW steps on the batch lower it.
#[test]
fn bench_runs_the_training_step_on_the_fixture_batch() {
    let expected = Tensor::read_safetensors(Path::new(FIXTURE).join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "train.loss")
        .unwrap()
        .1
        .double_value(&[]);
    let out = zk0_train()
        .args([
            "bench", "--device", "cpu", "--steps", "5", "--warmup", "1", "--model",
        ])
        .arg(FIXTURE)
        .arg("--inputs")
        .arg(Path::new(FIXTURE).join("inputs.safetensors"))
        .output()
        .unwrap();
    let r = ok_json(out);
    assert_eq!(r["impl"], "zk0");
    assert_eq!(r["steps"], 5);
    assert_eq!(r["threads"], 1);
    let first = r["first_loss"].as_f64().unwrap();
    assert!((first - expected).abs() < 1e-5, "{first} vs {expected}");
    assert!(r["last_loss"].as_f64().unwrap() < first, "{r}");
    assert!(r["steps_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["peak_rss_kib"].as_u64().unwrap() > 1024, "{r}");
}
