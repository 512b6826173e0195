//! `[infer] follow_global` end-to-end: one `zk0-agent run` with the real `zk0-train` worker on
//! the tiny SmolVLA, two rounds over mosquitto (its retained messages outlive the aggregator,
//! so the final model is still there to fetch after the last round). The agent exports every
//! verified global model; once the aggregator is done, `exports/current.json` must name the
//! final model and `zk0-agent infer --bench 1` must run on that export.
//!
//! Skipped (with a message) when `zk0-train` cannot run (libtorch), mosquitto is missing or
//! `ORT_DYLIB_PATH` is not set, unless `CI` is set.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use zk0_e2e::federation::BrokerKind;
use zk0_e2e::smolvla;

const CLIENTS: [(&str, u64, &str); 1] = [("arm-a", 40, "f32")];

fn skip(why: &str) -> Result<()> {
    anyhow::ensure!(std::env::var_os("CI").is_none(), "CI: {why}");
    eprintln!("SKIPPED: {why}");
    Ok(())
}

#[test]
fn an_agent_following_the_global_model_ends_on_the_final_export() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let Some(train) = smolvla::zk0_train_or_skip()? else {
        return Ok(());
    };
    let Some(ort) = std::env::var_os("ORT_DYLIB_PATH") else {
        return skip("ORT_DYLIB_PATH is not set");
    };
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let datasets = smolvla::tiny_datasets(&tmp.path().join("datasets"), &CLIENTS)?;
    let mut fed = smolvla::real_federation(
        tmp.path(),
        BrokerKind::Mosquitto,
        &train,
        &CLIENTS,
        &datasets,
        2,
    )?;
    if !fed.start_broker()? {
        return skip("mosquitto is not installed");
    }
    // `[infer]` last: the exporter defaults to the worker's program, `zk0-train export-onnx`.
    let extra = fed.agent_extra.entry("arm-a".into()).or_default();
    extra.push_str("\n[infer]\nfollow_global = true\nexport_timeout_secs = 300\n");
    let result = (|| -> Result<()> {
        fed.start_aggregator(2, 120.0, &[])?;
        fed.start_agent("arm-a", 0)?; // runs on after the rounds, as under systemd
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(300))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        let final_id = state["model_id"].as_str().context("model_id")?.to_string();
        anyhow::ensure!(state["history"].as_array().map(Vec::len) == Some(2));
        let exports = fed.dir.join("arm-a/work/exports");
        let current = zk0_e2e::wait_for(
            Duration::from_secs(180),
            "current.json naming the final model",
            || {
                let b = std::fs::read(exports.join("current.json")).ok()?;
                let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
                (v["model_id"] == final_id.as_str()).then_some(v)
            },
        )?;
        fed.kill_agent("arm-a")?;
        let dir = current["dir"].as_str().context("dir")?;
        anyhow::ensure!(dir.ends_with(&final_id), "{current}");
        // The newest two exports are kept: the final model's and the one before.
        let kept: Vec<_> = std::fs::read_dir(&exports)?
            .flatten()
            .filter(|e| e.path().is_dir())
            .collect();
        anyhow::ensure!(kept.len() == 2, "{} exports kept", kept.len());
        let out = Command::new(zk0_e2e::bin("zk0-agent"))
            .args(["infer", "--bench", "1", "--threads", "1", "--model", dir])
            .env("ORT_DYLIB_PATH", &ort)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "zk0-agent infer --bench 1 on the final export: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })();
    eprintln!("federation_follow took {:.1?}", t0.elapsed());
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
