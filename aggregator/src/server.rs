//! The aggregator's event loop: MQTT in, round machine, verification, aggregation, MQTT out.
//!
//! One task polls the MQTT connection and forwards publishes over an unbounded channel, so
//! keep-alive never waits on verification or aggregation; the main task owns all state and
//! handles one event at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc_ring::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use shared_proto::chunk;
use shared_proto::codec::{decode_delta_each, Codec};
use shared_proto::message::{
    self, Ack, ClientStatus, HyperParams, ModelBlobKind, ModelManifest, RejectReason,
    RoundAnnouncement, ServerStatus, UpdateManifest, PROTOCOL_VERSION,
};
use shared_proto::sign::{KeyPair, PublicKey};
use shared_proto::tensor::ModelSpec;
use shared_proto::topic::{TopicKind, Topics};
use tokio::sync::mpsc;

use crate::aggregate::{self, ServerStep};
use crate::broker::EmbeddedBroker;
use crate::checkpoint;
use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::outputs::{Outputs, PolicyLossPoint, RoundRecord, ServerEval};
use crate::plots;
use crate::round::{Admission, CloseReason, Phase, RoundState, Transition, UpdateRecord};
use crate::server_eval;
use crate::store::{self, KeyRegistry, Store};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Largest CBOR control message accepted (manifests, statuses).
const MAX_MESSAGE_BYTES: usize = 1 << 20;

enum Incoming {
    Connected,
    Publish(String, Vec<u8>),
}

/// An update being received: chunks spooled to disk, and the manifest once it arrives.
#[derive(Default)]
struct Upload {
    round: u64,
    chunk_lens: BTreeMap<u32, usize>,
    bytes: u64,
    manifest: Option<UpdateManifest>,
    /// Set once the upload was rejected; further chunks are dropped silently.
    rejected: bool,
}

struct Server {
    cfg: Config,
    store: Store,
    state: RoundState,
    signer: KeyPair,
    metrics: Arc<Metrics>,
    topics: Topics,
    client: AsyncClient,
    online: BTreeSet<String>,
    /// The dataset each client says it trains on (its retained status), for the round records
    /// when the federation config does not name one.
    reported_datasets: BTreeMap<String, String>,
    uploads: HashMap<String, Upload>,
    spec: ModelSpec,
    /// Enrolled keys, re-read when `keys.json` changes (so `keys enroll|revoke` apply live).
    keys: KeyRegistry,
    keys_mtime: Option<std::time::SystemTime>,
    /// Chunk count of the model whose retained messages are currently published.
    published: Option<(String, u32)>,
    /// Base LeRobot checkpoint the global tensors apply to (server eval, checkpoints).
    base_dir: Option<std::path::PathBuf>,
    done: bool,
}

/// Runs the daemon until Ctrl-C (or, with `exit_when_done`, until the last round is published).
pub async fn run(cfg: Config, store: Store, exit_when_done: bool) -> Result<()> {
    let state = store.load_state()?.with_context(|| {
        format!(
            "no federation in {} (run `zk0-aggregator init --model …`)",
            store.dir.display()
        )
    })?;
    let signer = shared_proto::sign::load_keypair(store.key_path())
        .with_context(|| format!("loading {}", store.key_path().display()))?;
    let metrics = Metrics::new();
    if !cfg.metrics.listen.is_empty() {
        let l = tokio::net::TcpListener::bind(&cfg.metrics.listen)
            .await
            .with_context(|| format!("metrics listener on {}", cfg.metrics.listen))?;
        tracing::info!(addr = %l.local_addr()?, "serving Prometheus /metrics");
        tokio::spawn(metrics::serve(l, metrics.clone()));
    }

    // Embedded broker unless an external one is configured; the aggregator gets its own
    // random credentials on it.
    let (tls, host, port, user) = if cfg.broker.url.is_empty() {
        let listen: std::net::SocketAddr = cfg.broker.listen.parse().context("broker.listen")?;
        let mut users = None;
        let mut me = None;
        if !cfg.insecure {
            let pass =
                shared_proto::hash::sha256_hex(&KeyPair::generate().sign(b"zk0-aggregator-login"));
            let mut u: HashMap<String, String> = cfg.broker.users.clone().into_iter().collect();
            u.insert("zk0-aggregator".into(), pass.clone());
            users = Some(u);
            me = Some(("zk0-aggregator".to_string(), pass));
        }
        EmbeddedBroker {
            listen,
            max_packet_bytes: cfg.broker.max_packet_bytes,
            backlog_bytes: cfg.broker.backlog_bytes,
            users,
            tls: (!cfg.broker.tls_cert.is_empty())
                .then(|| (cfg.broker.tls_cert.clone(), cfg.broker.tls_key.clone())),
        }
        .spawn()?;
        tracing::info!(%listen, "embedded MQTT broker started");
        let host = if listen.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            listen.ip().to_string()
        };
        (!cfg.broker.tls_cert.is_empty(), host, listen.port(), me)
    } else {
        let (tls, h, p) = parse_mqtt_url(&cfg.broker.url)?;
        let me = (!cfg.broker.username.is_empty())
            .then(|| (cfg.broker.username.clone(), cfg.broker.password.clone()));
        (tls, h, p, me)
    };

    let topics = Topics::new(&cfg.federation).context("federation name")?;
    let mut opts = MqttOptions::new(format!("zk0-aggregator-{}", cfg.federation), host, port);
    opts.set_keep_alive(Duration::from_secs(15));
    opts.set_max_packet_size(cfg.broker.max_packet_bytes, cfg.broker.max_packet_bytes);
    opts.set_clean_session(true);
    if tls {
        opts.set_transport(crate::tls::client_transport(std::path::Path::new(
            &cfg.broker.tls_ca,
        ))?);
    }
    if let Some((u, p)) = user {
        opts.set_credentials(u, p);
    }
    let offline = ServerStatus {
        v: PROTOCOL_VERSION,
        online: false,
        round: state.round,
        model_id: Some(state.model_id.clone()),
        aggregator_key: signer.public().fingerprint(),
        ts_ms: now_ms(),
    };
    opts.set_last_will(LastWill::new(
        topics.server_status(),
        message::encode(&offline),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if tx.send(Incoming::Connected).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx
                        .send(Incoming::Publish(p.topic, p.payload.to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT connection lost; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });

    let (_, global) = aggregate::load_model(&store, &state.model_id)?;
    let mut cfg = cfg;
    cfg.outputs.resolve_eval_dataset(&cfg.datasets);
    let base_name = if cfg.outputs.base_model_dir.is_empty() {
        cfg.rounds.base_model.clone()
    } else {
        cfg.outputs.base_model_dir.clone()
    };
    let base_dir = match checkpoint::resolve(&base_name) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "no base checkpoint: no server evaluation, checkpoints hold only the training state");
            None
        }
    };
    let mut srv = Server {
        spec: ModelSpec::from_tensors(&global),
        cfg,
        store,
        state,
        signer,
        metrics,
        topics,
        client,
        online: BTreeSet::new(),
        reported_datasets: BTreeMap::new(),
        uploads: HashMap::new(),
        keys: KeyRegistry::default(),
        keys_mtime: None,
        published: None,
        base_dir,
        done: false,
    };
    drop(global);
    srv.metrics.current_round.set(srv.state.round as i64);
    srv.resume_uploads();
    if srv.state.round == 1 && srv.state.history.is_empty() {
        // Round 0 of the policy-loss history: the initial model.
        let id = srv.state.model_id.clone();
        let have = Outputs::new(&srv.store)
            .load_history()
            .is_ok_and(|h| h.points.iter().any(|p| p.round == 0 && p.model_id == id));
        if !have {
            if let Some(Err(e)) = srv.server_eval(0, &id).await {
                tracing::warn!(error = %e, "initial-model evaluation failed");
            }
        }
    }
    tracing::info!(round = srv.state.round, model = %srv.state.model_id, phase = ?srv.state.phase, "aggregator started");

    zk0_host::systemd::ready();
    let mut watchdog = tokio::time::interval(
        zk0_host::systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
    );
    // systemd stops services with SIGTERM; leave the same way as on Ctrl-C.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = watchdog.tick() => zk0_host::systemd::watchdog(),
            _ = sigterm.recv() => {
                tracing::info!("terminated; state is persisted");
                srv.publish_status(false).await;
                return Ok(());
            }
            ev = rx.recv() => {
                let Some(ev) = ev else { anyhow::bail!("MQTT event loop ended") };
                if let Err(e) = srv.handle(ev).await {
                    tracing::error!(error = format!("{e:#}"), "event handling failed");
                }
            }
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; state is persisted");
                srv.publish_status(false).await;
                return Ok(());
            }
        }
        if let Err(e) = srv.advance().await {
            tracing::error!(error = format!("{e:#}"), "round step failed");
        }
        if srv.done && exit_when_done {
            srv.publish_status(false).await;
            // Give the event loop a moment to flush the last publishes.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        }
    }
}

/// `mqtt://host:port` or `mqtts://host:port` → (tls, host, port).
pub fn parse_mqtt_url(url: &str) -> Result<(bool, String, u16)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (false, r)
    } else {
        anyhow::bail!("broker URL {url:?} must start with mqtt:// or mqtts://");
    };
    let rest = rest.trim_end_matches('/');
    let (h, p) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .with_context(|| format!("bad port in {url:?}"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    anyhow::ensure!(!h.is_empty(), "no host in {url:?}");
    Ok((tls, h.to_string(), p))
}

impl Server {
    /// The enrolled keys, reloaded if the file changed since the last look.
    fn keys(&mut self) -> Result<&KeyRegistry> {
        let mtime = std::fs::metadata(self.store.keys_path())
            .and_then(|m| m.modified())
            .ok();
        if mtime != self.keys_mtime || mtime.is_none() {
            self.keys = self.store.load_keys()?;
            self.keys_mtime = mtime;
        }
        Ok(&self.keys)
    }

    fn round_cfg(&self) -> crate::round::RoundConfig {
        self.cfg.round_config()
    }

    /// After a restart, rebuild the upload table from the spool of the current round.
    fn resume_uploads(&mut self) {
        let dir = self.store.spool_round_dir(self.state.round);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let cid = e.file_name().to_string_lossy().to_string();
            if !store::valid_client_id(&cid) || self.state.accepted.contains_key(&cid) {
                continue;
            }
            let mut up = Upload {
                round: self.state.round,
                ..Default::default()
            };
            if let Ok(chunks) = std::fs::read_dir(e.path()) {
                for c in chunks.flatten() {
                    let name = c.file_name().to_string_lossy().to_string();
                    if let (Ok(i), Ok(md)) = (name.parse::<u32>(), c.metadata()) {
                        up.chunk_lens.insert(i, md.len() as usize);
                        up.bytes += md.len();
                    }
                }
            }
            self.uploads.insert(cid, up);
        }
    }

    async fn handle(&mut self, ev: Incoming) -> Result<()> {
        match ev {
            Incoming::Connected => {
                tracing::info!("connected to the broker");
                self.client
                    .subscribe(self.topics.all_client_status(), QoS::AtLeastOnce)
                    .await?;
                self.client
                    .subscribe(self.topics.all_updates(), QoS::AtLeastOnce)
                    .await?;
                self.publish_status(true).await;
                // Retained messages do not survive an embedded-broker restart: publish again.
                self.published = None;
                self.publish_model().await?;
                if matches!(self.state.phase, Phase::Collecting { .. }) {
                    self.announce().await?;
                }
            }
            Incoming::Publish(topic, payload) => match self.topics.parse(&topic) {
                Some(TopicKind::ClientStatus { client_id }) => {
                    self.on_client_status(&client_id, &payload).await?
                }
                Some(TopicKind::UpdateChunk {
                    client_id,
                    round,
                    index,
                }) => self.on_chunk(&client_id, round, index, &payload).await?,
                Some(TopicKind::UpdateManifest { client_id, round }) => {
                    self.on_manifest(&client_id, round, &payload).await?
                }
                _ => {}
            },
        }
        Ok(())
    }

    async fn on_client_status(&mut self, cid: &str, payload: &[u8]) -> Result<()> {
        let enrolled = self.keys()?.clients.contains_key(cid);
        let online = !payload.is_empty()
            && match message::decode::<ClientStatus>(payload, MAX_MESSAGE_BYTES) {
                Ok(s) => {
                    if enrolled && s.client_id == cid && !s.dataset.is_empty() {
                        self.reported_datasets.insert(cid.to_string(), s.dataset);
                    }
                    s.online && s.client_id == cid
                }
                Err(e) => {
                    tracing::warn!(client = cid, error = %e, "malformed client status");
                    false
                }
            };
        let changed = if online && enrolled {
            self.online.insert(cid.to_string())
        } else {
            self.online.remove(cid)
        };
        if online && !enrolled {
            tracing::warn!(
                client = cid,
                "client online but not enrolled; ignored (zk0-aggregator keys enroll)"
            );
        }
        if changed {
            tracing::info!(client = cid, online, "client status");
            self.metrics.connected_clients.set(self.online.len() as i64);
            if online {
                let cfg = self.round_cfg();
                if let Some(Transition::Reannounce) = self.state.join_late(&cfg, cid) {
                    self.store.save_state(&self.state)?;
                    self.announce().await?;
                }
            }
        }
        Ok(())
    }

    async fn on_chunk(&mut self, cid: &str, round: u64, index: u32, payload: &[u8]) -> Result<()> {
        if !store::valid_client_id(cid) {
            return Ok(());
        }
        self.metrics.update_bytes.inc_by(payload.len() as u64);
        // Chunks for anything but the open round, or from unenrolled ids, are dropped without
        // touching the disk; the manifest gets the ack.
        if self.state.admit(cid, round).is_err() || !self.keys()?.clients.contains_key(cid) {
            return Ok(());
        }
        let chunk_size = self.cfg.rounds.chunk_size;
        let max_bytes = self.cfg.rounds.max_update_bytes;
        let max_chunks = max_bytes.div_ceil(chunk_size as u64).max(1);
        let up = self
            .uploads
            .entry(cid.to_string())
            .or_insert_with(|| Upload {
                round,
                ..Default::default()
            });
        if up.round != round {
            *up = Upload {
                round,
                ..Default::default()
            };
        }
        if up.rejected {
            return Ok(());
        }
        let prev = up.chunk_lens.get(&index).copied().unwrap_or(0) as u64;
        let flood = payload.len() > chunk_size
            || u64::from(index) >= max_chunks
            || up.bytes - prev + payload.len() as u64 > max_bytes;
        if flood {
            up.rejected = true;
            let detail = format!(
                "chunk {index} of {} bytes exceeds the round's limits ({} chunks of {chunk_size} bytes, {max_bytes} bytes total)",
                payload.len(),
                max_chunks
            );
            let _ = std::fs::remove_dir_all(self.store.spool_dir(round, cid));
            self.reject(cid, round, RejectReason::ChunkFlood, detail)
                .await;
            return Ok(());
        }
        let dir = self.store.spool_dir(round, cid);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join(index.to_string()), payload).context("spooling a chunk")?;
        up.bytes = up.bytes - prev + payload.len() as u64;
        up.chunk_lens.insert(index, payload.len());
        if up.manifest.is_some() {
            self.try_complete(cid, false).await?;
        }
        Ok(())
    }

    async fn on_manifest(&mut self, cid: &str, round: u64, payload: &[u8]) -> Result<()> {
        if !store::valid_client_id(cid) {
            return Ok(());
        }
        let m = match message::decode::<UpdateManifest>(payload, MAX_MESSAGE_BYTES) {
            Ok(m) => m,
            Err(e) => {
                self.reject(cid, round, e.reject_reason(), format!("manifest: {e}"))
                    .await;
                return Ok(());
            }
        };
        if m.client_id != cid || m.round != round {
            let detail = format!(
                "manifest names {}/{} but came on the topic of {cid}/{round}",
                m.client_id, m.round
            );
            self.reject(cid, round, RejectReason::MalformedMessage, detail)
                .await;
            return Ok(());
        }
        if let Err(a) = self.state.admit(cid, round) {
            // The same update again: the client missed our ack (a reconnect, a lost message).
            // Acknowledge it again instead of calling it a duplicate.
            if a == Admission::Duplicate
                && self
                    .state
                    .accepted
                    .get(cid)
                    .is_some_and(|r| r.sha256 == m.sha256)
            {
                let ack = Ack::accepted(cid, round);
                self.publish(self.topics.ack(cid, round), message::encode(&ack), false)
                    .await;
                return Ok(());
            }
            let (reason, detail) = match a {
                Admission::StaleRound => (
                    RejectReason::LateOrOldRound,
                    format!("round {round} is over; current is {}", self.state.round),
                ),
                Admission::FutureRound => (
                    RejectReason::LateOrOldRound,
                    format!(
                        "round {round} was never announced; current is {}",
                        self.state.round
                    ),
                ),
                Admission::NotCollecting => (
                    RejectReason::LateOrOldRound,
                    format!("round {round} is not collecting"),
                ),
                Admission::Duplicate => (
                    RejectReason::DuplicateUpdate,
                    format!("an update for round {round} was already accepted"),
                ),
            };
            self.reject(cid, round, reason, detail).await;
            return Ok(());
        }
        let Some(key) = self.keys()?.clients.get(cid).cloned() else {
            self.reject(
                cid,
                round,
                RejectReason::UnknownKey,
                format!("{cid} has no enrolled key"),
            )
            .await;
            return Ok(());
        };
        let key = match PublicKey::from_pem(&key.public_key_pem) {
            Ok(k) => k,
            Err(e) => {
                self.reject(
                    cid,
                    round,
                    RejectReason::Internal,
                    format!("enrolled key unreadable: {e}"),
                )
                .await;
                return Ok(());
            }
        };
        if let Err(e) = m.verify_with(&key) {
            self.reject(
                cid,
                round,
                RejectReason::BadSignature,
                format!("manifest signature: {e}"),
            )
            .await;
            return Ok(());
        }
        if m.base_model_id != self.state.model_id {
            let detail = format!(
                "update is against model {} but round {round} trains {}",
                m.base_model_id, self.state.model_id
            );
            self.reject(cid, round, RejectReason::WrongBaseModel, detail)
                .await;
            return Ok(());
        }
        let codec_ok = match m.codec.parse::<Codec>() {
            Ok(mc) => self
                .cfg
                .rounds
                .accepted_codecs
                .iter()
                .any(|c| c.parse::<Codec>().is_ok_and(|c| c == mc)),
            Err(_) => false,
        };
        if !codec_ok {
            self.reject(
                cid,
                round,
                RejectReason::UnsupportedCodec,
                format!("codec {} is not accepted this round", m.codec),
            )
            .await;
            return Ok(());
        }
        if m.total_len > self.cfg.rounds.max_update_bytes {
            let detail = format!(
                "update of {} bytes exceeds max_update_bytes {}",
                m.total_len, self.cfg.rounds.max_update_bytes
            );
            self.reject(cid, round, RejectReason::Oversize, detail)
                .await;
            return Ok(());
        }
        if let Err(e) = chunk::ChunkTracker::new(
            m.total_len,
            m.chunk_count,
            m.chunk_size,
            self.cfg.rounds.max_update_bytes,
        ) {
            self.reject(cid, round, e.reject_reason(), format!("manifest: {e}"))
                .await;
            return Ok(());
        }
        if m.chunk_size as usize != self.cfg.rounds.chunk_size {
            let detail = format!(
                "chunk size {} differs from the announced {}",
                m.chunk_size, self.cfg.rounds.chunk_size
            );
            self.reject(cid, round, RejectReason::MalformedMessage, detail)
                .await;
            return Ok(());
        }
        let up = self
            .uploads
            .entry(cid.to_string())
            .or_insert_with(|| Upload {
                round,
                ..Default::default()
            });
        if up.round != round {
            *up = Upload {
                round,
                ..Default::default()
            };
        }
        up.rejected = false;
        up.manifest = Some(m);
        self.try_complete(cid, true).await
    }

    /// Verifies and accepts an upload once its manifest and every chunk are in. On a manifest's
    /// arrival (`on_manifest`) missing chunks are asked for; a chunk's arrival only checks.
    async fn try_complete(&mut self, cid: &str, on_manifest: bool) -> Result<()> {
        let Some(up) = self.uploads.get(cid) else {
            return Ok(());
        };
        let Some(m) = up.manifest.clone() else {
            return Ok(());
        };
        let round = up.round;
        let missing: Vec<u32> = (0..m.chunk_count)
            .filter(|i| !up.chunk_lens.contains_key(i))
            .collect();
        if !missing.is_empty() {
            if !on_manifest {
                return Ok(()); // resent chunks still on their way; the manifest follows them
            }
            // The client publishes its manifest after its chunks, so chunks still missing
            // now were lost on the way (a broker drops QoS 1 messages when a subscriber's
            // backlog overflows): ask for exactly those. Bounded by the manifest's count.
            tracing::info!(
                client = cid,
                round,
                missing = missing.len(),
                "asking for missing chunks"
            );
            self.metrics.chunks_requested.inc_by(missing.len() as u64);
            let ack = Ack::incomplete(cid, round, missing);
            self.publish(self.topics.ack(cid, round), message::encode(&ack), false)
                .await;
            return Ok(());
        }
        // Chunks past the announced count are junk; they do not join the blob.
        let dir = self.store.spool_dir(round, cid);
        let mut blob = Vec::with_capacity(m.total_len as usize);
        for i in 0..m.chunk_count {
            let part = std::fs::read(dir.join(i.to_string())).context("reading a spooled chunk")?;
            blob.extend_from_slice(&part);
        }
        let verdict = self.verify(&m, &blob);
        match verdict {
            Err((reason, detail)) => {
                if let Some(up) = self.uploads.get_mut(cid) {
                    up.manifest = None;
                    up.rejected = true;
                }
                let _ = std::fs::remove_dir_all(&dir);
                self.reject(cid, round, reason, detail).await;
            }
            Ok(norm) => {
                let accepted = self.store.accepted_path(round, cid);
                store::write_atomic(&accepted, &blob)?;
                let mut metrics = BTreeMap::new();
                metrics.insert("loss".to_string(), m.metrics.loss);
                metrics.insert("fedprox_loss".to_string(), m.metrics.fedprox_loss);
                metrics.insert("grad_norm".to_string(), m.metrics.grad_norm);
                metrics.insert("update_norm".to_string(), norm);
                metrics.insert("steps".to_string(), m.metrics.steps as f64);
                metrics.insert("seconds".to_string(), m.metrics.seconds);
                let rec = UpdateRecord {
                    examples: m.examples,
                    sha256: m.sha256.clone(),
                    codec: m.codec.clone(),
                    bytes: m.total_len,
                    metrics,
                };
                self.state.record(cid, rec);
                self.store.save_state(&self.state)?;
                self.uploads.remove(cid);
                let _ = std::fs::remove_dir_all(&dir);
                self.metrics.updates_accepted.inc();
                tracing::info!(client = cid, round, examples = m.examples, bytes = m.total_len, codec = %m.codec, "update accepted");
                let ack = Ack::accepted(cid, round);
                self.publish(self.topics.ack(cid, round), message::encode(&ack), false)
                    .await;
            }
        }
        Ok(())
    }

    /// Hash, decode against the model spec (names, shapes, finiteness) and norm bound.
    /// Returns the update's L2 norm.
    fn verify(
        &self,
        m: &UpdateManifest,
        blob: &[u8],
    ) -> std::result::Result<f64, (RejectReason, String)> {
        if blob.len() as u64 != m.total_len {
            return Err((
                RejectReason::MalformedMessage,
                format!(
                    "blob is {} bytes, manifest says {}",
                    blob.len(),
                    m.total_len
                ),
            ));
        }
        let actual = shared_proto::hash::sha256_hex(blob);
        if actual != m.sha256 {
            return Err((
                RejectReason::HashMismatch,
                format!("SHA-256 {actual} != manifest {}", m.sha256),
            ));
        }
        let max_decoded = self.spec.f32_bytes().saturating_add(1 << 20);
        // Decoded one tensor at a time (each checked against the spec: name, shape, dtype,
        // finite values) and only its norm kept: no whole f32 delta in memory.
        let mut norm_sq = 0.0f64;
        let codec = decode_delta_each(blob, &self.spec, max_decoded, |_, _, values| {
            norm_sq += values
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>();
            Ok::<_, shared_proto::ProtoError>(())
        })
        .map_err(|e| (e.reject_reason(), format!("delta: {e}")))?;
        // The blob's own codec must be the one the signed manifest declares (already checked
        // against the round's accepted codecs), so a client cannot slip another encoding in.
        if m.codec.parse::<Codec>().ok() != Some(codec) {
            return Err((
                RejectReason::UnsupportedCodec,
                format!(
                    "blob is encoded with {codec} but the manifest declares {}",
                    m.codec
                ),
            ));
        }
        if !self
            .cfg
            .rounds
            .accepted_codecs
            .iter()
            .any(|c| c.parse::<Codec>().is_ok_and(|c| c == codec))
        {
            return Err((
                RejectReason::UnsupportedCodec,
                format!("codec {codec} is not accepted this round"),
            ));
        }
        let norm = norm_sq.sqrt();
        let bound = self.cfg.rounds.max_update_norm;
        if bound > 0.0 && norm > bound {
            return Err((
                RejectReason::NormBound,
                format!("‖Δ‖₂ = {norm:.6} exceeds the bound {bound}"),
            ));
        }
        if m.examples == 0 {
            return Err((
                RejectReason::MalformedMessage,
                "examples must be positive".into(),
            ));
        }
        Ok(norm)
    }

    async fn reject(&self, cid: &str, round: u64, reason: RejectReason, detail: String) {
        tracing::warn!(client = cid, round, reason = reason.as_str(), %detail, "update rejected");
        self.metrics.reject(reason.as_str());
        let ack = Ack::rejected(cid, round, reason, detail);
        self.publish(self.topics.ack(cid, round), message::encode(&ack), false)
            .await;
    }

    /// Runs the round machine until it has nothing more to do right now.
    async fn advance(&mut self) -> Result<()> {
        let cfg = self.round_cfg();
        loop {
            let Some(t) = self.state.tick(&cfg, &self.online, now_ms()) else {
                // An aggregation interrupted by a crash is redone on restart.
                if let Phase::Aggregating { .. } = self.state.phase {
                    self.aggregate(None).await?;
                    continue;
                }
                return Ok(());
            };
            self.store.save_state(&self.state)?;
            match t {
                Transition::Announce | Transition::Reannounce => {
                    self.uploads.clear();
                    self.metrics.current_round.set(self.state.round as i64);
                    tracing::info!(round = self.state.round, selected = ?self.state.selected, "round announced");
                    self.announce().await?;
                }
                Transition::Close { reason, dropped } => {
                    tracing::info!(round = self.state.round, ?reason, ?dropped, accepted = ?self.state.accepted.keys().collect::<Vec<_>>(), "round closed");
                    self.aggregate(Some(reason)).await?;
                }
                Transition::Finish => {
                    tracing::info!(rounds = self.state.round - 1, "all rounds done");
                    self.done = true;
                    self.publish_status(true).await;
                    return Ok(());
                }
            }
        }
    }

    async fn aggregate(&mut self, reason: Option<CloseReason>) -> Result<()> {
        let round = self.state.round;
        let (_, mut global) = aggregate::load_model(&self.store, &self.state.model_id)?;
        let max_decoded = self.spec.f32_bytes().saturating_add(1 << 20);
        let total: f64 = self
            .state
            .accepted
            .values()
            .map(|r| r.examples as f64)
            .sum();
        let mut step = ServerStep::new(&mut global, total, self.cfg.rounds.server_lr)?;
        for (cid, rec) in &self.state.accepted {
            let path = self.store.accepted_path(round, cid);
            let blob =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            // Each tensor goes into the model as soon as it is decoded: peak memory is the
            // global model plus this one update's blob (compressed and decompressed).
            decode_delta_each(&blob, &self.spec, max_decoded, |name, _, delta| {
                step.add_tensor(rec.examples as f64, name, &delta)
            })
            .with_context(|| format!("decoding {}", path.display()))?;
        }
        let new_id = aggregate::save_model(&self.store, &global)?;
        drop(global);
        // Server evaluation before `complete`: a crash during it redoes the round, so the
        // evaluation is never lost.
        let server_eval = self.server_eval(round, &new_id).await;
        let accepted = self.state.accepted.clone();
        let reason = reason.unwrap_or(if self.state.dropped().is_empty() {
            CloseReason::AllReported
        } else {
            CloseReason::Deadline
        });
        let server_loss = server_eval
            .as_ref()
            .and_then(|r| r.as_ref().ok())
            .map(|e| e.policy_loss);
        self.observe_schedule(round, server_loss);
        let summary = self.state.complete(new_id.clone(), reason, now_ms());
        self.store.save_state(&self.state)?;
        store::write_atomic(
            &self.store.round_summary_path(round),
            &serde_json::to_vec_pretty(&summary)?,
        )?;
        // Every round so far in one file, for plots and dashboards.
        store::write_atomic(
            &self.store.dir.join("federated_metrics.json"),
            &serde_json::to_vec_pretty(&self.state.history)?,
        )?;
        let _ = std::fs::remove_dir_all(self.store.spool_round_dir(round));
        let _ = std::fs::remove_dir_all(self.store.accepted_round_dir(round));
        self.metrics.rounds_completed.inc();
        self.metrics
            .round_duration_seconds
            .observe(summary.duration_ms as f64 / 1000.0);
        tracing::info!(round, model = %new_id, accepted = ?summary.accepted, dropped = ?summary.dropped, metrics = ?summary.metrics, "round aggregated");
        self.publish_model().await?;
        self.publish_status(true).await;
        self.write_outputs(&summary, &accepted, server_eval);
        Ok(())
    }

    /// Evaluates model `model_id` on the held-out dataset when round `round` is due (round 0:
    /// the initial model). `None`: not due; `Some(Err)`: failed (logged and counted).
    async fn server_eval(
        &self,
        round: u64,
        model_id: &str,
    ) -> Option<std::result::Result<ServerEval, String>> {
        let o = &self.cfg.outputs;
        let due = if round == 0 {
            o.eval.initial && !o.eval.dataset.is_empty()
        } else {
            o.eval_due(round, self.cfg.rounds.rounds)
        };
        if !due {
            return None;
        }
        let Some(base) = self.base_dir.clone() else {
            self.metrics.server_eval_failures.inc();
            return Some(Err(format!(
                "no base checkpoint directory for {:?} (set outputs.base_model_dir)",
                self.cfg.rounds.base_model
            )));
        };
        tracing::info!(round, model = %model_id, dataset = %o.eval.dataset, "server evaluation");
        let r = server_eval::evaluate(
            &o.eval,
            &base,
            &self.store.model_path(model_id),
            model_id,
            &self.store.dir.join("eval"),
        )
        .await;
        match r {
            Ok(e) => {
                tracing::info!(
                    round,
                    policy_loss = e.policy_loss,
                    seconds = e.seconds,
                    "server evaluation done"
                );
                let point = PolicyLossPoint {
                    round,
                    model_id: model_id.to_string(),
                    policy_loss: e.policy_loss,
                };
                if let Err(err) = Outputs::new(&self.store).record_policy_loss(&e.dataset, point) {
                    tracing::error!(
                        error = format!("{err:#}"),
                        "writing policy_loss_history.json"
                    );
                }
                Some(Ok(e))
            }
            Err(err) => {
                let msg = format!("{err:#}");
                tracing::warn!(round, error = %msg, "server evaluation failed; the federation goes on");
                self.metrics.server_eval_failures.inc();
                Some(Err(msg))
            }
        }
    }

    /// Uploads the final checkpoint to `outputs.push_to_hub`; failures are logged (the run's
    /// files stay on disk; `zk0-aggregator push` retries by hand).
    fn push_to_hub(&self, dir: &std::path::Path) {
        let repo = &self.cfg.outputs.push_to_hub;
        let Some(token) = crate::hub::token_from_env() else {
            tracing::warn!(%repo, "not pushed: no Hugging Face token (HF_TOKEN)");
            return;
        };
        // A blocking HTTP client; keep the runtime's other tasks (MQTT polling) running.
        let r = tokio::task::block_in_place(|| {
            crate::hub::push_folder(&crate::hub::endpoint_from_env(), &token, repo, dir)
        });
        match r {
            Ok(r) => {
                tracing::info!(%repo, url = %r.repo_url, files = r.regular.len() + r.lfs.len(), "checkpoint pushed to the Hub")
            }
            Err(e) => {
                tracing::warn!(%repo, error = format!("{e:#}"), "push to the Hub failed; retry with `zk0-aggregator push`")
            }
        }
    }

    /// `round_NNN_server_eval.json`, plots and, when due, a checkpoint. Failures are logged:
    /// outputs never stop the federation.
    fn write_outputs(
        &self,
        summary: &crate::round::RoundSummary,
        accepted: &BTreeMap<String, crate::round::UpdateRecord>,
        server_eval: Option<std::result::Result<ServerEval, String>>,
    ) {
        let outputs = Outputs::new(&self.store);
        let datasets: BTreeMap<String, String> = accepted
            .keys()
            .filter_map(|c| {
                let configured = self.cfg.datasets.for_client(c).map(|d| d.repo_id.clone());
                Some((
                    c.clone(),
                    configured.or_else(|| self.reported_datasets.get(c).cloned())?,
                ))
            })
            .collect();
        let mut record = RoundRecord::new(summary, accepted, &datasets);
        match server_eval {
            Some(Ok(e)) => record.server_eval = Some(e),
            Some(Err(e)) => record.server_eval_error = Some(e),
            None => {}
        }
        let round = summary.round;
        let result = (|| -> Result<()> {
            outputs.save_round(&record)?;
            let history = outputs.load_history()?;
            let rounds = outputs.load_rounds(round)?;
            if self.cfg.outputs.plots {
                if let Err(e) = plots::write_all(&outputs.plots_dir(), &history, &rounds) {
                    tracing::warn!(error = format!("{e:#}"), "plots not written");
                }
            }
            if self
                .cfg
                .outputs
                .checkpoint_due(round, self.cfg.rounds.rounds)
            {
                let (_, global) = aggregate::load_model(&self.store, &summary.model_id)?;
                let training = checkpoint::TrainingState {
                    round,
                    model_id: summary.model_id.clone(),
                    state: self.state.clone(),
                    policy_loss: history,
                    rounds,
                };
                let dir = checkpoint::write(
                    &outputs.checkpoints_dir(),
                    &checkpoint::CheckpointInput {
                        cfg: &self.cfg,
                        training: &training,
                        global: &global,
                        base_dir: self.base_dir.as_deref(),
                    },
                )?;
                tracing::info!(round, dir = %dir.display(), lerobot = self.base_dir.is_some(), "checkpoint written");
                let last = self.cfg.rounds.rounds > 0 && round == self.cfg.rounds.rounds;
                if last && !self.cfg.outputs.push_to_hub.is_empty() {
                    self.push_to_hub(&dir.join("pretrained_model"));
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::error!(
                round,
                error = format!("{e:#}"),
                "writing run outputs failed"
            );
        }
    }

    /// Feeds the closing round's client losses to the zk0 schedule, before `complete` clears
    /// the accepted updates; it decides the adaptive part of the next announcement.
    fn observe_schedule(&mut self, round: u64, server_loss: Option<f64>) {
        let clients = self
            .state
            .accepted
            .iter()
            .filter_map(|(c, rec)| Some((c.clone(), (*rec.metrics.get("loss")?, rec.examples))))
            .collect();
        let obs = crate::schedule::RoundObservation {
            round,
            clients,
            server_loss,
        };
        self.state.schedule.observe(&self.cfg.schedule, &obs);
    }

    async fn announce(&self) -> Result<()> {
        let Some(deadline) = self.state.deadline_ms() else {
            return Ok(());
        };
        let r = &self.cfg.rounds;
        let ann = RoundAnnouncement {
            v: PROTOCOL_VERSION,
            round: self.state.round,
            model_id: self.state.model_id.clone(),
            base_model: r.base_model.clone(),
            // zk0's schedules (warm restarts, stall, adaptive mu, per-client boosts) on top of
            // the configured values.
            hyper: self.state.schedule.hyper(
                &self.cfg.schedule,
                &HyperParams {
                    local_steps: r.local_steps,
                    lr: r.lr,
                    mu: r.mu,
                    batch_size: r.batch_size,
                    lr_overrides: BTreeMap::new(),
                },
                self.state.round,
            ),
            deadline_unix_ms: deadline,
            min_clients: r.min_clients as u32,
            selected: self.state.selected.iter().cloned().collect(),
            accepted_codecs: r.accepted_codecs.clone(),
            chunk_size: r.chunk_size as u32,
            max_update_bytes: r.max_update_bytes,
        };
        self.publish(self.topics.round(), message::encode(&ann), true)
            .await;
        Ok(())
    }

    /// Publishes the current global model (retained chunks, then the signed manifest) and
    /// clears the previous model's retained messages.
    async fn publish_model(&mut self) -> Result<()> {
        let id = self.state.model_id.clone();
        if self.published.as_ref().is_some_and(|(p, _)| *p == id) {
            return Ok(());
        }
        // Every global model shares the spec of the first (aggregation keeps names and
        // shapes), so decode the tensors only when no spec is known yet.
        let bytes = if self.spec.numel() == 0 {
            let (bytes, tensors) = aggregate::load_model(&self.store, &id)?;
            self.spec = ModelSpec::from_tensors(&tensors);
            bytes
        } else {
            let path = self.store.model_path(&id);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
        };
        // Clear the superseded model first (an empty retained publish deletes the retained
        // message), so the broker never holds two models at once.
        if let Some((old, old_count)) = self.published.take().or_else(|| self.previous_published())
        {
            if old != id {
                self.publish(self.topics.model_manifest(&old), Vec::new(), true)
                    .await;
                for i in 0..old_count {
                    self.publish(self.topics.model_chunk(&old, i), Vec::new(), true)
                        .await;
                }
            }
        }
        let chunk_size = self.cfg.rounds.chunk_size;
        let count = chunk::chunk_count(bytes.len(), chunk_size);
        for (i, c) in chunk::split(&bytes, chunk_size).enumerate() {
            self.publish(self.topics.model_chunk(&id, i as u32), c.to_vec(), true)
                .await;
        }
        let mut manifest = ModelManifest {
            v: PROTOCOL_VERSION,
            model_id: id.clone(),
            round: self.state.round,
            tensors: ModelManifest::tensor_infos(&self.spec),
            total_len: bytes.len() as u64,
            chunk_count: count,
            chunk_size: chunk_size as u32,
            sha256: shared_proto::hash::sha256_hex(&bytes),
            kind: ModelBlobKind::Full,
            signature: Vec::new(),
        };
        manifest.sign_with(&self.signer);
        self.publish(
            self.topics.model_manifest(&id),
            message::encode(&manifest),
            true,
        )
        .await;
        self.metrics
            .model_bytes_published
            .inc_by(bytes.len() as u64);
        tracing::info!(model = %id, bytes = bytes.len(), chunks = count, "global model published");
        self.published = Some((id, count));
        Ok(())
    }

    /// The model of the previous round, whose retained messages may still be on the broker.
    fn previous_published(&self) -> Option<(String, u32)> {
        let prev = self.state.history.last()?.base_model_id.clone();
        let len = std::fs::metadata(self.store.model_path(&prev)).ok()?.len();
        Some((
            prev,
            len.div_ceil(self.cfg.rounds.chunk_size as u64).max(1) as u32,
        ))
    }

    async fn publish_status(&self, online: bool) {
        let s = ServerStatus {
            v: PROTOCOL_VERSION,
            online,
            round: self.state.round,
            model_id: Some(self.state.model_id.clone()),
            aggregator_key: self.signer.public().fingerprint(),
            ts_ms: now_ms(),
        };
        self.publish(self.topics.server_status(), message::encode(&s), true)
            .await;
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        if let Err(e) = self
            .client
            .publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
            .await
        {
            tracing::warn!(%topic, error = %e, "publish failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884").unwrap(),
            (false, "127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://broker").unwrap(),
            (false, "broker".into(), 1883)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://broker").unwrap(),
            (true, "broker".into(), 8883)
        );
        assert!(parse_mqtt_url("http://x").is_err());
        assert!(parse_mqtt_url("mqtt://x:notaport").is_err());
    }
}
