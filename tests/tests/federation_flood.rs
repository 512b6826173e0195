//! A flood of update chunks while the aggregator closes a round (its server evaluation held
//! for seconds by `zk0-fake-eval`'s `sleep_ms`): the round's close runs beside the event loop
//! and the loop's inbox is bounded, so the aggregator's peak memory grows by a fraction of the
//! flood, every flood chunk it received is counted on `/metrics` as refused (the round is not
//! collecting) or shed (the inbox was full), and the federation finishes its round.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rumqttc_ring::{Client, MqttOptions, QoS};
use zk0_e2e::federation::{BrokerKind, Federation};
use zk0_e2e::http_get;

/// Flood: 320 chunks of 512 KiB (160 MiB), far more than the bound asserted below.
const FLOOD_CHUNKS: u32 = 320;
const FLOOD_CHUNK_BYTES: usize = 512 << 10;
/// Peak-RSS growth allowed during the flood: the inbox (64 events), rumqttd's buffers for the
/// aggregator's subscription and allocator slack, not the flood.
const MAX_GROWTH_BYTES: u64 = 96 << 20;

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let v = s
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(v.trim().trim_end_matches("kB").trim().parse()?)
}

/// Sum of every sample of `metric` (all label sets) in a Prometheus text page.
fn metric_sum(page: &str, metric: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_chunk_flood_during_aggregation_is_refused_and_memory_stays_bounded() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::setup(
        tmp.path(),
        BrokerKind::Embedded,
        env!("CARGO_BIN_EXE_zk0-fake-worker").as_ref(),
        &[("arm-a", 40, "f32")],
    )?;
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base)?;
    std::fs::write(base.join("config.json"), r#"{"type": "smolvla"}"#)?;
    let heldout = tmp.path().join("heldout");
    std::fs::create_dir_all(&heldout)?;
    fed.metrics_listen = format!("127.0.0.1:{}", zk0_e2e::free_port()?);
    fed.aggregator_toml = format!(
        "[broker]\nmax_packet_bytes = {}\n[rounds]\nbase_model = {base:?}\n\
         [outputs.eval]\ndataset = {heldout:?}\nworker = {w:?}\ninitial = false\n",
        FLOOD_CHUNK_BYTES + (64 << 10),
        w = env!("CARGO_BIN_EXE_zk0-fake-eval"),
    );
    let r = (|| -> Result<()> {
        fed.start_aggregator(1, 60.0, &[])?;
        let pid = fed.aggregator.as_ref().context("aggregator")?.child.id();
        // Round 1's server evaluation will take 8 s: the flood lands while the round closes.
        std::fs::write(heldout.join("sleep_ms"), "8000")?;
        fed.start_agent("arm-a", 1)?;
        fed.wait_state(Duration::from_secs(60), "round 1 to close", |s| {
            s["phase"]["phase"] == "aggregating"
        })?;
        let before = proc_status_kib(pid, "VmHWM:")? << 10;
        let counted = |page: &str| {
            metric_sum(page, "zk0_aggregator_update_chunks_refused_total")
                + metric_sum(page, "zk0_aggregator_update_chunks_shed_total")
        };
        let counted_before = counted(&http_get(&fed.metrics_listen, "/metrics")?);

        let mut opts = MqttOptions::new("flooder", "127.0.0.1", fed.port);
        opts.set_max_packet_size(FLOOD_CHUNK_BYTES + (64 << 10), 1 << 20);
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
        // Counted once the aggregator has read them all (or shed what did not fit).
        let page = zk0_e2e::wait_for(Duration::from_secs(30), "the flood to be counted", || {
            let page = http_get(&fed.metrics_listen, "/metrics").ok()?;
            (counted(&page) - counted_before >= f64::from(FLOOD_CHUNKS)).then_some(page)
        })?;
        let peak = proc_status_kib(pid, "VmHWM:")? << 10;
        let state = fed.state()?;
        anyhow::ensure!(
            state["phase"]["phase"] == "aggregating",
            "the round closed before the flood was counted: the test measured nothing"
        );
        let refused = metric_sum(&page, "zk0_aggregator_update_chunks_refused_total");
        let shed = metric_sum(&page, "zk0_aggregator_update_chunks_shed_total");
        eprintln!(
            "flood of {FLOOD_CHUNKS} × {} KiB in {flood_s:.1} s: {refused} refused, {shed} shed; \
             peak RSS {} MiB before, {} MiB after",
            FLOOD_CHUNK_BYTES >> 10,
            before >> 20,
            peak >> 20
        );
        anyhow::ensure!(
            counted(&page) - counted_before == f64::from(FLOOD_CHUNKS),
            "{refused} refused + {shed} shed (of which {counted_before} before the flood) \
             != {FLOOD_CHUNKS} flood chunks"
        );
        anyhow::ensure!(
            peak.saturating_sub(before) < MAX_GROWTH_BYTES,
            "peak RSS grew by {} MiB during a {} MiB flood",
            peak.saturating_sub(before) >> 20,
            (u64::from(FLOOD_CHUNKS) * FLOOD_CHUNK_BYTES as u64) >> 20
        );
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
