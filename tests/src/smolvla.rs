//! The real SmolVLA worker in a federation: finding a runnable `zk0-train`, the vendored tiny
//! LeRobot SmolVLA checkpoint, its trainable tensors (the global model the aggregator starts
//! from), and small SO-100-like datasets made by `zk0-agent dataset synth`. Shared by the
//! `federation_smolvla` test and the `zk0-demo` binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use shared_proto::tensor::{read_safetensors, TensorSet};

use crate::run_ok;

/// Video encoder of the synthetic datasets: libsvtav1 (LeRobot's default) refuses frames under
/// 64 pixels high, and the tiny model's camera is 48 high.
pub const SYNTH_VCODEC: &str = "libx264";

/// `tests/fixtures/smolvla-tiny`: a LeRobot SmolVLA checkpoint (config.json, model.safetensors,
/// vlm_config.json) made by LeRobot itself.
pub fn tiny_model_dir() -> PathBuf {
    crate::workspace_root().join("tests/fixtures/smolvla-tiny")
}

/// The tokenizer that goes with the tiny model (a small byte-level BPE).
pub fn tiny_tokenizer() -> PathBuf {
    tiny_model_dir().join("pipeline/tokenizer.json")
}

/// Why `zk0-train` at `path` cannot run here, or `Ok` when `zk0-train --version` works.
pub fn check_runnable(path: &Path) -> std::result::Result<(), String> {
    if !path.is_file() {
        return Err(format!("{} is not built", path.display()));
    }
    match Command::new(path).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{} --version failed ({}): {} (is libtorch on LD_LIBRARY_PATH? eval \"$(cargo xtask env)\")",
            path.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot start {}: {e}", path.display())),
    }
}

/// The debug-profile `zk0-train`, built first (`cargo build -p trainer --bin zk0-train`) when
/// `LIBTORCH` is set and `ZK0_E2E_NO_BUILD` is not; `Err(reason)` when it cannot run here.
/// A failed build falls back to an existing binary (others may be mid-edit in trainer/).
pub fn zk0_train() -> std::result::Result<PathBuf, String> {
    let path = crate::bin("zk0-train");
    if std::env::var_os("LIBTORCH").is_some() && std::env::var_os("ZK0_E2E_NO_BUILD").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .current_dir(crate::workspace_root())
            .args(["build", "-p", "trainer", "--bin", "zk0-train"])
            .status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("warning: building zk0-train failed; using the binary already built, if any");
        }
    }
    check_runnable(&path).map(|()| path)
}

/// Trainable tensors of the tiny fixture: `model.safetensors` restricted to the names LeRobot
/// reported as trainable (`fixture.json` → `trainable_parameters`).
pub fn tiny_trainable() -> Result<TensorSet> {
    let dir = tiny_model_dir();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("fixture.json"))?)?;
    let names: Vec<&str> = meta["trainable_parameters"]
        .as_array()
        .context("fixture.json lacks trainable_parameters")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let (all, _) = read_safetensors(&std::fs::read(dir.join("model.safetensors"))?)?;
    names
        .iter()
        .map(|n| {
            all.get(*n)
                .cloned()
                .map(|t| (n.to_string(), t))
                .with_context(|| format!("model.safetensors lacks {n}"))
        })
        .collect()
}

/// Trainable tensors of any LeRobot SmolVLA checkpoint, as `zk0-train` sees them: a zero-step
/// `zk0-train train` writes exactly the trainable tensors, untouched. Needs a dataset the
/// model can read (cameras, state and action names).
pub fn extract_trainable(
    zk0_train: &Path,
    model: &Path,
    tokenizer: Option<&Path>,
    dataset: &Path,
    out: &Path,
) -> Result<TensorSet> {
    let metrics = out.with_extension("metrics.json");
    let mut cmd = Command::new(zk0_train);
    cmd.args(["--threads", "1", "train", "--model"])
        .arg(model)
        .arg("--dataset")
        .arg(dataset)
        .args(["--steps", "0", "--batch-size", "1", "--out-params"])
        .arg(out)
        .arg("--out-metrics")
        .arg(&metrics);
    if let Some(t) = tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    run_ok(&mut cmd)?;
    let _ = std::fs::remove_file(&metrics);
    Ok(read_safetensors(&std::fs::read(out)?)?.0)
}

/// The cameras a LeRobot checkpoint expects, as `zk0-agent dataset synth --camera` values
/// (`NAME:WIDTHxHEIGHT`), from the `VISUAL` entries of its config.json `input_features`
/// (`observation.images.<NAME>`, shape `[3, H, W]`). For the tiny model: `front:64x48`.
pub fn cameras_of(model: &Path) -> Result<Vec<String>> {
    let path = model.join("config.json");
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let feats = cfg["input_features"]
        .as_object()
        .with_context(|| format!("{} has no input_features", path.display()))?;
    let mut cams = Vec::new();
    for (key, f) in feats {
        if f["type"] != "VISUAL" {
            continue;
        }
        let name = key
            .strip_prefix("observation.images.")
            .with_context(|| format!("camera feature {key} is not observation.images.*"))?;
        let shape: Vec<u64> = f["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        anyhow::ensure!(shape.len() == 3, "{key}: shape {shape:?} is not [3, H, W]");
        cams.push(format!("{name}:{}x{}", shape[2], shape[1]));
    }
    anyhow::ensure!(!cams.is_empty(), "{} declares no camera", path.display());
    Ok(cams)
}

/// Writes a synthetic SO-100-like LeRobot v3.0 dataset with `zk0-agent dataset synth`
/// (`dir` is made absolute: the dataset writer needs absolute paths).
pub fn synth_dataset(
    zk0_agent: &Path,
    dir: &Path,
    cameras: &[String],
    seed: u64,
    episodes: usize,
    frames: usize,
) -> Result<PathBuf> {
    let dir = std::path::absolute(dir)?;
    let mut cmd = Command::new(zk0_agent);
    cmd.args(["dataset", "synth"])
        .arg(&dir)
        .args(["--episodes", &episodes.to_string()])
        .args(["--frames", &frames.to_string()])
        .args(["--vcodec", SYNTH_VCODEC])
        .args(["--seed", &seed.to_string()]);
    for c in cameras {
        cmd.args(["--camera", c]);
    }
    run_ok(&mut cmd).with_context(|| format!("generating {}", dir.display()))?;
    Ok(dir)
}

/// The `zk0-train` to run, or `None` after printing why the test is skipped; when `CI` is set
/// a missing worker is an error instead (CI must run the real-worker tests).
pub fn zk0_train_or_skip() -> Result<Option<PathBuf>> {
    match zk0_train() {
        Ok(p) => Ok(Some(p)),
        Err(why) if std::env::var_os("CI").is_some() => {
            anyhow::bail!("zk0-train cannot run and CI is set: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: zk0-train cannot run here: {why}");
            Ok(None)
        }
    }
}

/// Generated datasets for `clients` (one per client, seeds 1, 2, …: 2 episodes × 20 frames,
/// the tiny model's camera), under `dir/<cid>`.
pub fn tiny_datasets(
    dir: &Path,
    clients: &[(&str, u64, &str)],
) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let cameras = cameras_of(&tiny_model_dir())?;
    let mut out = std::collections::BTreeMap::new();
    for (i, (cid, _, _)) in clients.iter().enumerate() {
        let ds = synth_dataset(
            &crate::bin("zk0-agent"),
            &dir.join(cid),
            &cameras,
            i as u64 + 1,
            2,
            20,
        )?;
        out.insert(cid.to_string(), ds);
    }
    Ok(out)
}

/// A [`Federation`](crate::federation::Federation) whose agents run the real `zk0-train` on
/// the tiny SmolVLA fixture (global model: its trainable tensors), each on its dataset from
/// `datasets` (see [`tiny_datasets`]), weighted by the clients' example counts, with
/// `local_steps` steps of batch 4 per round and one libtorch thread per worker (2-core CI).
pub fn real_federation(
    dir: &Path,
    kind: crate::federation::BrokerKind,
    train: &Path,
    clients: &[(&str, u64, &str)],
    datasets: &std::collections::BTreeMap<String, PathBuf>,
    local_steps: u32,
) -> Result<crate::federation::Federation> {
    let initial = tiny_trainable()?;
    let mut fed =
        crate::federation::Federation::setup_with_model(dir, kind, train, clients, &initial)?;
    // ~1.8 MB of f32 trainable tensors: several chunks per update and per model.
    fed.chunk_size = 256 << 10;
    fed.aggregator_toml =
        format!("[rounds]\nlocal_steps = {local_steps}\nbatch_size = 4\nlr = 1e-3\nmu = 0.01\n");
    fed.agent_toml = format!(
        "model_dir = {:?}\ntokenizer = {:?}\nworker_args = [\"--threads\", \"1\"]\n",
        tiny_model_dir(),
        tiny_tokenizer()
    );
    for (cid, examples, _) in clients {
        let ds = datasets
            .get(*cid)
            .with_context(|| format!("no dataset for {cid}"))?;
        fed.datasets.insert(cid.to_string(), ds.clone());
        fed.agent_extra
            .insert(cid.to_string(), format!("examples = {examples}"));
    }
    Ok(fed)
}

/// The real worker started `delay_s` seconds late (`sh -c 'sleep …; exec zk0-train "$@"'`), as
/// an agent's worker command: it still trains and writes exactly what `zk0-train` writes, but
/// the test knows this client reports last, so it can act while the round collects.
pub fn delayed_worker(train: &Path, delay_s: f64) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("sleep {delay_s}; exec \"$0\" \"$@\""),
        train.display().to_string(),
        "train".into(),
    ]
}

/// What a run of the real worker must show in the aggregator's final `state`: every round
/// accepted every client and moved the model with a finite loss, and each agent's last worker
/// run (round `rounds`) wrote real `zk0-train` metrics for `local_steps` steps.
pub fn check_real_rounds(
    fed: &crate::federation::Federation,
    state: &serde_json::Value,
    clients: &[(&str, u64, &str)],
    rounds: u64,
    local_steps: u32,
) -> Result<()> {
    let history = state["history"].as_array().context("history")?;
    anyhow::ensure!(history.len() as u64 == rounds, "{} rounds", history.len());
    let all: Vec<&str> = clients.iter().map(|(cid, _, _)| *cid).collect();
    for h in history {
        anyhow::ensure!(
            h["accepted"] == serde_json::json!(all),
            "round {}: accepted {}",
            h["round"],
            h["accepted"]
        );
        anyhow::ensure!(
            h["model_id"] != h["base_model_id"],
            "round {}: the model did not move",
            h["round"]
        );
        let loss = h["metrics"]["loss"].as_f64().context("round loss")?;
        anyhow::ensure!(loss.is_finite() && loss > 0.0, "round loss {loss}");
    }
    let tensors = tiny_trainable()?.len();
    for (cid, _, _) in clients {
        let path = fed
            .dir
            .join(cid)
            .join(format!("work/round-{rounds}/metrics.json"));
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        anyhow::ensure!(
            m["steps"] == local_steps
                && m["examples"] == 4 * local_steps
                && m["trainable_tensors"] == tensors,
            "{cid}: {m}"
        );
        anyhow::ensure!(
            m["update_norm"].as_f64().is_some_and(|u| u > 0.0),
            "{cid}: {m}"
        );
    }
    Ok(())
}
