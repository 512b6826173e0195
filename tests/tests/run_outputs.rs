//! End-to-end: the aggregator's run outputs with real daemons over loopback MQTT — server
//! evaluation through an eval worker (the test-only `zk0-fake-eval`, whose loss is the mean
//! square of the evaluated model, so the test recomputes it), `round_NNN_server_eval.json`,
//! `policy_loss_history.json`, plots, LeRobot-layout checkpoints with a model card, and
//! `init --resume`: a run stopped at round 3 of 5 and resumed ends with the same final model as
//! an uninterrupted run (the fake training worker's updates are a deterministic function of
//! the global model); and a run whose aggregator is killed with `SIGKILL` at every step of a
//! round's close (aggregation, server evaluation, completion, output writing, checkpoint),
//! restarted each time, ends with every output exactly once and the uninterrupted run's models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use shared_proto::tensor::{read_safetensors, write_safetensors, Tensor, TensorSet};
use zk0_e2e::federation::{tiny_model, BrokerKind, Federation};
use zk0_e2e::{bin, run_ok};

const CLIENTS: [(&str, u64, &str); 2] = [("robot-a", 60, "f32"), ("robot-b", 140, "int8")];
const FROZEN: &str = "model.vlm_with_expert.vlm.frozen.weight";

/// A LeRobot-like base checkpoint: config, processor file, and weights holding the federation's
/// trainable tensors plus a frozen one.
fn base_checkpoint(dir: &Path) -> Result<PathBuf> {
    let base = dir.join("base");
    std::fs::create_dir_all(&base)?;
    std::fs::write(base.join("config.json"), r#"{"type": "smolvla"}"#)?;
    std::fs::write(base.join("policy_preprocessor.json"), r#"{"steps": []}"#)?;
    let mut m = tiny_model();
    m.insert(
        FROZEN.into(),
        Tensor::new(vec![4], vec![1.0, 2.0, 3.0, 4.0])?,
    );
    std::fs::write(
        base.join("model.safetensors"),
        write_safetensors(&m, &BTreeMap::new()),
    )?;
    Ok(base)
}

fn mean_square(m: &TensorSet) -> f64 {
    let (mut s, mut n) = (0.0f64, 0usize);
    for t in m.values() {
        for x in &t.data {
            s += f64::from(*x) * f64::from(*x);
            n += 1;
        }
    }
    s / n as f64
}

fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
        .with_context(|| format!("parsing {}", p.display()))
}

fn federation(dir: &Path, base: &Path, heldout: &Path) -> Result<Federation> {
    std::fs::create_dir_all(dir)?;
    let mut fed = Federation::fake(dir, BrokerKind::Embedded, &CLIENTS)?;
    fed.aggregator_toml = format!(
        "[rounds]\nbase_model = {base:?}\n[outputs.eval]\ndataset = {heldout:?}\nworker = {w:?}\n\
         [outputs.checkpoint]\nevery = 2\n",
        w = env!("CARGO_BIN_EXE_zk0-fake-eval"),
    );
    Ok(fed)
}

/// Runs the aggregator until `rounds` are done, with agents doing `agent_rounds` each.
fn run_rounds(fed: &mut Federation, rounds: u64, agent_rounds: u64) -> Result<()> {
    fed.start_aggregator(rounds, 60.0, &[])?;
    for (cid, _, _) in CLIENTS {
        fed.start_agent(cid, agent_rounds)?;
    }
    let st = fed
        .aggregator
        .as_mut()
        .context("no aggregator")?
        .wait_timeout(Duration::from_secs(120))?;
    anyhow::ensure!(st.success(), "aggregator exited with {st}");
    for (cid, _, _) in CLIENTS {
        if let Some(a) = fed.agents.get_mut(cid) {
            a.wait_timeout(Duration::from_secs(20))?;
        }
    }
    Ok(())
}

/// Checks every output of a finished 5-round run against the stored models. `stopped_at`:
/// the round a first run ended at (it wrote a checkpoint there too).
fn check_outputs(fed: &Federation, base: &Path, stopped_at: Option<u64>) -> Result<()> {
    let st = fed.state()?;
    let history = st["history"].as_array().context("history")?;
    anyhow::ensure!(
        history.len() == 5,
        "{} rounds in the history",
        history.len()
    );
    let dir = &fed.state_dir;

    // policy_loss_history.json: rounds 0 (initial model) to 5, each the eval of that model.
    let plh = read_json(&dir.join("policy_loss_history.json"))?;
    let points = plh["points"].as_array().context("points")?;
    let rounds: Vec<u64> = points.iter().filter_map(|p| p["round"].as_u64()).collect();
    anyhow::ensure!(
        rounds == vec![0, 1, 2, 3, 4, 5],
        "history rounds {rounds:?}"
    );
    for p in points {
        let id = p["model_id"].as_str().context("model_id")?;
        let want = mean_square(&fed.model(id)?);
        let got = p["policy_loss"].as_f64().context("policy_loss")?;
        anyhow::ensure!(got == want, "round {}: loss {got} != {want}", p["round"]);
    }
    anyhow::ensure!(
        points[0]["model_id"] == history[0]["base_model_id"],
        "round 0 is not the initial model"
    );

    // round_NNN_server_eval.json: aggregated, server eval and per-client records.
    for (i, h) in history.iter().enumerate() {
        let r = i as u64 + 1;
        let rec = read_json(&dir.join(format!("round_{r:03}_server_eval.json")))?;
        anyhow::ensure!(rec["model_id"] == h["model_id"], "round {r}: model id");
        anyhow::ensure!(
            rec["aggregated"] == h["metrics"],
            "round {r}: aggregated metrics"
        );
        anyhow::ensure!(
            rec["server_eval"]["policy_loss"] == points[i + 1]["policy_loss"],
            "round {r}: server eval differs from the history"
        );
        let clients = rec["clients"].as_array().context("clients")?;
        anyhow::ensure!(clients.len() == 2, "round {r}: {} clients", clients.len());
        let mut total = 0;
        for (c, (cid, examples, codec)) in clients.iter().zip(CLIENTS) {
            anyhow::ensure!(c["client_id"] == cid && c["codec"] == codec, "{c}");
            anyhow::ensure!(c["examples"] == examples, "{c}");
            // No `[datasets]` in this config: the dataset each agent reports in its status.
            anyhow::ensure!(
                c["dataset"]
                    .as_str()
                    .is_some_and(|d| d.ends_with(&format!("ds-{cid}"))),
                "dataset in {c}"
            );
            for k in ["loss", "fedprox_loss", "grad_norm", "update_norm"] {
                anyhow::ensure!(c[k].as_f64().is_some_and(f64::is_finite), "{k} in {c}");
            }
            anyhow::ensure!(c["update_norm"].as_f64() > Some(0.0), "{c}");
            total += c["bytes"].as_u64().context("bytes")?;
        }
        anyhow::ensure!(rec["bytes_received"] == total, "round {r}: bytes");
    }
    anyhow::ensure!(
        read_json(&dir.join("federated_metrics.json"))?
            .as_array()
            .map(Vec::len)
            == Some(5)
    );

    // Plots: PNG and SVG of each.
    for stem in [
        "server_policy_loss",
        "client_loss",
        "update_norms",
        "bytes_per_round",
    ] {
        let png = std::fs::read(dir.join(format!("plots/{stem}.png")))?;
        anyhow::ensure!(png.len() > 2000 && &png[1..4] == b"PNG", "{stem}.png");
        let svg = std::fs::read_to_string(dir.join(format!("plots/{stem}.svg")))?;
        anyhow::ensure!(
            svg.contains("<svg") && svg.contains("polyline"),
            "{stem}.svg"
        );
    }

    // Checkpoints every 2 rounds and at the end, in LeRobot's layout.
    for r in [2, 4, 5] {
        anyhow::ensure!(
            dir.join(format!(
                "checkpoints/round_{r:03}/pretrained_model/model.safetensors"
            ))
            .is_file(),
            "no checkpoint for round {r}"
        );
    }
    anyhow::ensure!(
        dir.join("checkpoints/round_003").exists() == (stopped_at == Some(3)),
        "a round-3 checkpoint only where a run ended at round 3"
    );
    let pm = dir.join("checkpoints/round_005/pretrained_model");
    for f in [
        "config.json",
        "policy_preprocessor.json",
        "README.md",
        "metrics.json",
    ] {
        anyhow::ensure!(pm.join(f).is_file(), "checkpoint lacks {f}");
    }
    let final_id = history[4]["model_id"].as_str().context("model id")?;
    let global = fed.model(final_id)?;
    let (weights, _) = read_safetensors(&std::fs::read(pm.join("model.safetensors"))?)?;
    for (name, t) in &global {
        anyhow::ensure!(weights[name] == *t, "{name} is not the global tensor");
    }
    let (base_w, _) = read_safetensors(&std::fs::read(base.join("model.safetensors"))?)?;
    anyhow::ensure!(
        weights[FROZEN] == base_w[FROZEN],
        "the frozen tensor changed"
    );
    anyhow::ensure!(weights.len() == base_w.len());

    // The model card states the run's values.
    let card = std::fs::read_to_string(pm.join("README.md"))?;
    let cell = |key: &str| -> Option<String> {
        card.lines()
            .find(|l| l.starts_with(&format!("| {key} |")))
            .and_then(|l| l.split('|').nth(2))
            .map(|v| v.trim().to_string())
    };
    let metrics = read_json(&pm.join("metrics.json"))?;
    let fin = &metrics["final"];
    let num = |k: &str| cell(k).and_then(|v| v.parse::<f64>().ok());
    anyhow::ensure!(num("final_policy_loss") == points[5]["policy_loss"].as_f64());
    anyhow::ensure!(num("final_policy_loss") == fin["final_policy_loss"].as_f64());
    anyhow::ensure!(num("initial_policy_loss") == points[0]["policy_loss"].as_f64());
    let best = points[1..]
        .iter()
        .filter_map(|p| p["policy_loss"].as_f64())
        .fold(f64::INFINITY, f64::min);
    anyhow::ensure!(num("best_policy_loss") == Some(best));
    anyhow::ensure!(cell("rounds_completed").as_deref() == Some("5"));
    anyhow::ensure!(
        num("client_loss") == history[4]["metrics"]["loss"].as_f64(),
        "client loss in the card"
    );
    anyhow::ensure!(num("local_steps").is_some() && num("mu").is_some());
    anyhow::ensure!(card.contains(&format!("base_model: {}", base.display())));
    anyhow::ensure!(card.contains(final_id));
    anyhow::ensure!(metrics["federated_metrics"].as_array().map(Vec::len) == Some(5));
    Ok(())
}

/// The base checkpoint, the held-out dataset and an uninterrupted 5-round run (its outputs
/// checked), in `dir`: what the interrupted runs are compared with.
fn uninterrupted(dir: &Path) -> Result<(PathBuf, PathBuf, Federation)> {
    zk0_e2e::ensure_built()?;
    let base = base_checkpoint(dir)?;
    let heldout = dir.join("heldout");
    std::fs::create_dir_all(&heldout)?;
    let mut a = federation(&dir.join("a"), &base, &heldout)?;
    let result = run_rounds(&mut a, 5, 5).and_then(|()| check_outputs(&a, &base, None));
    if let Err(e) = result {
        anyhow::bail!("{e:#}\n{}", a.logs());
    }
    Ok((base, heldout, a))
}

#[test]
fn outputs_checkpoints_and_resume_match_an_uninterrupted_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, heldout, a) = uninterrupted(tmp.path())?;

    // Stopped after round 3, resumed from the round-3 checkpoint into the same state dir.
    let mut b = federation(&tmp.path().join("b"), &base, &heldout)?;
    let result = (|| -> Result<()> {
        run_rounds(&mut b, 3, 3)?;
        let ckpt = b.state_dir.join("checkpoints/round_003");
        anyhow::ensure!(ckpt.join("training_state/zk0_state.json").is_file());
        let out = run_ok(
            Command::new(bin("zk0-aggregator"))
                .arg("--state-dir")
                .arg(&b.state_dir)
                .args(["init", "--force", "--resume"])
                .arg(&ckpt),
        )?;
        anyhow::ensure!(out.contains("at round 4"), "{out}");
        anyhow::ensure!(b.state()?["round"] == 4);
        run_rounds(&mut b, 5, 2)?;
        check_outputs(&b, &base, Some(3))
    })();
    if let Err(e) = result {
        anyhow::bail!("{e:#}\n{}", b.logs());
    }
    let (sa, sb) = (a.state()?, b.state()?);
    anyhow::ensure!(
        sa["model_id"] == sb["model_id"],
        "resumed final model {} != uninterrupted {}",
        sb["model_id"],
        sa["model_id"]
    );
    anyhow::ensure!(model_ids(&sa) == model_ids(&sb), "per-round models differ");
    anyhow::ensure!(
        read_json(&a.state_dir.join("policy_loss_history.json"))?
            == read_json(&b.state_dir.join("policy_loss_history.json"))?
    );
    Ok(())
}

/// The per-round model ids of a state.
fn model_ids(s: &Value) -> Vec<Value> {
    s["history"]
        .as_array()
        .map(|h| h.iter().map(|r| r["model_id"].clone()).collect())
        .unwrap_or_default()
}

/// Where the interrupted run's aggregator is held and killed (`ZK0_HOLD_AT`): one step of
/// the close of each round, in the order a close takes them.
const CRASH_POINTS: [&str; 5] = [
    "aggregate:1",   // the fold done, the model not saved
    "server_eval:2", // the eval worker started, its result not recorded
    "complete:3",    // the outputs recorded as pending, the completion not saved
    "outputs:4",     // the round record written, plots and checkpoint not
    "checkpoint:5",  // the checkpoint written to its temporary dir, not renamed
];

#[test]
fn kill_9_at_every_step_of_a_round_close_is_repaired_on_restart() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, heldout, a) = uninterrupted(tmp.path())?;

    let mut b = federation(&tmp.path().join("b"), &base, &heldout)?;
    let result = (|| -> Result<()> {
        let log = b.dir.join("aggregator.log");
        let held = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("holding at crash point")
                .count()
        };
        for (i, point) in CRASH_POINTS.iter().enumerate() {
            b.aggregator_env
                .insert("ZK0_HOLD_AT".into(), point.to_string());
            b.start_aggregator(5, 60.0, &[])?;
            if i == 0 {
                for (cid, _, _) in CLIENTS {
                    b.start_agent(cid, 5)?;
                }
            }
            zk0_e2e::wait_for(
                Duration::from_secs(90),
                &format!("the hold at {point}"),
                || (held() > i).then_some(()),
            )?;
            b.aggregator.as_mut().context("aggregator")?.kill(); // SIGKILL
        }
        b.aggregator_env.clear();
        b.start_aggregator(5, 60.0, &[])?;
        b.wait_aggregator_ok(Duration::from_secs(120))?;
        for (cid, _, _) in CLIENTS {
            if let Some(ag) = b.agents.get_mut(cid) {
                ag.wait_timeout(Duration::from_secs(20))?;
            }
        }
        check_outputs(&b, &base, None)?;
        let dir = &b.state_dir;
        let pending = std::fs::read_dir(dir.join("pending"))?.count();
        anyhow::ensure!(pending == 0, "{pending} rounds still pending");
        for e in std::fs::read_dir(dir.join("checkpoints"))? {
            let name = e?.file_name().to_string_lossy().to_string();
            anyhow::ensure!(!name.starts_with('.'), "leftover {name}");
        }
        for sub in ["spool", "accepted", "scratch"] {
            let left = std::fs::read_dir(dir.join(sub))
                .map(|d| d.count())
                .unwrap_or(0);
            anyhow::ensure!(left == 0, "{left} round dirs left in {sub}/");
        }
        Ok(())
    })();
    if let Err(e) = result {
        anyhow::bail!("{e:#}\n{}", b.logs());
    }
    let (sa, sb) = (a.state()?, b.state()?);
    anyhow::ensure!(
        model_ids(&sa) == model_ids(&sb),
        "per-round models after the kills {:?} differ from the uninterrupted run's {:?}",
        model_ids(&sb),
        model_ids(&sa)
    );
    anyhow::ensure!(
        read_json(&a.state_dir.join("policy_loss_history.json"))?
            == read_json(&b.state_dir.join("policy_loss_history.json"))?,
        "the policy-loss histories differ"
    );
    Ok(())
}

#[test]
fn init_warm_starts_from_a_checkpoint_dir_or_the_hub_cache() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let agg = bin("zk0-aggregator");
    let state = |name: &str| tmp.path().join(name);
    let model_of = |state_dir: &Path| -> Result<TensorSet> {
        let st = read_json(&state_dir.join("state.json"))?;
        let id = st["model_id"].as_str().context("model_id")?;
        let b = std::fs::read(state_dir.join(format!("models/{id}.safetensors")))?;
        Ok(read_safetensors(&b)?.0)
    };

    // The vendored tiny SmolVLA: the trainable set must be the one LeRobot reported.
    let tiny = zk0_e2e::smolvla::tiny_model_dir();
    run_ok(
        Command::new(&agg)
            .arg("--state-dir")
            .arg(state("tiny"))
            .args(["init", "--init"])
            .arg(&tiny),
    )?;
    let got = model_of(&state("tiny"))?;
    let want = zk0_e2e::smolvla::tiny_trainable()?;
    anyhow::ensure!(
        got.keys().collect::<Vec<_>>() == want.keys().collect::<Vec<_>>(),
        "trainable names differ from LeRobot's"
    );
    anyhow::ensure!(got == want, "trainable values differ from the checkpoint's");

    // A Hub id resolved through the local Hugging Face cache (offline), names from --model.
    let base = base_checkpoint(&tmp.path().join("src"))?;
    let snap = tmp.path().join("hf/hub/models--zk0--tiny/snapshots/abc123");
    std::fs::create_dir_all(&snap)?;
    std::fs::create_dir_all(tmp.path().join("hf/hub/models--zk0--tiny/refs"))?;
    std::fs::write(
        tmp.path().join("hf/hub/models--zk0--tiny/refs/main"),
        "abc123",
    )?;
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(base.join(f), snap.join(f))?;
    }
    let mut like = tiny_model();
    like.values_mut()
        .for_each(|t| t.data.iter_mut().for_each(|x| *x = 0.0));
    let like_path = tmp.path().join("like.safetensors");
    std::fs::write(&like_path, write_safetensors(&like, &BTreeMap::new()))?;
    run_ok(
        Command::new(&agg)
            .env("HF_HOME", tmp.path().join("hf"))
            .arg("--state-dir")
            .arg(state("hub"))
            .args(["init", "--init", "zk0/tiny", "--model"])
            .arg(&like_path),
    )?;
    anyhow::ensure!(model_of(&state("hub"))? == tiny_model(), "hub warm start");

    // Clear errors for what is not there.
    let out = Command::new(&agg)
        .env("HF_HOME", tmp.path().join("hf"))
        .arg("--state-dir")
        .arg(state("none"))
        .args(["init", "--init", "zk0/absent"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success() && err.contains("not in the local Hugging Face cache"),
        "{err}"
    );
    let out = Command::new(&agg)
        .arg("--state-dir")
        .arg(state("none"))
        .args(["init", "--resume"])
        .arg(tmp.path().join("no-such-checkpoint"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success() && err.contains("zk0_state.json") && !err.contains("panicked"),
        "{err}"
    );
    Ok(())
}
