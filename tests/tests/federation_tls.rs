//! End-to-end: mqtts on the embedded broker with a certificate from
//! `zk0-aggregator certs init`; an agent that trusts the CA (and logs in) completes a round,
//! and a plain-TCP client cannot talk MQTT to the TLS listener.

use std::time::{Duration, Instant};

use anyhow::Result;
use rumqttc_ring::{Client, Event, MqttOptions, Packet};
use zk0_e2e::federation::{BrokerKind, Federation};

#[test]
fn agent_completes_a_round_over_mqtts_and_plain_mqtt_is_refused() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let worker = env!("CARGO_BIN_EXE_zk0-fake-worker");
    let mut fed = Federation::setup(
        tmp.path(),
        BrokerKind::Embedded,
        worker.as_ref(),
        &[("robot-a", 50, "int8")],
    )?;
    let certs = tmp.path().join("certs");
    zk0_e2e::run_ok(
        std::process::Command::new(zk0_e2e::bin("zk0-aggregator"))
            .args(["certs", "init", "--dir"])
            .arg(&certs),
    )?;
    fed.tls_dir = Some(certs);
    fed.users.insert("robot-a".into(), "pw-robot-a".into());
    let r = (|| -> Result<()> {
        fed.start_aggregator(1, 30.0, &[])?;
        // Plain MQTT against the TLS listener: no CONNACK.
        let (_c, mut conn) = Client::new(
            MqttOptions::new("zk0-test-plain", "127.0.0.1", fed.port),
            10,
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if let Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) =
                conn.recv_timeout(Duration::from_millis(300))
            {
                anyhow::bail!("plain MQTT was accepted on the TLS listener");
            }
        }
        fed.start_agent("robot-a", 1)?;
        let st = fed
            .aggregator
            .as_mut()
            .map(|a| a.wait_timeout(Duration::from_secs(60)))
            .transpose()?;
        anyhow::ensure!(
            st.is_some_and(|s| s.success()),
            "aggregator exited with {st:?}"
        );
        let state = fed.state()?;
        anyhow::ensure!(
            state["history"][0]["accepted"] == serde_json::json!(["robot-a"]),
            "round 1: {:?}",
            state["history"][0]
        );
        eprintln!("round 1 completed over mqtts");
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
