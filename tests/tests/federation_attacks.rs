//! End-to-end: a compromised robot. The attacker holds robot-a's broker login and its enrolled
//! signing key and, while robot-b and robot-c take part in a live federation, tries to steer
//! and spoil them: a forged round announcement, a replay of
//! an earlier round's announcement (a rollback to the older model), forged acks to robot-b,
//! a manifest and chunks under robot-b's topics, robot-b's status set offline, a status for an
//! unenrolled id, the global model's retained manifest and a chunk overwritten. Each is refused or neutralised with its own counter, robot-b's update is still
//! accepted every round, and every published model is the weighted average of the honest
//! updates (`verify_rounds` recomputes it from what was on the wire).
//!
//! Twice: on the embedded broker (per-client passwords, logins bound to their client ids, no
//! topic ACL), where every attack reaches the daemons and the signatures refuse it, each with
//! its counter; and on mosquitto with the files of `zk0-aggregator acl --mosquitto`, where the
//! broker drops every publish outside robot-a's own topics, so nothing forged reaches anyone
//! (every refusal counter stays 0; the test's observer listens on a second, open listener).
//! The attacks on robot-a's own topics (weight, norm, overflow) are `federation_robust`'s.

use std::time::Duration;

use anyhow::{Context, Result};
use std::collections::BTreeMap;

use rumqttc_ring::{Client, Event, MqttOptions, Packet, QoS};
use shared_proto::message::{
    self, Ack, ClientStatus, HardwareInfo, RoundAnnouncement, PROTOCOL_VERSION,
};
use shared_proto::sign::KeyPair;
use shared_proto::topic::Topics;
use zk0_e2e::federation::{update_manifest, BrokerKind, Federation, Observer};
use zk0_e2e::http_get;

/// The value of one sample line of a Prometheus text exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn status(cid: &str, online: bool, key: &KeyPair) -> Vec<u8> {
    let s = ClientStatus {
        v: PROTOCOL_VERSION,
        federation: "e2e".into(),
        session: u64::MAX / 2,
        client_id: cid.into(),
        online,
        dataset: "forged".into(),
        examples: 1,
        hardware: HardwareInfo {
            cpu: "x".into(),
            cores: 1,
            mem_bytes: 1,
            gpu: None,
        },
        version: "0".into(),
        public_key: key.public().to_compact(),
        signature: Vec::new(),
    };
    message::encode(&s.signed(key))
}

/// What a fresh subscriber to `filter` gets within 2 s (retained messages): topic → payload.
fn retained(
    port: u16,
    login: Option<(&str, &str)>,
    filter: &str,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut opts = MqttOptions::new("zk0-agent-observer", "127.0.0.1", port);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (c, mut conn) = Client::new(opts, 64);
    c.subscribe(filter, QoS::AtLeastOnce)?;
    let mut got = BTreeMap::new();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            conn.recv_timeout(Duration::from_millis(200))
        {
            got.insert(p.topic, p.payload.to_vec());
        }
    }
    let _ = c.disconnect();
    Ok(got)
}

/// A manifest claiming to be robot-b's, signed with the attacker's key.
fn forged_manifest(round: u64, base: &str, key: &KeyPair) -> Vec<u8> {
    let m = update_manifest(
        "e2e",
        "robot-b",
        round,
        base,
        "f32",
        &[7u8; 5000],
        4096,
        1_000_000,
    );
    message::encode(&m.signed(key))
}

#[test]
fn a_robot_with_a_valid_login_cannot_steer_or_spoil_the_others() -> Result<()> {
    attack(BrokerKind::Embedded)
}

#[test]
fn mosquitto_with_the_generated_acl_drops_every_attack_on_the_others() -> Result<()> {
    attack(BrokerKind::Mosquitto)
}

fn attack(kind: BrokerKind) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(
        tmp.path(),
        kind,
        &[("robot-b", 30, "f32"), ("robot-c", 70, "f32")],
    )?;
    // robot-a: enrolled, with a login, and in the attacker's hands (no agent runs for it).
    let attacker_key = KeyPair::generate();
    fed.enroll("robot-a", &attacker_key.public())?;
    for (u, p) in [
        ("robot-a", "pw-a"),
        ("robot-b", "pw-b"),
        ("robot-c", "pw-c"),
    ] {
        fed.users.insert(u.into(), p.into());
    }
    let acl = kind == BrokerKind::Mosquitto;
    let (observer_port, observer_login) = if acl {
        fed.use_generated_acl(("zk0-aggregator", "pw-aggregator"))?;
        let port = zk0_e2e::free_port()?;
        fed.observer_port = Some(port);
        anyhow::ensure!(fed.start_broker()?, "mosquitto is not installed");
        (port, None)
    } else {
        fed.users.insert("observer".into(), "pw-o".into());
        (fed.port, Some(("observer", "pw-o")))
    };
    let r = (|| -> Result<()> {
        let mport = zk0_e2e::free_port()?;
        fed.metrics_listen = format!("127.0.0.1:{mport}");
        fed.start_aggregator(2, 90.0, &[])?;
        let observer = Observer::start_with(observer_port, &fed.federation, observer_login)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        // The observer records only genuine acks (the attacker forges some).
        observer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .aggregator_key = Some(fed.aggregator_key()?);
        // Slow training keeps each round open while the attacks land; robot-b's slow uplink
        // keeps its upload under way for a while, so injected chunks meet its manifest.
        fed.agent_extra
            .insert("robot-b".into(), "upload_max_bytes_per_sec = 8000\n".into());
        let slow = [("ZK0_FAKE_WORKER_SLEEP_MS", "300")];
        fed.start_agent_env("robot-b", 2, &slow)?;
        fed.start_agent_env("robot-c", 2, &slow)?;
        let st = fed.wait_state(Duration::from_secs(60), "round 1 to collect", |s| {
            s["round"] == 1 && s["phase"]["phase"] == "collecting"
        })?;
        let base1 = st["model_id"].as_str().context("model id")?.to_string();

        let topics = Topics::new(&fed.federation)?;
        // The agent's own client id: with a login bound to its client id, this is the only
        // one robot-a's credentials open.
        let mut opts = MqttOptions::new(
            zk0_daemon::mqtt::agent_client_id("robot-a"),
            "127.0.0.1",
            fed.port,
        );
        opts.set_credentials("robot-a", "pw-a");
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (c, mut conn) = Client::new(opts, 1024);
        std::thread::spawn(move || for _ in conn.iter().take(1_000_000) {});

        // A forged announcement: the attacker's settings for everyone, retained.
        // The state file can say "collecting" before the observer has the retained
        // announcement in hand (a loaded machine): wait for it, bounded.
        let raw = zk0_e2e::wait_for(
            Duration::from_secs(30),
            "the observer to see round 1's announcement",
            || observer.seen.lock().ok()?.announcements.last().cloned(),
        )?;
        let genuine: RoundAnnouncement = message::decode(&raw, usize::MAX)?;
        let mut forged = genuine.clone();
        forged.seq += 1_000;
        forged.hyper.lr = 10.0;
        forged.hyper.local_steps = 1;
        forged.chunk_size = 1;
        let forged = forged.signed(&attacker_key);
        c.publish(
            topics.round(),
            QoS::AtLeastOnce,
            true,
            message::encode(&forged),
        )?;

        // The global model's retained topics: a forged manifest and a junk chunk 0. The
        // aggregator watches them and puts its own back (a fetching agent drops the junk by its
        // signed hash and waits for that); a fresh subscriber gets the genuine ones.
        let model_path = fed
            .state_dir
            .join("models")
            .join(format!("{base1}.safetensors"));
        let genuine_model = std::fs::read(&model_path)?;
        let mut forged_model: shared_proto::message::ModelManifest = {
            let seen = observer
                .seen
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            seen.model_manifests
                .get(&base1)
                .context("no model manifest seen")?
                .clone()
        };
        forged_model.round += 100;
        let forged_model = forged_model.signed(&attacker_key);
        c.publish(
            topics.model_manifest(&base1),
            QoS::AtLeastOnce,
            true,
            message::encode(&forged_model),
        )?;
        c.publish(
            topics.model_chunk(&base1, 0),
            QoS::AtLeastOnce,
            true,
            vec![0x5a; 4096],
        )?;
        if !acl {
            let login = Some(("observer", "pw-o"));
            let key = fed.aggregator_key()?;
            let got = zk0_e2e::wait_for(Duration::from_secs(20), "the model restored", || {
                let got = retained(fed.port, login, &topics.model_filter(&base1)).ok()?;
                let chunk = got.get(&topics.model_chunk(&base1, 0))?;
                let m = got.get(&topics.model_manifest(&base1))?;
                let m: shared_proto::message::ModelManifest =
                    message::decode(m, usize::MAX).ok()?;
                (genuine_model.starts_with(chunk) && m.verify_with(&key).is_ok()).then_some(got)
            })?;
            eprintln!("model {base1}: {} retained topics genuine again", got.len());
        }

        // Until robot-b's round-1 update is accepted: forged acks to robot-b (naming its real
        // blob once its manifest is out), a forged manifest and junk chunks on its topics, its
        // status set offline, a status for an unenrolled id.
        let mut attempts = 0;
        loop {
            let st = fed.state()?;
            if st["round"] != 1 || st["accepted"].get("robot-b").is_some() {
                break;
            }
            let b_sha = {
                let seen = observer
                    .seen
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?;
                seen.update_manifests
                    .get(&("robot-b".to_string(), 1))
                    .and_then(|m| m.first())
                    .map(|m| m.sha256.clone())
            };
            attempts += 1;
            anyhow::ensure!(attempts < 600, "robot-b's update was never accepted");
            let sha = b_sha.unwrap_or_else(|| "00".repeat(32).into());
            for verdict in [
                Ack::accepted("robot-b", 1),
                Ack::rejected("robot-b", 1, shared_proto::RejectReason::HashMismatch, "x"),
            ] {
                let a = verdict.seal("e2e", &sha, u64::MAX, &attacker_key);
                c.publish(
                    topics.ack("robot-b", 1),
                    QoS::AtLeastOnce,
                    false,
                    message::encode(&a),
                )?;
            }
            c.publish(
                topics.update_manifest("robot-b", 1),
                QoS::AtLeastOnce,
                false,
                forged_manifest(1, &base1, &attacker_key),
            )?;
            for i in 0..3 {
                c.publish(
                    topics.update_chunk("robot-b", 1, i),
                    QoS::AtLeastOnce,
                    false,
                    vec![0x5a; 4096],
                )?;
            }
            c.publish(
                topics.client_status("robot-b"),
                QoS::AtLeastOnce,
                true,
                status("robot-b", false, &attacker_key),
            )?;
            c.publish(
                topics.client_status("eve"),
                QoS::AtLeastOnce,
                true,
                status("eve", true, &attacker_key),
            )?;
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{attempts} rounds of attacks while robot-b uploaded");

        // Round 2: replay round 1's genuine announcement (an older sequence number and the
        // older model: a rollback).
        // Once round 2's announcement is out (the state file is saved just before it), so the
        // agents have acted on it.
        let genuine_key = fed.aggregator_key()?;
        zk0_e2e::wait_for(Duration::from_secs(60), "round 2's announcement", || {
            let seen = observer.seen.lock().ok()?;
            seen.announcements
                .iter()
                .filter_map(|a| message::decode::<RoundAnnouncement>(a, usize::MAX).ok())
                .any(|a| a.round == 2 && a.verify_with(&genuine_key).is_ok())
                .then_some(())
        })?;
        // And both agents acted on it (their status files name round 2).
        for cid in ["robot-b", "robot-c"] {
            let path = tmp.path().join(cid).join("work").join("status.json");
            zk0_e2e::wait_for(Duration::from_secs(30), "an agent in round 2", || {
                let s: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                (s["round"] == 2).then_some(())
            })?;
        }
        c.publish(
            topics.round(),
            QoS::AtLeastOnce,
            true,
            message::encode(&genuine),
        )?;
        // The aggregator put its own announcement back after each overwrite (none reach it
        // through the ACL); read its counters while it runs.
        let metrics = if acl {
            std::thread::sleep(Duration::from_secs(1));
            http_get(&fed.metrics_listen, "/metrics")?
        } else {
            // The forged and the replayed announcement, the model's manifest and chunk.
            zk0_e2e::wait_for(Duration::from_secs(20), "every restore", || {
                let m = http_get(&fed.metrics_listen, "/metrics").ok()?;
                (metric(&m, "zk0_aggregator_retained_restored_total") >= 4.0).then_some(m)
            })?
        };
        for (series, what) in [
            (
                "zk0_aggregator_retained_restored_total",
                "the forged and the replayed announcement, the model's manifest and chunk 0",
            ),
            (
                "zk0_aggregator_updates_rejected_total{reason=\"bad_signature\"}",
                "manifests under robot-b's topic signed by another key",
            ),
            (
                "zk0_aggregator_update_chunks_refused_total{reason=\"forged\"}",
                "junk chunks on robot-b's topics after its manifest",
            ),
            (
                "zk0_aggregator_client_statuses_refused_total{reason=\"bad_signature\"}",
                "robot-b set offline by another key",
            ),
            (
                "zk0_aggregator_client_statuses_refused_total{reason=\"unknown_key\"}",
                "a status for an unenrolled id",
            ),
        ] {
            let v = metric(&metrics, series);
            if acl {
                anyhow::ensure!(
                    v == 0.0,
                    "through the ACL: {what}: {series} = {v}\n{metrics}"
                );
            } else {
                anyhow::ensure!(v >= 1.0, "{what}: {series} = {v}\n{metrics}");
            }
            eprintln!("{series} = {v} ({what})");
        }

        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(90))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        for r in 0..2 {
            anyhow::ensure!(
                state["history"][r]["accepted"] == serde_json::json!(["robot-b", "robot-c"]),
                "round {}: {:?}",
                r + 1,
                state["history"][r]
            );
        }
        {
            let seen = observer
                .seen
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            anyhow::ensure!(fed.verify_rounds(&seen)? == 2, "expected 2 rounds");
        }

        for cid in ["robot-b", "robot-c"] {
            let path = tmp.path().join(cid).join("work").join("status.json");
            let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            let forged = s["counters"]["forged"].as_u64().unwrap_or(0);
            let stale = s["counters"]["stale_rounds"].as_u64().unwrap_or(0);
            if acl {
                anyhow::ensure!(
                    forged == 0 && stale == 0,
                    "{cid} got a forged or replayed message through the ACL: {s}"
                );
                continue;
            }
            anyhow::ensure!(forged >= 1, "{cid} counted no forgery: {s}");
            anyhow::ensure!(stale >= 1, "{cid} counted no replayed announcement: {s}");
        }
        if acl {
            return Ok(());
        }
        let b = tmp.path().join("robot-b").join("work").join("status.json");
        let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&b)?)?;
        anyhow::ensure!(
            b["counters"]["forged"].as_u64().unwrap_or(0) >= 2,
            "robot-b counted the forged announcement but none of the forged acks: {b}"
        );
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
