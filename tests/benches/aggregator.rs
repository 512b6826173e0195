//! `cargo xtask bench aggregator` (= `cargo bench -p zk0-e2e --bench aggregator -- [opts]`).
//!
//! Two measurements on the REAL `zk0-aggregator` process (release build, made first with
//! `cargo build --release -p aggregator` unless `ZK0_BENCH_NO_BUILD` is set):
//!
//! - **rss**: for N = 2, 8, 32 clients, the aggregator starts from a synthetic f32 model of
//!   `--params` parameters (default 100 M, 400 MB), N test clients connect to its embedded
//!   broker, announce themselves, and upload a signed `int8`+zstd delta of the whole model
//!   (what a robot on a normal uplink sends; `f32` would exceed the default 256 MiB
//!   `max_update_bytes`), `--uplinks K` clients at a time (default 1: the next starts when the
//!   previous one's ack is in). Several 100 MB uploads at once overrun the embedded rumqttd's
//!   log for the aggregator's `client/+/update/#` subscription (`[broker] backlog_bytes`):
//!   rumqttd skips the aggregator's cursor ahead and chunks are lost; the aggregator then asks
//!   for them (an `Ack` with `missing`) and the clients resend them, as zk0-agent does, and a
//!   manifest with no answer for 10 s is sent again. The aggregator verifies, spools,
//!   aggregates and publishes one round; once the new model's manifest is out, a client
//!   fetches the whole new model from the broker (checked against the signed manifest's hash)
//!   and the round's outputs are written, then the peak RSS is read from `VmHWM` in
//!   `/proc/<pid>/status`.
//!   Baseline: the model's own f32 size, so "peak / model" should stay flat in N.
//! - **broker**: a `--blob-mb` MB blob (default 100) published in 1 MiB QoS 1 chunks through the
//!   aggregator's embedded rumqttd and reassembled (then SHA-256-checked) by a subscriber, vs the
//!   same bytes through one loopback `TcpStream`, in the same run; median of `--reps` runs.
//!
//! Options: `--only rss|broker`, `--params P`, `--clients 2,8,32`, `--uplinks K`,
//! `--blob-mb M`, `--reps N`.
//! An unoptimised build (`cargo test --benches`) only smoke-tests: 2 M parameters, N = 2, 3,
//! a 8 MB blob, one rep.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rumqttc_ring::{Client, Event, MqttOptions, Packet, QoS};
use shared_proto::codec::{encode_delta, Codec, EncodeOptions};
use shared_proto::message::{
    self, Ack, ClientStatus, HardwareInfo, ModelManifest, RoundAnnouncement, UpdateManifest,
    PROTOCOL_VERSION,
};
use shared_proto::sign::KeyPair;
use shared_proto::tensor::{write_safetensors, Tensor, TensorSet};
use shared_proto::topic::Topics;
use zk0_e2e::procmem::Footprint;
use zk0_e2e::{bench_args, bench_build, bench_main, free_port, run_ok, wait_for, ChildGuard};

const CHUNK: usize = 1 << 20;
const FEDERATION: &str = "bench";

struct Opts {
    only: Option<String>,
    params: usize,
    clients: Vec<usize>,
    blob_mb: usize,
    reps: usize,
    uplinks: usize,
}

fn parse_args() -> Result<Opts> {
    let debug = cfg!(debug_assertions);
    let mut o = Opts {
        only: None,
        params: if debug { 2_000_000 } else { 100_000_000 },
        clients: if debug { vec![2, 3] } else { vec![2, 8, 32] },
        blob_mb: if debug { 8 } else { 100 },
        reps: if debug { 1 } else { 3 },
        uplinks: 1,
    };
    let mut args = bench_args();
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--only" => {
                let v = val()?;
                anyhow::ensure!(v == "rss" || v == "broker", "--only rss|broker, not {v:?}");
                o.only = Some(v);
            }
            "--params" => o.params = val()?.parse().context("--params")?,
            "--clients" => {
                o.clients = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--clients: comma-separated counts")?;
            }
            "--blob-mb" => o.blob_mb = val()?.parse().context("--blob-mb")?,
            "--reps" => o.reps = val()?.parse::<usize>().context("--reps")?.max(1),
            "--uplinks" => o.uplinks = val()?.parse::<usize>().context("--uplinks")?.max(1),
            "-h" | "--help" => anyhow::bail!(
                "usage: aggregator [--only rss|broker] [--params P] [--clients 2,8,32] \
                 [--blob-mb M] [--reps N] [--uplinks K]"
            ),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    anyhow::ensure!(o.params >= 4096, "--params must be at least 4096");
    anyhow::ensure!(
        !o.clients.is_empty() && o.clients.iter().all(|&n| (1..=256).contains(&n)),
        "--clients must be counts in 1..=256"
    );
    anyhow::ensure!(
        (1..=4096).contains(&o.blob_mb),
        "--blob-mb must be in 1..=4096"
    );
    Ok(o)
}

/// The release `zk0-aggregator`, built first unless `ZK0_BENCH_NO_BUILD` is set.
fn aggregator_bin() -> Result<PathBuf> {
    let p = bench_build(&["aggregator"], true)?.join("zk0-aggregator");
    anyhow::ensure!(p.is_file(), "{} is not built", p.display());
    Ok(p)
}

/// Starts `zk0-aggregator serve` on its embedded broker at a free loopback port, logging to
/// `log`, for one round with `min_clients` and the `extra` serve options; returns once the
/// broker listens (within `ready_within`).
fn start_aggregator(
    agg: &Path,
    state: &Path,
    log: &Path,
    min_clients: usize,
    extra: &[&str],
    ready_within: Duration,
) -> Result<(ChildGuard, u16)> {
    let port = free_port()?;
    let mut cmd = Command::new(agg);
    cmd.arg("--state-dir")
        .arg(state)
        .args(["serve", "--insecure"])
        .args(["--federation", FEDERATION, "--metrics-listen", ""])
        .args(["--rounds", "1", "--min-clients", &min_clients.to_string()])
        .args(["--chunk-size", &CHUNK.to_string()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra);
    let child = ChildGuard::spawn("zk0-aggregator", cmd, log)?;
    wait_for(ready_within, "the aggregator's broker", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    Ok((child, port))
}

/// splitmix64, for cheap deterministic data.
fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [-scale, scale).
fn fill(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| ((next(&mut s) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        .collect()
}

/// `params` f32 parameters as tensors of up to 1024 × 4096 (the last one smaller).
fn synth(params: usize, scale: f32, seed: u64) -> TensorSet {
    let cols = 4096;
    let mut rows = params / cols;
    let mut m = TensorSet::new();
    let mut i = 0;
    while rows > 0 {
        let r = rows.min(1024);
        m.insert(
            format!("layers.{i:03}.weight"),
            Tensor {
                shape: vec![r, cols],
                data: fill(r * cols, scale, seed + i as u64),
            },
        );
        rows -= r;
        i += 1;
    }
    m
}

/// Waits (bounded) for the first round's new model id in the aggregator's `state.json`.
fn wait_first_round(state: &Path, timeout: Duration) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let id = std::fs::read(state.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["history"][0]["model_id"].as_str().map(String::from));
        if let Some(id) = id {
            return Ok(id);
        }
        anyhow::ensure!(
            t0.elapsed() < timeout,
            "round 1 not aggregated after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until the aggregator has published the manifest of model `id` (its last
/// message for the model, after every chunk).
fn wait_model_published(port: u16, id: &str, timeout: Duration) -> Result<()> {
    let topics = Topics::new(FEDERATION)?;
    let (c, mut conn) = mqtt(port, "zk0-bench-watch");
    let (tx, rx) = mpsc::channel();
    let filter = topics.all_model_manifests();
    let want = id.to_string();
    thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => {
                    if let Ok(m) = message::decode::<ModelManifest>(
                        &p.payload,
                        message::DEFAULT_MAX_MESSAGE_LEN,
                    ) {
                        if m.model_id == want {
                            let _ = tx.send(());
                            let _ = c.disconnect();
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    rx.recv_timeout(timeout)
        .with_context(|| format!("model {id} not published after {timeout:?}"))
}

fn mqtt(port: u16, id: &str) -> (Client, rumqttc_ring::Connection) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_max_packet_size(8 << 20, 8 << 20);
    opts.set_keep_alive(Duration::from_secs(30));
    Client::new(opts, 64)
}

/// Upload slots shared by the test clients: a client takes one before its first chunk and gives
/// it back when its ack arrives.
#[derive(Clone)]
struct Uplink {
    take: Arc<std::sync::Mutex<mpsc::Receiver<()>>>,
    give: mpsc::Sender<()>,
}

impl Uplink {
    fn new(slots: usize) -> Uplink {
        let (give, take) = mpsc::channel();
        for _ in 0..slots {
            let _ = give.send(());
        }
        Uplink {
            take: Arc::new(std::sync::Mutex::new(take)),
            give,
        }
    }

    fn acquire(&self) -> Result<()> {
        let rx = self
            .take
            .lock()
            .map_err(|_| anyhow::anyhow!("uplink poisoned"))?;
        rx.recv_timeout(Duration::from_secs(1800))
            .context("no upload slot after 30 min")
    }
}

/// One test client: says it is online, waits for a round that selects it, takes an upload
/// slot, sends its signed manifest, then the chunks the aggregator asks for, and returns the
/// verdict.
fn client(port: u16, cid: String, key: KeyPair, blob: Arc<Vec<u8>>, up: Uplink) -> Result<Ack> {
    let topics = Topics::new(FEDERATION)?;
    let (c, mut conn) = mqtt(port, &cid);
    let status = ClientStatus {
        v: PROTOCOL_VERSION,
        federation: FEDERATION.into(),
        session: 1,
        client_id: cid.clone(),
        online: true,
        dataset: "synthetic".into(),
        examples: 100,
        hardware: HardwareInfo {
            cpu: String::new(),
            cores: 1,
            mem_bytes: 0,
            gpu: None,
        },
        version: env!("CARGO_PKG_VERSION").into(),
        public_key: key.public().to_compact(),
        signature: Vec::new(),
    }
    .signed(&key);
    let mut uploading: Option<thread::JoinHandle<Result<()>>> = None;
    // The manifest being sent, kept to answer the aggregator's requests for lost chunks.
    let mut sent: Option<UpdateManifest> = None;
    let mut resending: Vec<thread::JoinHandle<Result<()>>> = Vec::new();
    let t0 = Instant::now();
    // When the manifest went out last: with no answer for 10 s it may have been lost, so it
    // is sent again (zk0-agent does the same after 30 s).
    // Set by the upload thread once its manifest is out (it may wait for an uplink first).
    let manifest_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut manifest_sent: Option<Instant> = None;
    loop {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "{cid}: no ack after 30 min"
        );
        let ev = match conn.recv_timeout(Duration::from_secs(1)) {
            Ok(ev) => ev,
            Err(rumqttc_ring::RecvTimeoutError::Timeout) => {
                if manifest_sent.is_none() && manifest_out.load(std::sync::atomic::Ordering::SeqCst)
                {
                    manifest_sent = Some(Instant::now());
                }
                let quiet = manifest_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(10));
                if let (true, Some(m)) = (quiet, sent.clone()) {
                    manifest_sent = Some(Instant::now());
                    let (c2, topic) = (c.clone(), topics.update_manifest(&cid, m.round));
                    resending.push(thread::spawn(move || -> Result<()> {
                        c2.publish(topic, QoS::AtLeastOnce, false, message::encode(&m))?;
                        Ok(())
                    }));
                }
                continue;
            }
            Err(e) => anyhow::bail!("{cid}: connection: {e:?}"),
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                c.subscribe(topics.round(), QoS::AtLeastOnce)?;
                c.subscribe(topics.acks_for(&cid), QoS::AtLeastOnce)?;
                c.publish(
                    topics.client_status(&cid),
                    QoS::AtLeastOnce,
                    true,
                    message::encode(&status),
                )?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => {
                if p.topic == topics.round() && uploading.is_none() {
                    let a: RoundAnnouncement =
                        message::decode(&p.payload, message::DEFAULT_MAX_MESSAGE_LEN)?;
                    if a.round == 0 || !a.is_selected(&cid) {
                        continue;
                    }
                    let (c2, cid2, topics2, up2) =
                        (c.clone(), cid.clone(), topics.clone(), up.clone());
                    let mut m = zk0_e2e::federation::update_manifest(
                        FEDERATION,
                        &cid,
                        a.round,
                        &a.model_id,
                        "int8",
                        &blob,
                        a.chunk_size,
                        100,
                    );
                    m.sign_with(&key);
                    sent = Some(m.clone());
                    let out = manifest_out.clone();
                    // Publishing blocks when the request queue is full, so not on this thread,
                    // which drives the connection.
                    // The chunks follow when the aggregator asks for them.
                    uploading = Some(thread::spawn(move || -> Result<()> {
                        up2.acquire()?;
                        c2.publish(
                            topics2.update_manifest(&cid2, m.round),
                            QoS::AtLeastOnce,
                            false,
                            message::encode(&m),
                        )?;
                        out.store(true, std::sync::atomic::Ordering::SeqCst);
                        Ok(())
                    }));
                } else if p.topic.contains("/ack/") {
                    let ack: Ack = message::decode(&p.payload, message::DEFAULT_MAX_MESSAGE_LEN)?;
                    if ack.is_incomplete() {
                        // The manifest is accepted: send the chunks asked for (all of them
                        // at first, later those lost on the way), as zk0-agent does.
                        // Not joined here: this thread drives the connection, and a publish
                        // blocked on a full queue would wait for it forever.
                        let m = sent.clone().context("resend request before any upload")?;
                        if ack.missing.len() < m.chunk_count as usize {
                            eprintln!("  {cid}: {} chunk(s) lost, resending", ack.missing.len());
                        }
                        manifest_sent = Some(Instant::now());
                        let (c2, cid2, topics2, blob2) =
                            (c.clone(), cid.clone(), topics.clone(), blob.clone());
                        resending.push(thread::spawn(move || -> Result<()> {
                            let size = m.chunk_size as usize;
                            for i in ack.missing {
                                let start = (i as usize).saturating_mul(size).min(blob2.len());
                                let end = start.saturating_add(size).min(blob2.len());
                                c2.publish(
                                    topics2.update_chunk(&cid2, m.round, i),
                                    QoS::AtLeastOnce,
                                    false,
                                    blob2[start..end].to_vec(),
                                )?;
                            }
                            Ok(())
                        }));
                        continue;
                    }
                    let _ = up.give.send(());
                    if let Some(h) = uploading.take() {
                        h.join()
                            .map_err(|_| anyhow::anyhow!("{cid}: upload thread panicked"))??;
                    }
                    // Resend threads are done once the verdict is in (it answers their
                    // manifest), except a redundant one still queued: leave those be.
                    let _ = c.disconnect();
                    drop(resending);
                    return Ok(ack);
                }
            }
            Ok(_) => {}
            Err(e) => anyhow::bail!("{cid}: connection: {e}"),
        }
    }
}

struct RssRow {
    n: usize,
    peak: u64,
    upload_s: f64,
    total_s: f64,
    fetch_s: f64,
}

/// Fetches model `id` as zk0-agent does: its retained manifest, then its chunks `WINDOW` topics
/// at a time (rumqttd forwards at most 100 retained messages per subscription), reassembled
/// and checked against the manifest's SHA-256; bounded by `timeout`.
fn fetch_model(port: u16, id: &str, timeout: Duration) -> Result<()> {
    const WINDOW: u32 = 8;
    let topics = Topics::new(FEDERATION)?;
    let (c, mut conn) = mqtt(port, "zk0-bench-fetch");
    let (tx, rx) = mpsc::channel();
    let id = id.to_string();
    thread::spawn(move || {
        let mut fetch: Option<(shared_proto::chunk::Reassembly, u32, u32)> = None;
        let result = (|| -> Result<()> {
            for ev in conn.iter() {
                let p = match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.subscribe(topics.model_manifest(&id), QoS::AtLeastOnce)?;
                        continue;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => p,
                    Ok(_) => continue,
                    Err(e) => anyhow::bail!("fetch connection: {e}"),
                };
                match (topics.parse(&p.topic), fetch.as_mut()) {
                    (Some(shared_proto::topic::TopicKind::ModelManifest { .. }), None) => {
                        let m: ModelManifest =
                            message::decode(&p.payload, message::DEFAULT_MAX_MESSAGE_LEN)?;
                        let hash = shared_proto::hash::parse_sha256_hex(&m.sha256)?;
                        let r = shared_proto::chunk::Reassembly::new(
                            m.total_len,
                            m.chunk_count,
                            m.chunk_size,
                            hash,
                            u64::MAX,
                        )?;
                        let first = WINDOW.min(m.chunk_count);
                        for i in 0..first {
                            c.subscribe(topics.model_chunk(&id, i), QoS::AtLeastOnce)?;
                        }
                        fetch = Some((r, first, m.chunk_count));
                    }
                    (
                        Some(shared_proto::topic::TopicKind::ModelChunk { index, .. }),
                        Some((r, next, count)),
                    ) => {
                        r.insert(index, &p.payload)?;
                        c.unsubscribe(topics.model_chunk(&id, index))?;
                        if *next < *count {
                            c.subscribe(topics.model_chunk(&id, *next), QoS::AtLeastOnce)?;
                            *next += 1;
                        }
                        if r.is_complete() {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let _ = c.disconnect();
            let (r, _, _) = fetch.context("no manifest")?;
            r.finish()?; // checks the whole blob's SHA-256
            Ok(())
        })();
        let _ = tx.send(result);
    });
    rx.recv_timeout(timeout)
        .with_context(|| format!("model not fetched after {timeout:?}"))?
}

/// Waits (bounded) until the aggregator has written the completed round's outputs (its
/// `pending/` records are gone).
fn wait_outputs_written(state: &Path, timeout: Duration) -> Result<()> {
    wait_for(timeout, "the round's outputs", || {
        let pending = std::fs::read_dir(state.join("pending"))
            .map(|d| d.count())
            .unwrap_or(0);
        (pending == 0).then_some(())
    })
}

fn rss_run(
    agg: &Path,
    dir: &Path,
    model_path: &Path,
    n: usize,
    blob: &Arc<Vec<u8>>,
    uplinks: usize,
) -> Result<RssRow> {
    let state = dir.join(format!("state-{n}"));
    run_ok(
        Command::new(agg)
            .arg("--state-dir")
            .arg(&state)
            .arg("init")
            .arg("--model")
            .arg(model_path),
    )?;
    let mut keys = Vec::new();
    for i in 0..n {
        let cid = format!("c{i:03}");
        let key = KeyPair::generate();
        let pubp = dir.join(format!("{cid}.pub"));
        zk0_daemon::keys::save_public_key(&pubp, &key.public())?;
        run_ok(
            Command::new(agg)
                .arg("--state-dir")
                .arg(&state)
                .args(["keys", "enroll", "--client-id", &cid])
                .arg(&pubp),
        )?;
        keys.push((cid, key));
    }
    let t0 = Instant::now();
    let (a, port) = start_aggregator(
        agg,
        &state,
        &dir.join(format!("aggregator-{n}.log")),
        n,
        &["--round-timeout-s", "1800"],
        Duration::from_secs(120),
    )?;
    let up = Uplink::new(uplinks);
    let handles: Vec<_> = keys
        .into_iter()
        .map(|(cid, key)| {
            let (b, u) = (blob.clone(), up.clone());
            thread::spawn(move || client(port, cid, key, b, u))
        })
        .collect();
    let mut accepted = 0;
    for h in handles {
        let ack = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        anyhow::ensure!(
            ack.accepted,
            "{} rejected: {:?} {}",
            ack.client_id,
            ack.reason,
            ack.detail
        );
        accepted += 1;
    }
    let upload_s = t0.elapsed().as_secs_f64();
    anyhow::ensure!(accepted == n, "{accepted} of {n} accepted");
    // Aggregated and published: every large allocation of the round is behind us.
    let id = wait_first_round(&state, Duration::from_secs(1800))?;
    wait_model_published(port, &id, Duration::from_secs(600))?;
    let total_s = t0.elapsed().as_secs_f64();
    // Served too: an agent that joins now fetches the whole model from the broker.
    let t1 = Instant::now();
    fetch_model(port, &id, Duration::from_secs(600))?;
    let fetch_s = t1.elapsed().as_secs_f64();
    wait_outputs_written(&state, Duration::from_secs(600))?;
    let peak = Footprint::read(a.child.id())?.hwm * 1024;
    drop(a);
    // The round really aggregated every client.
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("state.json"))?)?;
    let got = st["history"][0]["accepted"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(got == n, "round 1 aggregated {got} of {n} updates");
    let _ = std::fs::remove_dir_all(&state);
    Ok(RssRow {
        n,
        peak,
        upload_s,
        total_s,
        fetch_s,
    })
}

fn bench_rss(o: &Opts, agg: &Path) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("zk0-bench-agg-")
        .tempdir()?;
    let t = Instant::now();
    let model = synth(o.params, 0.05, 1);
    let params: usize = model.values().map(|t| t.data.len()).sum();
    let model_bytes = params as u64 * 4;
    let model_path = dir.path().join("model.safetensors");
    std::fs::write(&model_path, write_safetensors(&model, &BTreeMap::new()))?;
    drop(model);
    let delta = synth(o.params, 1e-3, 2);
    let blob = encode_delta(
        &delta,
        &EncodeOptions {
            codec: Codec::Int8,
            zstd_level: 3,
        },
        None,
    )?;
    drop(delta);
    eprintln!(
        "model: {params} f32 parameters ({:.1} MB); update: int8+zstd 3, {:.1} MB, {} chunks of 1 MiB (setup {:.1?})",
        model_bytes as f64 / 1e6,
        blob.len() as f64 / 1e6,
        blob.len().div_ceil(CHUNK),
        t.elapsed()
    );
    let blob = Arc::new(blob);
    let mut rows = Vec::new();
    for &n in &o.clients {
        let r = rss_run(agg, dir.path(), &model_path, n, &blob, o.uplinks)
            .with_context(|| format!("N = {n} (logs in {})", dir.path().display()))?;
        eprintln!(
            "N = {n}: peak RSS {:.1} MB in {:.1} s",
            r.peak as f64 / 1e6,
            r.total_s
        );
        rows.push(r);
    }
    println!();
    println!(
        "aggregator peak RSS, one round, {params} params ({:.1} MB f32 model), int8+zstd updates of {:.1} MB, {} upload(s) at a time",
        model_bytes as f64 / 1e6,
        blob.len() as f64 / 1e6,
        o.uplinks
    );
    println!("| clients N | update bytes in (MB) | peak RSS (MB) | peak / model size | uploads acked (s) | round done (s) | model fetched (s) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} |",
            r.n,
            (r.n * blob.len()) as f64 / 1e6,
            r.peak as f64 / 1e6,
            r.peak as f64 / model_bytes as f64,
            r.upload_s,
            r.total_s,
            r.fetch_s
        );
    }
    if let (Some(lo), Some(hi)) = (rows.first(), rows.last()) {
        println!(
            "peak RSS at N = {} / at N = {}: {:.2}",
            hi.n,
            lo.n,
            hi.peak as f64 / lo.peak as f64
        );
    }
    Ok(())
}

/// Seconds to move `blob` through the broker on `port` in QoS 1 chunks, reassembled by a
/// subscriber in this process (SHA-256 checked after the clock stops).
fn through_broker(port: u16, blob: &Arc<Vec<u8>>, rep: usize) -> Result<f64> {
    let prefix = format!("zk0bench/blob{rep}");
    let n = blob.len().div_ceil(CHUNK);
    let (sub, mut sconn) = mqtt(port, &format!("zk0-bench-sub-{rep}"));
    let (ready_tx, ready_rx) = mpsc::channel();
    let filter = format!("{prefix}/+");
    let total = blob.len();
    let receiver = thread::spawn(move || -> Result<(Vec<u8>, Instant)> {
        let mut out = vec![0u8; total];
        let mut got = vec![false; n];
        let mut left = n;
        for ev in sconn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    sub.subscribe(filter.clone(), QoS::AtLeastOnce)?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let i: usize = p
                        .topic
                        .rsplit('/')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .context("chunk topic")?;
                    anyhow::ensure!(i < n, "chunk index {i} out of range");
                    let off = i * CHUNK;
                    anyhow::ensure!(off + p.payload.len() <= total, "chunk {i} too long");
                    out[off..off + p.payload.len()].copy_from_slice(&p.payload);
                    if !got[i] {
                        got[i] = true;
                        left -= 1;
                        if left == 0 {
                            let done = Instant::now();
                            let _ = sub.disconnect();
                            return Ok((out, done));
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => anyhow::bail!("subscriber: {e}"),
            }
        }
        anyhow::bail!("subscriber connection ended early")
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("subscriber never subscribed")?;
    let (publ, mut pconn) = mqtt(port, &format!("zk0-bench-pub-{rep}"));
    let driver = thread::spawn(move || {
        for ev in pconn.iter() {
            if ev.is_err() {
                return;
            }
        }
    });
    let t0 = Instant::now();
    for (i, ch) in shared_proto::chunk::split(blob, CHUNK).enumerate() {
        publ.publish(
            format!("{prefix}/{i}"),
            QoS::AtLeastOnce,
            false,
            ch.to_vec(),
        )?;
    }
    let (out, done) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("subscriber panicked"))??;
    let secs = done.duration_since(t0).as_secs_f64();
    let _ = publ.disconnect();
    let _ = driver.join();
    anyhow::ensure!(
        shared_proto::hash::sha256(&out) == shared_proto::hash::sha256(blob),
        "the reassembled blob differs"
    );
    Ok(secs)
}

/// Seconds to move `blob` through one loopback TCP connection in the same 1 MiB writes.
fn through_tcp(blob: &Arc<Vec<u8>>) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let total = blob.len();
    let receiver = thread::spawn(move || -> Result<(Vec<u8>, Instant)> {
        let (mut s, _) = l.accept()?;
        let mut out = vec![0u8; total];
        s.read_exact(&mut out)?;
        Ok((out, Instant::now()))
    });
    let mut s = TcpStream::connect(addr)?;
    let t0 = Instant::now();
    for ch in shared_proto::chunk::split(blob, CHUNK) {
        s.write_all(ch)?;
    }
    s.flush()?;
    let (out, done) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    anyhow::ensure!(
        shared_proto::hash::sha256(&out) == shared_proto::hash::sha256(blob),
        "the received blob differs"
    );
    Ok(done.duration_since(t0).as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_broker(o: &Opts, agg: &Path) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("zk0-bench-broker-")
        .tempdir()?;
    // A tiny model: the aggregator only serves as the broker here (nobody joins a round).
    let model_path = dir.path().join("model.safetensors");
    std::fs::write(
        &model_path,
        write_safetensors(&synth(4096, 0.05, 1), &BTreeMap::new()),
    )?;
    let state = dir.path().join("state");
    run_ok(
        Command::new(agg)
            .arg("--state-dir")
            .arg(&state)
            .arg("init")
            .arg("--model")
            .arg(&model_path),
    )?;
    let log = dir.path().join("aggregator.log");
    let (_a, port) = start_aggregator(agg, &state, &log, 1, &[], Duration::from_secs(60))?;
    let len = o.blob_mb * 1_000_000;
    let mut s = 7u64;
    let blob: Vec<u8> = (0..len.div_ceil(8))
        .flat_map(|_| next(&mut s).to_le_bytes())
        .take(len)
        .collect();
    let blob = Arc::new(blob);
    let (mut b, mut t) = (Vec::new(), Vec::new());
    for rep in 0..o.reps {
        t.push(through_tcp(&blob)?);
        b.push(through_broker(port, &blob, rep)?);
        eprintln!("rep {rep}: broker {:.3} s, tcp {:.3} s", b[rep], t[rep]);
    }
    let (bm, tm) = (median(b), median(t));
    let mb = len as f64 / 1e6;
    println!();
    println!(
        "{mb:.0} MB blob in {} chunks of 1 MiB, loopback, median of {} runs",
        len.div_ceil(CHUNK),
        o.reps
    );
    println!("| path | seconds | MB/s |");
    println!("|---|---:|---:|");
    println!(
        "| embedded broker (zk0-aggregator's rumqttd), QoS 1 publish → subscriber reassembly | {bm:.3} | {:.0} |",
        mb / bm
    );
    println!(
        "| raw TCP loopback, one stream | {tm:.3} | {:.0} |",
        mb / tm
    );
    println!("broker time / raw TCP time: {:.1}", bm / tm);
    Ok(())
}

fn main() -> ExitCode {
    bench_main(|| {
        let o = parse_args()?;
        let agg = aggregator_bin()?;
        if o.only.as_deref() != Some("rss") {
            bench_broker(&o, &agg)?;
        }
        if o.only.as_deref() != Some("broker") {
            bench_rss(&o, &agg)?;
        }
        Ok(())
    })
}
