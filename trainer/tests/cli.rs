//! Runs the real `zk0-train` binary against the vendored LeRobot fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tch::Tensor;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/smolvla-tiny"
);

fn zk0_train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zk0-train"))
}

fn compare(dir: &Path) -> (i32, Value) {
    let out = zk0_train()
        .args(["--threads", "1", "compare", "--fixture"])
        .arg(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr: {stderr}"));
    (out.status.code().unwrap_or(-1), report)
}

fn copy_fixture(to: &Path) {
    for entry in std::fs::read_dir(FIXTURE).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Every `tests/fixtures/smolvla-*` directory that is a LeRobot parity fixture (has a
/// `fixture.json`): the original seed-0 one and the ones made with other seeds, batch sizes,
/// token lengths, two cameras and another chunk size.
fn parity_fixtures() -> Vec<PathBuf> {
    let root = PathBuf::from(FIXTURE).parent().unwrap().to_path_buf();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("smolvla-"))
                && p.join("fixture.json").is_file()
        })
        .collect();
    dirs.sort();
    dirs
}

fn expected_tensor_count(dir: &Path) -> usize {
    ["expected.safetensors", "expected_extra.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.is_file())
        .map(|p| Tensor::read_safetensors(&p).unwrap().len())
        .sum()
}

#[test]
fn compare_passes_on_every_vendored_fixture() {
    let dirs = parity_fixtures();
    // smolvla-tiny (seed 0), seed1-b3-t9, two-cameras, chunk5.
    assert!(dirs.len() >= 4, "fixtures found: {dirs:?}");
    for dir in dirs {
        let (code, report) = compare(&dir);
        assert_eq!(code, 0, "{}: report: {report:#}", dir.display());
        assert_eq!(report["pass"], Value::Bool(true), "{}", dir.display());
        let rows = report["tensors"].as_array().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(rows.len(), expected_tensor_count(&dir), "{}", dir.display());
        for must in [
            "train.loss",
            "train.v_t",
            "train.per_sample_loss",
            "train.grad_norm",
            "sample.actions",
            "sample.v_t_steps",
            "select.action_step1",
            "schedule.lr",
            "full.grad_norm",
            "grad.model.action_out_proj.weight",
            "updated.model.vlm_with_expert.lm_expert.layers.1.self_attn.k_proj.weight",
            "full.updated.model.vlm_with_expert.vlm.model.vision_model.embeddings.patch_embedding.weight",
        ] {
            assert!(names.contains(&must), "{}: {must} not reported", dir.display());
        }
        for r in rows {
            assert_eq!(r["pass"], Value::Bool(true), "{}: {r}", dir.display());
            assert!(
                r["max_abs_err"].as_f64().unwrap() <= 1e-5,
                "{}: {r}",
                dir.display()
            );
        }
    }
}

#[test]
fn the_original_fixture_checks_172_tensors() {
    // 109 tensors in expected.safetensors + 63 in expected_extra.safetensors.
    assert_eq!(expected_tensor_count(Path::new(FIXTURE)), 172);
}

#[test]
fn compare_fails_when_an_expected_value_is_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let path = dir.path().join("expected.safetensors");
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            if n == "train.v_t" {
                let t2 = t.copy();
                let _ = t2.get(0).get(0).get(0).fill_(123.0);
                (n, t2)
            } else {
                (n, t)
            }
        })
        .collect();
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let (code, report) = compare(dir.path());
    assert_eq!(code, 1, "report: {report:#}");
    assert_eq!(report["pass"], Value::Bool(false));
    assert_eq!(report["failed"], serde_json::json!(["train.v_t"]));
}

#[test]
fn compare_fails_when_an_expected_tensor_is_not_computed() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let path = dir.path().join("expected_extra.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    tensors.push((
        "debug.something_new".into(),
        Tensor::from_slice(&[1f32, 2.0]),
    ));
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let (code, report) = compare(dir.path());
    assert_eq!(code, 1);
    let row = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "debug.something_new")
        .unwrap();
    assert_eq!(row["error"], "not computed");
}

#[test]
fn version_names_libtorch() {
    let out = zk0_train().arg("--version").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.contains(env!("CARGO_PKG_VERSION")) && s.contains("libtorch"),
        "{s}"
    );
}

#[test]
fn doctor_reports_cpu() {
    let out = zk0_train().arg("doctor").output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["devices"][0]["device"], "Cpu");
    assert_eq!(v["devices"][0]["ok"], Value::Bool(true));
}

#[test]
fn compare_passes_on_the_pipeline_fixture() {
    let pipeline = PathBuf::from(FIXTURE).join("pipeline");
    let out = zk0_train()
        .args(["--threads", "1", "compare", "--fixture"])
        .arg(pipeline.join("model"))
        .arg("--dataset")
        .arg(&pipeline)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report:#}");
    let names: Vec<&str> = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for must in [
        "pipeline.batch.observation.language.tokens",
        "pipeline.batch.observation.state",
        "pipeline.batch.action",
        "pipeline.train.loss",
        "pipeline.sample.actions_normalized",
        "pipeline.sample.actions",
        "train.loss",
        "sample.actions",
    ] {
        assert!(names.contains(&must), "{must} not reported");
    }
}

fn train(dir: &Path, mu: &str) -> Value {
    let params = dir.join(format!("p{mu}.safetensors"));
    let m = train_to(dir, mu, &["--out-params"], &params);
    assert_eq!(Tensor::read_safetensors(&params).unwrap().len(), 47);
    m
}

/// One 3-step run (seed 7) writing `out_args` `out` and the metrics, which it returns.
fn train_to(dir: &Path, mu: &str, out_args: &[&str], out: &Path) -> Value {
    let pipeline = PathBuf::from(FIXTURE).join("pipeline");
    let metrics = dir.join(format!("m{mu}.json"));
    let out = zk0_train()
        .args(["--threads", "1", "train", "--model"])
        .arg(pipeline.join("model"))
        .arg("--tokenizer")
        .arg(pipeline.join("tokenizer.json"))
        .arg("--dataset")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/lerobot-v3-tiny"
        ))
        .args([
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            "7",
            "--mu",
            mu,
        ])
        .args(out_args)
        .arg(out)
        .arg("--out-metrics")
        .arg(&metrics)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["event"], "step");
    // θ = θ_global at the first step: no proximal term.
    assert_eq!(lines[0]["fedprox_loss"].as_f64().unwrap(), 0.0);
    let m: Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    for k in [
        "loss",
        "fedprox_loss",
        "grad_norm",
        "update_norm",
        "examples",
        "steps",
        "seconds",
    ] {
        assert!(m.get(k).is_some(), "{k} missing in {m}");
    }
    assert_eq!(m["examples"], 6);
    m
}

#[test]
fn fedprox_term_shrinks_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let free = train(dir.path(), "0");
    let prox = train(dir.path(), "1000");
    assert_eq!(free["fedprox_loss"].as_f64().unwrap(), 0.0);
    assert!(prox["fedprox_loss"].as_f64().unwrap() > 0.0);
    let (u0, u1) = (
        free["update_norm"].as_f64().unwrap(),
        prox["update_norm"].as_f64().unwrap(),
    );
    assert!(u1 < u0, "update norm with mu: {u1}, without: {u0}");
}

/// `--out-delta` writes what an agent would compute from `--out-params`: trained − the global
/// model the run started from, exactly.
#[test]
fn out_delta_is_trained_minus_global() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A global model that is not the checkpoint: the trained tensors of a first run.
    let global = d.join("global.safetensors");
    train_to(d, "0", &["--out-params"], &global);
    let (trained, delta) = (d.join("trained.safetensors"), d.join("delta.safetensors"));
    train_to(
        d,
        "0",
        &["--global", global.to_str().unwrap(), "--out-params"],
        &trained,
    );
    let m = train_to(
        d,
        "0",
        &["--global", global.to_str().unwrap(), "--out-delta"],
        &delta,
    );
    let by_name = |p: &Path| -> std::collections::BTreeMap<String, Tensor> {
        Tensor::read_safetensors(p).unwrap().into_iter().collect()
    };
    let (g, t, dl) = (by_name(&global), by_name(&trained), by_name(&delta));
    assert_eq!(dl.len(), 47);
    let mut sq = 0.0;
    for (name, dv) in &dl {
        let want = &t[name] - &g[name];
        assert_eq!(dv.size(), want.size(), "{name}");
        let diff = (dv - &want).abs().max().double_value(&[]);
        assert_eq!(
            diff, 0.0,
            "{name}: delta differs from trained − global by {diff}"
        );
        sq += dv.square().sum(tch::Kind::Double).double_value(&[]);
    }
    assert!(sq > 0.0, "the run changed nothing");
    let norm = m["update_norm"].as_f64().unwrap();
    assert!(
        (sq.sqrt() - norm).abs() <= 1e-4 * norm,
        "{} vs {norm}",
        sq.sqrt()
    );
    // Exactly one output: none or both is a usage error.
    let out = zk0_train()
        .args([
            "train",
            "--model",
            "m",
            "--dataset",
            "d",
            "--out-metrics",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn eval(dir: &Path, extra: &[&str]) -> Value {
    let pipeline = PathBuf::from(FIXTURE).join("pipeline");
    let out_file = dir.join(format!("eval{}.json", extra.join("")));
    let out = zk0_train()
        .args(["--threads", "1", "eval", "--model"])
        .arg(pipeline.join("model"))
        .arg("--tokenizer")
        .arg(pipeline.join("tokenizer.json"))
        .arg("--dataset")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/lerobot-v3-tiny"
        ))
        .args(extra)
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let written: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(printed, written);
    written
}

#[test]
fn eval_reports_the_policy_loss_over_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let all = eval(dir.path(), &[]);
    // lerobot-v3-tiny: 3 episodes, 24 + 31 + 20 frames.
    assert_eq!(all["episodes"], 3);
    assert_eq!(all["frames"], 75);
    let eps = all["per_episode"].as_array().unwrap();
    let frames: Vec<u64> = eps.iter().map(|e| e["frames"].as_u64().unwrap()).collect();
    assert_eq!(frames, [24, 31, 20]);
    let loss = all["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{all}");
    let per: Vec<f64> = eps.iter().map(|e| e["loss"].as_f64().unwrap()).collect();
    let (lo, hi) = per
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(
        lo <= loss && loss <= hi,
        "{loss} outside the episodes' {per:?}"
    );
    // Seeded: the first episode alone gives the same number as within the full run.
    let first = eval(dir.path(), &["--episodes", "1"]);
    assert_eq!(first["episodes"], 1);
    assert_eq!(first["frames"], 24);
    assert_eq!(first["loss"], eps[0]["loss"]);
    // Another seed draws other noise and time.
    let other = eval(dir.path(), &["--seed", "5"]);
    assert_ne!(other["loss"], all["loss"]);
}

#[test]
fn train_saves_a_lerobot_checkpoint_with_lerobot_processors() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = PathBuf::from(FIXTURE).join("pipeline");
    let saved = dir.path().join("pretrained_model");
    let out = zk0_train()
        .args(["--threads", "1", "train", "--model"])
        .arg(pipeline.join("model"))
        .arg("--tokenizer")
        .arg(pipeline.join("tokenizer.json"))
        .arg("--dataset")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/lerobot-v3-tiny"
        ))
        .args(["--steps", "1", "--batch-size", "2", "--out-params"])
        .arg(dir.path().join("p.safetensors"))
        .arg("--out-metrics")
        .arg(dir.path().join("m.json"))
        .arg("--out-model")
        .arg(&saved)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The processor files equal the ones LeRobot's make_smolvla_pre_post_processors +
    // save_pretrained wrote for the same config and dataset (pipeline fixture).
    for f in ["policy_preprocessor.json", "policy_postprocessor.json"] {
        let ours: Value = serde_json::from_slice(&std::fs::read(saved.join(f)).unwrap()).unwrap();
        let lerobot: Value =
            serde_json::from_slice(&std::fs::read(pipeline.join(f)).unwrap()).unwrap();
        assert_eq!(ours, lerobot, "{f}");
    }
    for f in [
        "policy_preprocessor_step_5_normalizer_processor.safetensors",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
    ] {
        let ours: std::collections::BTreeMap<String, Tensor> =
            Tensor::read_safetensors(saved.join(f))
                .unwrap()
                .into_iter()
                .collect();
        let lerobot = Tensor::read_safetensors(pipeline.join(f)).unwrap();
        assert_eq!(ours.len(), lerobot.len(), "{f}");
        for (k, t) in lerobot {
            let o = ours.get(&k).unwrap_or_else(|| panic!("{f}: no {k}"));
            let d = (o.flatten(0, -1) - t.flatten(0, -1))
                .abs()
                .max()
                .double_value(&[]);
            assert!(d <= 1e-6, "{f}: {k} differs by {d}");
        }
    }
    // The checkpoint is complete: zk0-train computes its loss and trains from it alone.
    let out = zk0_train()
        .args(["--threads", "1", "loss", "--model"])
        .arg(&saved)
        .arg("--inputs")
        .arg(pipeline.join("model/inputs.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["loss"].as_f64().unwrap() > 0.0, "{v}");
    let out = zk0_train()
        .args(["--threads", "1", "eval", "--model"])
        .arg(&saved)
        .arg("--dataset")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/lerobot-v3-tiny"
        ))
        .args(["--episodes", "1", "--out"])
        .arg(dir.path().join("e.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn loss_matches_the_fixture() {
    let out = zk0_train()
        .args(["--threads", "1", "loss", "--model", FIXTURE, "--inputs"])
        .arg(PathBuf::from(FIXTURE).join("inputs.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = Tensor::read_safetensors(PathBuf::from(FIXTURE).join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "train.loss")
        .unwrap()
        .1;
    // Float32 throughout: the one interleaved layer step sums in another order than the four
    // loops it replaced, which moves this loss by 2 ulps (1.5e-7 relative) off LeRobot's.
    let (got, want) = (v["loss"].as_f64().unwrap(), expected.double_value(&[0]));
    assert!(
        ((got - want) / want).abs() <= 1e-6,
        "loss {got}, LeRobot {want}"
    );
    assert_eq!(v["per_sample_loss"].as_array().unwrap().len(), 2);
}

/// `export-onnx` on a LeRobot checkpoint with processors (the pipeline fixture's model):
/// both graphs, their data files with the SHA-256 the manifest names, the processor files
/// beside them, and a `--global` applied before export (it changes the prefix weights' file).
#[test]
fn export_onnx_writes_graphs_manifest_and_processors() {
    // A LeRobot checkpoint as `save_pretrained` leaves it: the model and its processors.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("checkpoint");
    std::fs::create_dir(&model).unwrap();
    let pipeline = PathBuf::from(FIXTURE).join("pipeline");
    for dir in [pipeline.join("model"), pipeline.clone()] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let n = p.file_name().unwrap().to_str().unwrap().to_string();
            let wanted = if dir == pipeline {
                n.starts_with("policy_")
            } else {
                p.is_file()
            };
            if wanted {
                std::fs::copy(&p, model.join(&n)).unwrap();
            }
        }
    }
    let run = |out: &Path, extra: &[&str]| -> Value {
        let o = zk0_train()
            .args(["--threads", "1", "export-onnx", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let a = tmp.path().join("a");
    let tok = PathBuf::from(FIXTURE).join("pipeline/tokenizer.json");
    let r = run(&a, &["--tokenizer", tok.to_str().unwrap()]);
    assert_eq!(r["event"], "exported");
    assert_eq!(r["precision"], "fp32");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("export.json")).unwrap()).unwrap();
    for g in ["prefix", "denoise"] {
        for (file, sha) in [("file", "sha256"), ("data", "data_sha256")] {
            let bytes = std::fs::read(a.join(m[g][file].as_str().unwrap())).unwrap();
            use sha2::Digest;
            assert_eq!(
                hex::encode(sha2::Sha256::digest(&bytes)),
                m[g][sha],
                "{g} {file}"
            );
        }
    }
    assert_eq!(m["language"]["tokenizer"], "tokenizer.json");
    let files: Vec<&str> = m["processor_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for f in [
        "policy_preprocessor.json",
        "policy_preprocessor_step_5_normalizer_processor.safetensors",
        "policy_postprocessor.json",
        "tokenizer.json",
    ] {
        assert!(
            files.contains(&f) && a.join(f).is_file(),
            "{f} not shipped: {files:?}"
        );
    }
    // A global model with one changed VLM tensor changes the prefix weights only.
    let key = "model.state_proj.weight";
    let w = Tensor::read_safetensors(model.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == key)
        .unwrap()
        .1;
    let global = tmp.path().join("global.safetensors");
    Tensor::write_safetensors(&[(key, &(w + 1.0))], &global).unwrap();
    let b = tmp.path().join("b");
    run(&b, &["--global", global.to_str().unwrap()]);
    let mb: Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("export.json")).unwrap()).unwrap();
    assert_ne!(mb["prefix"]["data_sha256"], m["prefix"]["data_sha256"]);
    assert_eq!(mb["denoise"]["data_sha256"], m["denoise"]["data_sha256"]);
}
