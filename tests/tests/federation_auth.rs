//! End-to-end: the embedded broker with per-client credentials (no `--insecure`). An agent with
//! its password completes a round; clients with a wrong password or none are refused, and so is
//! a right password under another client's MQTT client id (a login is bound to its own id, so
//! robot A can neither act as robot B nor take over B's session). TLS: `federation_tls.rs`.

use std::time::{Duration, Instant};

use anyhow::Result;
use rumqttc_ring::{Client, ConnectReturnCode, Event, MqttOptions, Packet};
use zk0_e2e::federation::{BrokerKind, Federation, Observer};

/// Whether a client with this login gets a successful CONNACK within 3 s, connecting as the
/// agent of `as_client`.
fn can_connect(port: u16, as_client: &str, login: Option<(&str, &str)>) -> bool {
    let mut opts = MqttOptions::new(
        zk0_daemon::mqtt::agent_client_id(as_client),
        "127.0.0.1",
        port,
    );
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (_c, mut conn) = Client::new(opts, 10);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => {
                return a.code == ConnectReturnCode::Success
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return false,
            Err(_) => {}
        }
    }
    false
}

#[test]
fn broker_credentials_admit_the_enrolled_agent_and_refuse_others() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(tmp.path(), BrokerKind::Embedded, &[("robot-a", 50, "int8")])?;
    fed.metrics_listen = format!("127.0.0.1:{}", zk0_e2e::free_port()?);
    fed.users.insert("robot-a".into(), "pw-robot-a".into());
    fed.users.insert("robot-b".into(), "pw-robot-b".into());
    fed.users.insert("observer".into(), "pw-observer".into());
    let r = (|| -> Result<()> {
        fed.start_aggregator(1, 30.0, &[])?;
        let observer =
            Observer::start_with(fed.port, &fed.federation, Some(("observer", "pw-observer")))?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        anyhow::ensure!(
            !can_connect(fed.port, "robot-a", Some(("robot-a", "wrong"))),
            "a wrong password was accepted"
        );
        anyhow::ensure!(
            !can_connect(fed.port, "robot-a", None),
            "a client without credentials was accepted"
        );
        // Robot A's valid login as robot B (B's client id: B's session) or as the aggregator.
        anyhow::ensure!(
            !can_connect(fed.port, "robot-b", Some(("robot-a", "pw-robot-a"))),
            "robot-a's login connected as robot-b"
        );
        anyhow::ensure!(
            !can_connect(fed.port, "intruder", Some(("robot-a", "pw-robot-a"))),
            "robot-a's login connected under a client id of its choosing"
        );
        anyhow::ensure!(
            can_connect(fed.port, "robot-a", Some(("robot-a", "pw-robot-a"))),
            "a right password under its own client id was refused"
        );
        let metrics = zk0_e2e::http_get(&fed.metrics_listen, "/metrics")?;
        for (reason, n) in [("wrong_password", 1), ("foreign_client_id", 2)] {
            let line = format!(
                "zk0_aggregator_broker_connects_refused_total{{reason=\"{reason}\"}} {n}\n"
            );
            anyhow::ensure!(metrics.contains(&line), "no {line:?} in\n{metrics}");
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
        std::thread::sleep(Duration::from_millis(300));
        let seen = observer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        anyhow::ensure!(fed.verify_rounds(&seen)? == 1, "expected 1 round");
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}

/// `keys revoke` and a key rotation on a running aggregator: the revoked client is dropped
/// from the round at once (the round closes with the other, not at its deadline) and its update
/// is refused (`unknown_key`); its new key, enrolled live, takes part in the next round.
#[test]
fn a_revoked_key_is_refused_live_and_a_rotated_one_takes_part() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(
        tmp.path(),
        BrokerKind::Embedded,
        &[("robot-a", 40, "f32"), ("robot-b", 60, "f32")],
    )?;
    fed.metrics_listen = format!("127.0.0.1:{}", zk0_e2e::free_port()?);
    let state_dir = fed.state_dir.clone();
    let keys = |args: &[&str], key: Option<&std::path::Path>| -> Result<String> {
        let mut cmd = std::process::Command::new(zk0_e2e::bin("zk0-aggregator"));
        cmd.arg("--state-dir")
            .arg(&state_dir)
            .arg("keys")
            .args(args);
        if let Some(k) = key {
            cmd.arg(k);
        }
        zk0_e2e::run_ok(&mut cmd)
    };
    let r = (|| -> Result<()> {
        // A 25 s deadline: round 2 must close long before it.
        fed.start_aggregator(3, 25.0, &[])?;
        let slow = [("ZK0_FAKE_WORKER_SLEEP_MS", "300")];
        fed.start_agent_env("robot-a", 3, &slow)?;
        fed.start_agent_env("robot-b", 3, &slow)?;
        fed.wait_state(Duration::from_secs(60), "round 2 to collect", |s| {
            s["round"] == 2 && s["phase"]["phase"] == "collecting"
        })?;
        let revoked_at = Instant::now();
        // robot-b's worker is still training (3 s a round): its update comes after this.
        keys(&["revoke", "robot-b"], None)?;
        let st = fed.wait_state(Duration::from_secs(40), "round 2 to close", |s| {
            s["round"] == 3
        })?;
        anyhow::ensure!(
            st["history"][1]["accepted"] == serde_json::json!(["robot-a"]),
            "round 2: {}",
            st["history"][1]
        );
        anyhow::ensure!(
            st["history"][1]["close_reason"] == "all_reported"
                && revoked_at.elapsed() < Duration::from_secs(20),
            "round 2 waited for robot-b until its deadline: {}",
            st["history"][1]
        );
        let metrics = zk0_e2e::wait_for(Duration::from_secs(20), "robot-b's refusal", || {
            let m = zk0_e2e::http_get(&fed.metrics_listen, "/metrics").ok()?;
            m.contains("zk0_aggregator_updates_rejected_total{reason=\"unknown_key\"}")
                .then_some(m)
        })?;
        anyhow::ensure!(
            !metrics.contains("zk0_aggregator_connected_clients 2"),
            "robot-b still counted online:\n{metrics}"
        );
        // Rotation: robot-b gets a new key, enrolled while the aggregator runs.
        fed.kill_agent("robot-b")?;
        let key = fed.dir.join("robot-b").join("agent.key");
        std::fs::remove_file(&key)?;
        std::fs::remove_file(key.with_extension("key.pub"))?;
        zk0_e2e::run_ok(
            std::process::Command::new(zk0_e2e::bin("zk0-agent"))
                .args(["keys", "init", "--key"])
                .arg(&key),
        )?;
        keys(
            &["enroll", "--client-id", "robot-b"],
            Some(&key.with_extension("key.pub")),
        )?;
        // It may still see round 2 (and count it): two rounds' worth.
        fed.start_agent_env("robot-b", 2, &slow)?;
        fed.wait_aggregator_ok(Duration::from_secs(90))?;
        let st = fed.state()?;
        anyhow::ensure!(
            st["history"][2]["accepted"] == serde_json::json!(["robot-a", "robot-b"]),
            "round 3: {}",
            st["history"][2]
        );
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
