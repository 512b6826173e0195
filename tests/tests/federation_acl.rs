//! End-to-end: mosquitto with the files `zk0-aggregator acl --mosquitto DIR` writes (password
//! file, ACL, conf snippet). Robot A's valid login publishing under robot B's topics, or as the
//! aggregator, reaches nobody (a subscriber with the aggregator's login sees only A's own
//! status); anonymous and wrong-password clients are refused; then a round runs with the files.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc_ring::{Client, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use zk0_e2e::federation::{BrokerKind, Federation};
use zk0_e2e::wait_for;

const AGG: (&str, &str) = ("zk0-aggregator", "pw-aggregator");

/// A client of `login` (as MQTT client id `id`), its events polled on a thread: whether it got
/// a successful CONNACK, and the topics of what it received.
struct Probe {
    client: Client,
    connected: Arc<Mutex<Option<bool>>>,
    topics: Arc<Mutex<Vec<String>>>,
}

impl Probe {
    fn start(port: u16, id: &str, login: Option<(&str, &str)>) -> Probe {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut conn) = Client::new(opts, 64);
        let connected = Arc::new(Mutex::new(None));
        let topics = Arc::new(Mutex::new(Vec::new()));
        let (c2, t2) = (connected.clone(), topics.clone());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        *c2.lock().unwrap() = Some(a.code == ConnectReturnCode::Success);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => t2.lock().unwrap().push(p.topic),
                    Ok(_) => {}
                    Err(rumqttc_ring::ConnectionError::RequestsDone) => return,
                    Err(_) => {
                        let mut c = c2.lock().unwrap();
                        if c.is_none() {
                            *c = Some(false);
                        }
                        return;
                    }
                }
            }
        });
        Probe {
            client,
            connected,
            topics,
        }
    }

    fn wait_connected(&self) -> Result<bool> {
        wait_for(Duration::from_secs(5), "a CONNACK", || {
            *self.connected.lock().unwrap()
        })
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

#[test]
fn mosquitto_with_the_generated_acl_confines_each_login_to_its_own_topics() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(
        tmp.path(),
        BrokerKind::Mosquitto,
        &[("robot-a", 40, "int8"), ("robot-b", 60, "f32")],
    )?;
    for c in ["robot-a", "robot-b"] {
        fed.users.insert(c.into(), format!("pw-{c}"));
    }
    fed.use_generated_acl(AGG)?;
    anyhow::ensure!(fed.start_broker()?, "mosquitto is not installed");
    let port = fed.port;
    let r = (|| -> Result<()> {
        anyhow::ensure!(
            !Probe::start(port, "anon", None).wait_connected()?,
            "anonymous login accepted"
        );
        anyhow::ensure!(
            !Probe::start(port, "robot-a", Some(("robot-a", "wrong"))).wait_connected()?,
            "wrong password accepted"
        );
        let p = format!("zk0/v1/{}", fed.federation);
        let watcher = Probe::start(port, "watcher", Some(AGG));
        anyhow::ensure!(
            watcher.wait_connected()?,
            "the aggregator's login was refused"
        );
        watcher
            .client
            .subscribe(format!("{p}/#"), QoS::AtLeastOnce)?;
        std::thread::sleep(Duration::from_millis(500));
        // Robot A's login, even asking for robot B's client id (mosquitto makes it "robot-a").
        let attacker = Probe::start(port, "zk0-agent-robot-b", Some(("robot-a", "pw-robot-a")));
        anyhow::ensure!(attacker.wait_connected()?, "robot-a's login was refused");
        let forbidden = [
            format!("{p}/client/robot-b/status"),
            format!("{p}/client/robot-b/update/1/chunk/0"),
            format!("{p}/client/robot-b/update/1/manifest"),
            format!("{p}/client/robot-b/ack/1"),
            format!("{p}/client/robot-a/ack/1"),
            format!("{p}/round"),
            format!("{p}/server/status"),
            format!("{p}/model/{}/manifest", "0".repeat(64)),
        ];
        for t in &forbidden {
            attacker
                .client
                .publish(t.clone(), QoS::AtLeastOnce, false, b"forged".to_vec())?;
        }
        // A's own status is its to publish: it arrives, after everything sent before it.
        let own = format!("{p}/client/robot-a/status");
        attacker
            .client
            .publish(own.clone(), QoS::AtLeastOnce, false, b"own".to_vec())?;
        wait_for(Duration::from_secs(10), "robot-a's own status", || {
            watcher.topics.lock().unwrap().contains(&own).then_some(())
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let seen = watcher.topics.lock().unwrap().clone();
        let leaked: Vec<&String> = seen.iter().filter(|t| forbidden.contains(t)).collect();
        anyhow::ensure!(leaked.is_empty(), "delivered despite the ACL: {leaked:?}");
        drop((watcher, attacker));

        // A whole round with the same files.
        fed.start_aggregator(1, 30.0, &[])?;
        fed.start_agent("robot-a", 1)?;
        fed.start_agent("robot-b", 1)?;
        fed.wait_aggregator_ok(Duration::from_secs(60))?;
        let state = fed.state()?;
        anyhow::ensure!(
            state["history"][0]["accepted"] == serde_json::json!(["robot-a", "robot-b"]),
            "round 1: {:?}",
            state["history"][0]
        );
        for c in ["robot-a", "robot-b"] {
            let st = fed
                .agents
                .get_mut(c)
                .context("agent")?
                .wait_timeout(Duration::from_secs(20))?;
            anyhow::ensure!(st.success(), "agent {c} exited with {st}");
        }
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
