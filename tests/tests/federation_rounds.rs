//! End-to-end: one real `zk0-aggregator`, three real `zk0-agent` daemons (running the fast,
//! test-only `zk0-fake-worker`; `federation_smolvla` runs the real `zk0-train`), three FedProx
//! rounds over a real MQTT broker on loopback. robot-c's worker writes a delta
//! (`worker_output = "delta"`), the others trained tensors (the agent subtracts the global). After every round the model published on the wire must equal,
//! within 1e-6, the example-weighted average the test recomputes from the deltas it observed.
//!
//! The daemons are built by `cargo build -p aggregator -p edge-agent` from the test (see
//! `zk0_e2e::ensure_built`).

use std::time::Duration;

use anyhow::Result;
use zk0_e2e::federation::{find_mosquitto, BrokerKind, Federation, Observer};

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

#[test]
fn three_rounds_on_mosquitto() -> Result<()> {
    if find_mosquitto().is_none() {
        eprintln!("SKIPPED: mosquitto is not installed (apt install mosquitto)");
        return Ok(());
    }
    three_rounds(BrokerKind::Mosquitto)
}
