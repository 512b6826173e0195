//! End-to-end: one real `zk0-aggregator`, three real `zk0-agent` daemons, three FedProx rounds
//! over a real MQTT broker on loopback. After every round the model published on the wire must
//! equal, within 1e-6, the example-weighted average the test recomputes from the deltas it
//! observed.
//!
//! - `three_rounds_of_real_smolvla_training_on_mosquitto`: the agents run the real `zk0-train`
//!   on the tiny SmolVLA fixture and generated SO-100-like datasets, through a mosquitto the
//!   test starts (skipped when mosquitto is not installed, or when `zk0-train` cannot run and
//!   `CI` is unset). The embedded-broker twin is `federation_smolvla`.
//! - `three_rounds_on_the_embedded_broker`: the test-only `zk0-fake-worker`, for what the real
//!   worker never does: robot-c's worker writes a delta (`worker_output = "delta"`) instead of
//!   trained tensors, so the agent's delta path is covered too.
//!
//! The daemons are built by `cargo build -p aggregator -p edge-agent` from the test (see
//! `zk0_e2e::ensure_built`), `zk0-train` by `cargo build -p trainer` (`zk0_e2e::smolvla`).

use std::time::Duration;

use anyhow::{Context, Result};
use zk0_e2e::federation::{find_mosquitto, BrokerKind, Federation, Observer};
use zk0_e2e::smolvla;

const CLIENTS: [(&str, u64, &str); 3] = [
    ("robot-a", 50, "f32"),
    ("robot-b", 120, "int8"),
    ("robot-c", 300, "bf16"),
];

fn three_rounds(kind: BrokerKind) -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::setup(
        tmp.path(),
        kind,
        env!("CARGO_BIN_EXE_zk0-fake-worker").as_ref(),
        &CLIENTS,
    )?;
    fed.agent_extra
        .insert("robot-c".into(), "worker_output = \"delta\"".into());
    let result = (|| -> Result<usize> {
        if !fed.start_broker()? {
            return Ok(0);
        }
        fed.start_aggregator(3, 60.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        for (cid, _, _) in CLIENTS {
            fed.start_agent(cid, 3)?;
        }
        let st = fed
            .aggregator
            .as_mut()
            .map(|a| a.wait_timeout(Duration::from_secs(180)))
            .transpose()?;
        anyhow::ensure!(
            st.is_some_and(|s| s.success()),
            "aggregator exited with {st:?}"
        );
        // Give the observer a moment to drain the last publishes.
        std::thread::sleep(Duration::from_millis(500));
        let seen = observer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        let n = fed.verify_rounds(&seen)?;
        anyhow::ensure!(n == 3, "expected 3 rounds, state has {n}");
        for (cid, _, _) in CLIENTS {
            if let Some(a) = fed.agents.get_mut(cid) {
                let st = a.wait_timeout(Duration::from_secs(20))?;
                anyhow::ensure!(st.success(), "agent {cid} exited with {st}");
            }
        }
        Ok(n)
    })();
    match result {
        Ok(0) => {
            eprintln!("SKIPPED: mosquitto is not installed (apt install mosquitto)");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{e:#}\n{}", fed.logs())),
    }
}

#[test]
fn three_rounds_on_the_embedded_broker() -> Result<()> {
    three_rounds(BrokerKind::Embedded)
}

/// (id, aggregation weight, codec) for the real-worker run: different weights and codecs.
const ARMS: [(&str, u64, &str); 3] = [
    ("arm-a", 40, "f32"),
    ("arm-b", 100, "int8"),
    ("arm-c", 250, "bf16"),
];

#[test]
fn three_rounds_of_real_smolvla_training_on_mosquitto() -> Result<()> {
    if find_mosquitto().is_none() {
        eprintln!("SKIPPED: mosquitto is not installed (apt install mosquitto)");
        return Ok(());
    }
    zk0_e2e::ensure_built()?;
    let Some(train) = smolvla::zk0_train_or_skip()? else {
        return Ok(());
    };
    let t0 = std::time::Instant::now();
    let tmp = tempfile::tempdir()?;
    let datasets = smolvla::tiny_datasets(&tmp.path().join("datasets"), &ARMS)?;
    let mut fed = smolvla::real_federation(
        tmp.path(),
        BrokerKind::Mosquitto,
        &train,
        &ARMS,
        &datasets,
        3,
    )?;
    let result = (|| -> Result<()> {
        anyhow::ensure!(fed.start_broker()?, "mosquitto did not start");
        fed.start_aggregator(3, 120.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        for (cid, _, _) in ARMS {
            fed.start_agent(cid, 3)?;
        }
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(150))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        std::thread::sleep(Duration::from_millis(500));
        let seen = observer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        anyhow::ensure!(fed.verify_rounds(&seen)? == 3, "expected 3 rounds");
        let state = fed.state()?;
        for h in state["history"].as_array().context("history")? {
            anyhow::ensure!(
                h["accepted"] == serde_json::json!(["arm-a", "arm-b", "arm-c"]),
                "round {}: accepted {}",
                h["round"],
                h["accepted"]
            );
            anyhow::ensure!(
                h["model_id"] != h["base_model_id"],
                "the model did not move"
            );
        }
        // Real zk0-train runs produced the updates, not a stand-in.
        for (cid, _, _) in ARMS {
            let m: serde_json::Value = serde_json::from_slice(&std::fs::read(
                fed.dir.join(cid).join("work/round-3/metrics.json"),
            )?)?;
            anyhow::ensure!(
                m["steps"] == 3 && m["trainable_tensors"] == 47,
                "{cid}: {m}"
            );
            let st = fed
                .agents
                .get_mut(cid)
                .context("agent")?
                .wait_timeout(Duration::from_secs(20))?;
            anyhow::ensure!(st.success(), "agent {cid} exited with {st}");
        }
        Ok(())
    })();
    eprintln!("real-worker rounds on mosquitto took {:.1?}", t0.elapsed());
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
