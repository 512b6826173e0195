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
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let worker = env!("CARGO_BIN_EXE_zk0-fake-worker");
    let mut fed = Federation::setup(
        tmp.path(),
        BrokerKind::Embedded,
        worker.as_ref(),
        &[("robot-a", 50, "int8")],
    )?;
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
