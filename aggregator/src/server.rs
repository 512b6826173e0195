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
use shared_proto::codec::{decode_delta, decode_delta_with_codec, Codec};
use shared_proto::message::{
    self, Ack, ClientStatus, HyperParams, ModelBlobKind, ModelManifest, RejectReason,
    RoundAnnouncement, ServerStatus, UpdateManifest, PROTOCOL_VERSION,
};
use shared_proto::sign::{KeyPair, PublicKey};
use shared_proto::tensor::ModelSpec;
use shared_proto::topic::{TopicKind, Topics};
use tokio::sync::mpsc;

use crate::aggregate::{self, Accumulator};
use crate::broker::EmbeddedBroker;
use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::round::{Admission, CloseReason, Phase, RoundState, Transition, UpdateRecord};
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
    uploads: HashMap<String, Upload>,
    spec: ModelSpec,
    /// Enrolled keys, re-read when `keys.json` changes (so `keys enroll|revoke` apply live).
    keys: KeyRegistry,
    keys_mtime: Option<std::time::SystemTime>,
    /// Chunk count of the model whose retained messages are currently published.
    published: Option<(String, u32)>,
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
        uploads: HashMap::new(),
        keys: KeyRegistry::default(),
        keys_mtime: None,
        published: None,
        done: false,
    };
    drop(global);
    srv.metrics.current_round.set(srv.state.round as i64);
    srv.resume_uploads();
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
                Ok(s) => s.online && s.client_id == cid,
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
            self.try_complete(cid).await?;
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
        self.try_complete(cid).await
    }

    /// Verifies and accepts an upload once its manifest and every chunk are in.
    async fn try_complete(&mut self, cid: &str) -> Result<()> {
        let Some(up) = self.uploads.get(cid) else {
            return Ok(());
        };
        let Some(m) = up.manifest.clone() else {
            return Ok(());
        };
        let round = up.round;
        if (0..m.chunk_count).any(|i| !up.chunk_lens.contains_key(&i)) {
            return Ok(()); // wait for the missing chunks (a resend after reconnect fills them)
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
                let ack = Ack {
                    v: PROTOCOL_VERSION,
                    client_id: cid.to_string(),
                    round,
                    accepted: true,
                    reason: None,
                    detail: String::new(),
                };
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
        let (delta, codec) = decode_delta_with_codec(blob, &self.spec, max_decoded)
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
        self.spec
            .validate(&delta)
            .map_err(|e| (e.reject_reason(), format!("delta: {e}")))?;
        let norm = shared_proto::tensor::l2_norm_sq(&delta).sqrt();
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
        let ack = Ack {
            v: PROTOCOL_VERSION,
            client_id: cid.to_string(),
            round,
            accepted: false,
            reason: Some(reason),
            detail,
        };
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
        let mut acc = Accumulator::new(&self.spec);
        let max_decoded = self.spec.f32_bytes().saturating_add(1 << 20);
        for (cid, rec) in &self.state.accepted {
            let path = self.store.accepted_path(round, cid);
            let blob =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let delta = decode_delta(&blob, &self.spec, max_decoded)
                .with_context(|| format!("decoding {}", path.display()))?;
            acc.add(rec.examples as f64, &delta)?;
        }
        acc.apply(&mut global, self.cfg.rounds.server_lr)?;
        let new_id = aggregate::save_model(&self.store, &global)?;
        drop(global);
        let reason = reason.unwrap_or(if self.state.dropped().is_empty() {
            CloseReason::AllReported
        } else {
            CloseReason::Deadline
        });
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
        Ok(())
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
            hyper: HyperParams {
                local_steps: r.local_steps,
                lr: r.lr,
                mu: r.mu,
                batch_size: r.batch_size,
                lr_overrides: BTreeMap::new(),
            },
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
        let (bytes, tensors) = aggregate::load_model(&self.store, &id)?;
        self.spec = ModelSpec::from_tensors(&tensors);
        drop(tensors);
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
        // Clear the superseded model: an empty retained publish deletes the retained message.
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
