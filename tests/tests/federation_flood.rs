//! Floods of update chunks while the aggregator closes a round (its server evaluation held for
//! seconds by `zk0-fake-eval`'s `sleep_ms`). The round's close runs beside the event loop, the
//! loop's inbox is bounded, and so are the embedded broker's log of the aggregator's
//! subscription (`[broker] backlog_bytes`) and its outgoing queue to the aggregator: the
//! aggregator's peak memory grows by those bounds, not by the flood: after a second flood as
//! large as the first it is still within them. Every flood chunk is accounted for on `/metrics`:
//! read and refused (the round is not collecting) or shed (the inbox was full), or dropped by
//! the broker, which counts as a backlog overrun. The accepted update's blob was written to
//! disk once and read twice (verified on receipt, folded at close). The federation then
//! finishes its round.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rumqttc_ring::{Client, MqttOptions, QoS};
use zk0_e2e::federation::{BrokerKind, Federation};
use zk0_e2e::procmem::Footprint;
use zk0_e2e::{http_get, metric_sum};

/// One flood: 480 chunks of 512 KiB (240 MiB), more than the bound asserted below.
const FLOOD_CHUNKS: u32 = 480;
const FLOOD_CHUNK_BYTES: usize = 512 << 10;
const MAX_PACKET_BYTES: u64 = (FLOOD_CHUNK_BYTES + (64 << 10)) as u64;
/// The broker's backlog for a subscription in this test (rumqttd keeps two 16 MiB segments at
/// least, see `aggregator::broker`).
const BACKLOG_BYTES: u64 = 32 << 20;
/// Peak-RSS growth allowed for the first flood: the broker's backlog plus one segment being
/// filled, its outgoing queue to the aggregator (200 packets), the aggregator's inbox (64
/// events), and 40 MiB for the MQTT clients' read buffers, allocator and thread stacks.
const MAX_GROWTH_BYTES: u64 =
    BACKLOG_BYTES + (16 << 20) + (200 + 64) * MAX_PACKET_BYTES + (40 << 20);

/// Chunks the aggregator read and refused or shed.
fn counted(page: &str) -> f64 {
    metric_sum(page, "zk0_aggregator_update_chunks_refused_total")
        + metric_sum(page, "zk0_aggregator_update_chunks_shed_total")
}

/// Times the broker dropped unread messages of a subscriber.
fn overruns(page: &str) -> f64 {
    metric_sum(page, "zk0_aggregator_broker_backlog_overruns_total")
}

/// Publishes one flood on arm-a's round-1 chunk topics (QoS 1, all acked by the broker), waits
/// until the aggregator's counters settle, checks every chunk is accounted for, and returns
/// the aggregator's peak RSS then.
fn flood(fed: &Federation, pid: u32, name: &str) -> Result<u64> {
    let page_before = http_get(&fed.metrics_listen, "/metrics")?;
    let mut opts = MqttOptions::new(name, "127.0.0.1", fed.port);
    opts.set_max_packet_size(MAX_PACKET_BYTES as usize, 1 << 20);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = Client::new(opts, 64);
    let topics = shared_proto::topic::Topics::new(&fed.federation)?;
    let t0 = Instant::now();
    let pump = std::thread::spawn(move || {
        let mut acked = 0u32;
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc_ring::Event::Incoming(rumqttc_ring::Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == FLOOD_CHUNKS {
                        return Ok(acked);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("flooder connection: {e}")),
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Ok(acked);
            }
        }
        Ok(acked)
    });
    let payload = vec![0x5au8; FLOOD_CHUNK_BYTES];
    for i in 0..FLOOD_CHUNKS {
        client.publish(
            topics.update_chunk("arm-a", 1, i),
            QoS::AtLeastOnce,
            false,
            payload.clone(),
        )?;
    }
    let acked = pump
        .join()
        .map_err(|_| anyhow::anyhow!("flooder panicked"))??;
    anyhow::ensure!(
        acked == FLOOD_CHUNKS,
        "broker acked {acked} of {FLOOD_CHUNKS} chunks"
    );
    let flood_s = t0.elapsed().as_secs_f64();
    let _ = client.disconnect();
    // Settled: the counters unchanged over a second (the broker reports overruns each second).
    let mut last = (f64::NAN, f64::NAN);
    let page = zk0_e2e::wait_for(
        Duration::from_secs(20),
        "the flood's counters to settle",
        || {
            std::thread::sleep(Duration::from_millis(1100));
            let page = http_get(&fed.metrics_listen, "/metrics").ok()?;
            let now = (counted(&page), overruns(&page));
            let settled = now == last;
            last = now;
            settled.then_some(page)
        },
    )?;
    let peak = Footprint::read(pid)?.hwm << 10;
    let seen = counted(&page) - counted(&page_before);
    let overran = overruns(&page) - overruns(&page_before);
    eprintln!(
        "{name}: {FLOOD_CHUNKS} × {} KiB in {flood_s:.1} s: {seen} read and refused or shed by \
         the aggregator, {} dropped by the broker in {overran} backlog overruns; peak RSS {} MiB",
        FLOOD_CHUNK_BYTES >> 10,
        f64::from(FLOOD_CHUNKS) - seen,
        peak >> 20
    );
    // A drop by the broker is counted per overrun: rumqttd does not say how many it dropped.
    anyhow::ensure!(
        seen > 0.0 && seen <= f64::from(FLOOD_CHUNKS),
        "{seen} flood chunks counted by the aggregator, of {FLOOD_CHUNKS}"
    );
    anyhow::ensure!(
        seen == f64::from(FLOOD_CHUNKS) || overran >= 1.0,
        "{} flood chunks neither counted nor reported as a broker overrun",
        f64::from(FLOOD_CHUNKS) - seen
    );
    Ok(peak)
}

#[test]
fn a_chunk_flood_during_aggregation_is_refused_and_memory_stays_bounded() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(tmp.path(), BrokerKind::Embedded, &[("arm-a", 40, "f32")])?;
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base)?;
    std::fs::write(base.join("config.json"), r#"{"type": "smolvla"}"#)?;
    let heldout = tmp.path().join("heldout");
    std::fs::create_dir_all(&heldout)?;
    fed.metrics_listen = format!("127.0.0.1:{}", zk0_e2e::free_port()?);
    fed.broker_toml =
        format!("max_packet_bytes = {MAX_PACKET_BYTES}\nbacklog_bytes = {BACKLOG_BYTES}\n");
    fed.aggregator_toml = format!(
        "[rounds]\nbase_model = {base:?}\n\
         [outputs.eval]\ndataset = {heldout:?}\nworker = {w:?}\ninitial = false\n",
        w = env!("CARGO_BIN_EXE_zk0-fake-eval"),
    );
    let r = (|| -> Result<()> {
        fed.start_aggregator(1, 60.0, &[])?;
        let pid = fed.aggregator.as_ref().context("aggregator")?.child.id();
        // Round 1's server evaluation will take 20 s: both floods land while the round closes.
        std::fs::write(heldout.join("sleep_ms"), "20000")?;
        fed.start_agent("arm-a", 1)?;
        fed.wait_state(Duration::from_secs(60), "round 1 to close", |s| {
            s["phase"]["phase"] == "aggregating"
        })?;
        let before = Footprint::read(pid)?.hwm << 10;
        let first = flood(&fed, pid, "flooder-1")?;
        let second = flood(&fed, pid, "flooder-2")?;
        anyhow::ensure!(
            fed.state()?["phase"]["phase"] == "aggregating",
            "the round closed before the floods were counted: the test measured nothing"
        );
        // The data path's disk traffic for the accepted update (folded by now: the server
        // evaluation runs after the fold): its blob written once, in place, and read twice,
        // to verify it on receipt and to fold it.
        let page = http_get(&fed.metrics_listen, "/metrics")?;
        let blob = fed.state()?["accepted"]["arm-a"]["bytes"]
            .as_f64()
            .context("arm-a's accepted update")?;
        let spooled = metric_sum(&page, "zk0_aggregator_update_bytes_spooled_total");
        let read = metric_sum(&page, "zk0_aggregator_update_bytes_read_back_total");
        eprintln!("accepted blob {blob} B: spooled {spooled} B, read back {read} B");
        anyhow::ensure!(
            spooled == blob && read == 2.0 * blob,
            "blob {blob} B: spooled {spooled} B, read back {read} B"
        );
        let flood_mib = (u64::from(FLOOD_CHUNKS) * FLOOD_CHUNK_BYTES as u64) >> 20;
        // The same bound holds after both floods: memory does not add up flood after flood.
        for (peak, after) in [(first, "one"), (second, "two")] {
            anyhow::ensure!(
                peak.saturating_sub(before) < MAX_GROWTH_BYTES,
                "peak RSS grew by {} MiB (bound {} MiB) after {after} {flood_mib} MiB flood(s)",
                peak.saturating_sub(before) >> 20,
                MAX_GROWTH_BYTES >> 20
            );
        }
        // The federation itself is unharmed: the round completes.
        let status = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(60))?;
        anyhow::ensure!(status.success(), "aggregator exited with {status}");
        let state = fed.state()?;
        anyhow::ensure!(
            state["history"][0]["accepted"] == serde_json::json!(["arm-a"]),
            "round 1: {}",
            state["history"][0]
        );
        Ok(())
    })();
    if r.is_err() {
        eprintln!("{}", fed.logs());
    }
    r
}
