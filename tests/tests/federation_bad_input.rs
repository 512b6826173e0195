//! End-to-end: a hostile test client sends every kind of bad update to a live aggregator
//! (embedded broker) while a real agent takes part in the round. Each must be rejected with its
//! own reason in the ack and its own `updates_rejected{reason=…}` counter on `/metrics`, and the
//! aggregator must keep serving: the round completes with the honest agent's update.
//! A client whose chunk got lost on the way is asked for exactly that chunk when it sends its
//! manifest again, and once it resends the chunk, its update is accepted and aggregated.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc_ring::{Client, MqttOptions, QoS};
use shared_proto::codec::{encode_delta, Codec, EncodeOptions, CODEC_KEY};
use shared_proto::message::{self, UpdateManifest};
use shared_proto::sign::KeyPair;
use shared_proto::tensor::{write_safetensors, TensorSet};
use shared_proto::topic::Topics;
use zk0_e2e::federation::{tiny_model, update_manifest, BrokerKind, Federation, Observer};
use zk0_e2e::http_get;

const CHUNK: usize = 4096;

fn delta(v: f32) -> TensorSet {
    let mut d = tiny_model();
    for t in d.values_mut() {
        t.data.iter_mut().for_each(|x| *x = v);
    }
    d
}

fn f32_blob(d: &TensorSet) -> Vec<u8> {
    encode_delta(
        d,
        &EncodeOptions {
            codec: Codec::F32,
            zstd_level: 1,
        },
        None,
    )
    .unwrap_or_default()
}

fn manifest(cid: &str, round: u64, base: &str, blob: &[u8], key: &KeyPair) -> UpdateManifest {
    update_manifest("e2e", cid, round, base, "f32", blob, CHUNK as u32, 10).signed(key)
}

/// The manifest, then every chunk without waiting to be asked (the broker keeps one
/// publisher's order, so the chunks arrive after the manifest they are checked against).
fn send(
    c: &Client,
    t: &Topics,
    cid: &str,
    round: u64,
    blob: &[u8],
    m: &UpdateManifest,
) -> Result<()> {
    c.publish(
        t.update_manifest(cid, round),
        QoS::AtLeastOnce,
        false,
        message::encode(m),
    )?;
    for (i, ch) in shared_proto::chunk::split(blob, CHUNK).enumerate() {
        c.publish(
            t.update_chunk(cid, round, i as u32),
            QoS::AtLeastOnce,
            false,
            ch.to_vec(),
        )?;
    }
    Ok(())
}

#[test]
fn every_bad_update_is_rejected_with_its_reason_and_the_round_goes_on() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(tmp.path(), BrokerKind::Embedded, &[("robot-a", 50, "f32")])?;
    let r = (|| -> Result<()> {
        // One key enrolled under every hostile id (except "eve", who is not enrolled).
        let mallory = KeyPair::generate();
        let ids = [
            "m-malformed",
            "m-hash",
            "m-forged",
            "m-shape",
            "m-nan",
            "m-oversize",
            "m-flood",
            "m-codec",
            "m-lossy",
        ];
        for id in ids {
            fed.enroll(id, &mallory.public())?;
        }
        let mport = zk0_e2e::free_port()?;
        fed.metrics_listen = format!("127.0.0.1:{mport}");
        fed.start_aggregator(2, 60.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        // robot-a trains slowly (300 ms a step) so round 2 stays open while the test plays.
        fed.start_agent_env("robot-a", 2, &[("ZK0_FAKE_WORKER_SLEEP_MS", "300")])?;
        let st = fed.wait_state(Duration::from_secs(60), "round 2 to collect", |s| {
            s["round"] == 2 && s["phase"]["phase"] == "collecting"
        })?;
        let base = st["model_id"].as_str().context("model id")?.to_string();

        let topics = Topics::new(&fed.federation)?;
        let mut opts = MqttOptions::new("zk0-test-mallory", "127.0.0.1", fed.port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (c, mut conn) = Client::new(opts, 1024);
        std::thread::spawn(move || for _ in conn.iter().take(100_000) {});
        let good = f32_blob(&delta(0.001));

        // Malformed CBOR.
        c.publish(
            topics.update_manifest("m-malformed", 2),
            QoS::AtLeastOnce,
            false,
            b"\xff\x00not cbor".to_vec(),
        )?;
        // Wrong hash: the manifest's SHA-256 is of other bytes.
        let mut m = manifest("m-hash", 2, &base, &good, &mallory);
        m.sha256 = shared_proto::hash::sha256_hex(b"something else").into();
        m.sign_with(&mallory);
        send(&c, &topics, "m-hash", 2, &good, &m)?;
        // Forged signature: signed by a key that is not the enrolled one.
        send(
            &c,
            &topics,
            "m-forged",
            2,
            &good,
            &manifest("m-forged", 2, &base, &good, &KeyPair::generate()),
        )?;
        // Unenrolled key.
        send(
            &c,
            &topics,
            "eve",
            2,
            &good,
            &manifest("eve", 2, &base, &good, &KeyPair::generate()),
        )?;
        // Shape mismatch.
        let mut bad_shape = delta(0.001);
        if let Some(t) = bad_shape.get_mut("action_expert.layer0.bias") {
            t.shape = vec![32];
            t.data.truncate(32);
        }
        let blob = f32_blob(&bad_shape);
        send(
            &c,
            &topics,
            "m-shape",
            2,
            &blob,
            &manifest("m-shape", 2, &base, &blob, &mallory),
        )?;
        // NaN: the encoder refuses NaN, so build the f32 container by hand.
        let mut nan = delta(0.001);
        if let Some(t) = nan.get_mut("state_proj.weight") {
            t.data[3] = f32::NAN;
        }
        let meta = BTreeMap::from([(CODEC_KEY.to_string(), "f32".to_string())]);
        let blob = zstd::encode_all(&write_safetensors(&nan, &meta)[..], 1)?;
        send(
            &c,
            &topics,
            "m-nan",
            2,
            &blob,
            &manifest("m-nan", 2, &base, &blob, &mallory),
        )?;
        // Codec mismatch: the blob is int8 but the signed manifest declares f32.
        let blob = encode_delta(
            &delta(0.001),
            &EncodeOptions {
                codec: Codec::Int8,
                zstd_level: 1,
            },
            None,
        )?;
        send(
            &c,
            &topics,
            "m-codec",
            2,
            &blob,
            &manifest("m-codec", 2, &base, &blob, &mallory),
        )?;
        // Oversize: claims a blob far over max_update_bytes.
        let mut m = manifest("m-oversize", 2, &base, &good, &mallory);
        m.total_len = 1 << 40;
        m.chunk_count = shared_proto::chunk::chunk_count(1 << 40, CHUNK);
        m.sign_with(&mallory);
        c.publish(
            topics.update_manifest("m-oversize", 2),
            QoS::AtLeastOnce,
            false,
            message::encode(&m),
        )?;
        // Chunk flood: indices far past the signed manifest's count, dropped unstored (the
        // manifest itself is valid; the chunks that belong to it never come).
        let flood = manifest("m-flood", 2, &base, &good, &mallory);
        c.publish(
            topics.update_manifest("m-flood", 2),
            QoS::AtLeastOnce,
            false,
            message::encode(&flood),
        )?;
        for i in 0..5u32 {
            c.publish(
                topics.update_chunk("m-flood", 2, 10_000_000 + i),
                QoS::AtLeastOnce,
                false,
                vec![0u8; 100],
            )?;
        }
        // Replay of robot-a's round-1 update, exactly as it was sent.
        let (blob1, m1) = {
            let seen = observer
                .seen
                .lock()
                .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
            seen.update_blob("robot-a", 1)
                .context("observer missed robot-a's round-1 update")?
        };
        send(&c, &topics, "robot-a", 1, &blob1, &m1)?;

        // Lost chunk: the manifest, every chunk but #1, then the manifest again (as an agent
        // does when no verdict comes).
        let lossy_blob = f32_blob(&{
            let mut d = tiny_model();
            d.values_mut()
                .for_each(|t| t.data.iter_mut().for_each(|x| *x *= 1e-3));
            d
        });
        let lossy = manifest("m-lossy", 2, &base, &lossy_blob, &mallory);
        anyhow::ensure!(lossy.chunk_count >= 3, "want a multi-chunk update");
        let chunks: Vec<&[u8]> = shared_proto::chunk::split(&lossy_blob, CHUNK).collect();
        c.publish(
            topics.update_manifest("m-lossy", 2),
            QoS::AtLeastOnce,
            false,
            message::encode(&lossy),
        )?;
        let all: Vec<u32> = (0..lossy.chunk_count).collect();
        zk0_e2e::wait_for(
            Duration::from_secs(20),
            "the request for every chunk",
            || {
                let seen = observer.seen.lock().ok()?;
                (seen.missing.get(&("m-lossy".to_string(), 2)) == Some(&all)).then_some(())
            },
        )?;
        for (i, ch) in chunks.iter().enumerate().filter(|(i, _)| *i != 1) {
            c.publish(
                topics.update_chunk("m-lossy", 2, i as u32),
                QoS::AtLeastOnce,
                false,
                ch.to_vec(),
            )?;
        }
        c.publish(
            topics.update_manifest("m-lossy", 2),
            QoS::AtLeastOnce,
            false,
            message::encode(&lossy),
        )?;
        zk0_e2e::wait_for(Duration::from_secs(20), "a resend request", || {
            let seen = observer.seen.lock().ok()?;
            (seen.missing.get(&("m-lossy".to_string(), 2)) == Some(&vec![1])).then_some(())
        })?;
        c.publish(
            topics.update_chunk("m-lossy", 2, 1),
            QoS::AtLeastOnce,
            false,
            chunks[1].to_vec(),
        )?;

        let expect = [
            ("m-malformed", 2, "malformed_message"),
            ("m-hash", 2, "hash_mismatch"),
            ("m-forged", 2, "bad_signature"),
            ("eve", 2, "unknown_key"),
            ("m-shape", 2, "shape_mismatch"),
            ("m-nan", 2, "non_finite"),
            ("m-oversize", 2, "oversize"),
            ("m-codec", 2, "unsupported_codec"),
            ("robot-a", 1, "late_or_old_round"),
        ];
        zk0_e2e::wait_for(Duration::from_secs(20), "every rejection ack", || {
            let seen = observer.seen.lock().ok()?;
            expect
                .iter()
                .all(|(cid, r, reason)| {
                    seen.acks.get(&(cid.to_string(), *r))
                        == Some(&(false, Some(reason.to_string())))
                })
                .then_some(())
        })
        .map_err(|e| {
            let seen = observer
                .seen
                .lock()
                .map(|s| format!("{:?}", s.acks))
                .unwrap_or_default();
            anyhow::anyhow!("{e}; acks seen: {seen}")
        })?;
        let metrics = http_get(&fed.metrics_listen, "/metrics")?;
        for (_, _, reason) in expect {
            let line = format!("zk0_aggregator_updates_rejected_total{{reason=\"{reason}\"}} 1");
            anyhow::ensure!(metrics.contains(&line), "metrics lack {line:?}:\n{metrics}");
        }
        eprintln!(
            "all {} bad updates rejected with their own reason and counter",
            expect.len()
        );
        zk0_e2e::wait_for(Duration::from_secs(20), "m-lossy accepted", || {
            let seen = observer.seen.lock().ok()?;
            (seen.acks.get(&("m-lossy".to_string(), 2)) == Some(&(true, None))).then_some(())
        })?;
        let metrics = http_get(&fed.metrics_listen, "/metrics")?;
        for line in [
            "zk0_aggregator_update_chunks_refused_total{reason=\"past_count\"} 5",
            // The forged and unknown-key uploads' chunks, and the replay's: never asked for.
            "zk0_aggregator_update_chunks_refused_total{reason=\"forged\"} 0",
        ] {
            anyhow::ensure!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
        }
        anyhow::ensure!(
            !metrics
                .contains("zk0_aggregator_update_chunks_refused_total{reason=\"no_manifest\"} 0"),
            "the chunks of refused manifests are counted as having none:\n{metrics}"
        );

        // The aggregator kept serving: round 2 completes with the honest update.
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(60))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        anyhow::ensure!(
            state["history"][1]["accepted"] == serde_json::json!(["m-lossy", "robot-a"]),
            "round 2: {:?}",
            state["history"][1]
        );
        let seen = observer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        anyhow::ensure!(fed.verify_rounds(&seen)? == 2, "expected 2 rounds");
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
