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
//!   worker never does: robot-c's worker writes trained tensors (`worker_output = "params"`)
//!   instead of a delta, so the agent's subtracting path is covered too.
//!
//! The daemons are built by `cargo build -p aggregator -p edge-agent` from the test (see
//! `zk0_e2e::ensure_built`), `zk0-train` by `cargo build -p trainer` (`zk0_e2e::smolvla`).

use std::time::Duration;

use anyhow::Result;
use zk0_e2e::federation::{find_mosquitto, BrokerKind, Federation};
use zk0_e2e::smolvla;

const CLIENTS: [(&str, u64, &str); 3] = [
    ("robot-a", 50, "f32"),
    ("robot-b", 120, "int8"),
    ("robot-c", 300, "bf16"),
];

#[test]
fn three_rounds_on_the_embedded_broker() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(tmp.path(), BrokerKind::Embedded, &CLIENTS)?;
    fed.agent_extra
        .insert("robot-c".into(), "worker_output = \"params\"".into());
    let result = fed.run_rounds(&CLIENTS, 3, 60.0, Duration::from_secs(180));
    result
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
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
        let state = fed.run_rounds(&ARMS, 3, 120.0, Duration::from_secs(150))?;
        smolvla::check_real_rounds(&fed, &state, &ARMS, 3, 3)
    })();
    eprintln!("real-worker rounds on mosquitto took {:.1?}", t0.elapsed());
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
