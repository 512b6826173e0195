//! The agent's part in the federation as a state machine: [`Core::on`] takes one [`Event`]
//! (a message from the broker, a finished job, a clock tick) and returns the [`Command`]s the
//! event loop must execute (subscribe, publish, spawn the worker, start an upload, save the
//! status file). No MQTT, no tasks, no clock: tests drive it directly.
//!
//! One round at a time, in the order of [`Phase`]:
//! `Idle → Fetching (model not cached) → Training → Encoding → Sending → AwaitingAck → Idle`.
//! A newer round announcement supersedes an update still waiting for its ack (the aggregator
//! announces round r+1 only after closing r) and a download of another model; a running
//! worker finishes first and its update is then dropped. The only I/O here is the model
//! cache ([`fetch::cached`], [`ModelFetch::finish`]): a stat and a small sidecar read per
//! round, and the write of a finished download.
//!
//! With `[infer] follow_global`, each verified global model (a round's, once cached; the
//! aggregator's current one from its status, fetched when idle, which after the last round is
//! the final model) is exported for `zk0-agent act` ([`Command::SpawnExport`]): one export at
//! a time, the newest model queued, started only while no training or encoding runs (in a
//! round: once the update is encoded, during its upload and ack). A round announced during an
//! export trains at once (its deadline comes first). A model is exported (or tried) once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shared_proto::codec::Codec;
use shared_proto::message::{
    self, Ack, ClientStatus, Freshness, ModelManifest, RoundAnnouncement, ServerStatus,
};
use shared_proto::sign::{KeyPair, PublicKey};
use shared_proto::topic::{TopicKind, Topics};
use shared_proto::ProtoError;

use super::config::AgentConfig;
use super::export::Current;
use super::fetch::{self, CachedModel, ModelFetch};
use super::outbound::Outbound;
use super::upload::Upload;
use super::worker::{self, TrainJob, TrainOutput};
use crate::fleet::AgentStatus;

/// How long to wait for an ack before sending the manifest again.
pub const ACK_WAIT_MS: u64 = 30_000;
/// Resend requests honoured per update: a bound, should the broker keep losing chunks.
pub const MAX_RESENDS: u32 = 8;
/// Finished rounds remembered (only recent rounds can be re-announced).
const FINISHED_KEPT: usize = 64;

/// What the core reacts to.
#[derive(Debug)]
pub enum Event {
    /// Connection number `session` is up (its will names the same session).
    Connected {
        session: u64,
    },
    /// The connection failed (the event loop keeps reconnecting).
    Disconnected,
    /// The retained `round` announcement (CBOR; empty: cleared).
    Round(Bytes),
    /// The aggregator's retained status.
    ServerStatus(Bytes),
    ModelManifest {
        model_id: String,
        payload: Bytes,
    },
    ModelChunk {
        model_id: String,
        index: u32,
        payload: Bytes,
    },
    /// An ack for one of this agent's updates.
    Ack {
        round: u64,
        payload: Bytes,
    },
    /// The training worker of `round` finished.
    Trained {
        round: u64,
        out: TrainOutput,
    },
    /// The training worker or the encoding of `round` failed (or the worker ran past its
    /// time and was killed: `timed_out`).
    WorkerFailed {
        round: u64,
        error: String,
        timed_out: bool,
    },
    Encoded {
        round: u64,
        out: Outbound,
    },
    /// Upload `upload_id` of `round` published its manifest.
    Uploaded {
        round: u64,
        upload_id: u64,
    },
    /// The export of `model_id` finished (installed as `current.json`) or failed.
    Exported {
        model_id: String,
        result: Result<Current, String>,
    },
    /// Once a second.
    Tick,
}

impl Event {
    /// The event an incoming publish is, if it is one for this agent.
    pub fn from_publish(
        topics: &Topics,
        client_id: &str,
        topic: &str,
        payload: Bytes,
    ) -> Option<Event> {
        Some(match topics.parse(topic)? {
            TopicKind::Round => Event::Round(payload),
            TopicKind::ServerStatus => Event::ServerStatus(payload),
            TopicKind::ModelManifest { model_id } => Event::ModelManifest { model_id, payload },
            TopicKind::ModelChunk { model_id, index } => Event::ModelChunk {
                model_id,
                index,
                payload,
            },
            TopicKind::Ack {
                client_id: c,
                round,
            } if c == client_id => Event::Ack { round, payload },
            _ => return None,
        })
    }
}

/// What the event loop does for the core.
#[derive(Debug)]
pub enum Command {
    Subscribe(String),
    Unsubscribe(String),
    Publish {
        topic: String,
        payload: Bytes,
        retain: bool,
    },
    /// Run the worker, killing it after `timeout_ms`; report [`Event::Trained`] or
    /// [`Event::WorkerFailed`].
    SpawnTraining {
        round: u64,
        job: TrainJob,
        timeout_ms: u64,
    },
    /// Encode and sign the update ([`super::outbound::encode_update`]); report
    /// [`Event::Encoded`] or [`Event::WorkerFailed`].
    SpawnEncode {
        round: u64,
        ann: RoundAnnouncement,
        out: TrainOutput,
    },
    /// Publish an upload (replacing any still running); report [`Event::Uploaded`].
    StartUpload(Upload),
    StopUpload,
    /// Rewrite `<work_dir>/status.json`.
    SaveStatus(AgentStatus),
    /// Export the verified global model `model_id` (weights file `weights`) on top of the base
    /// checkpoint `model` ([`super::export::run`]); report [`Event::Exported`].
    SpawnExport {
        model_id: String,
        round: u64,
        model: PathBuf,
        weights: PathBuf,
    },
}

/// Where the agent is in the current round.
#[derive(Debug)]
pub enum Phase {
    Idle,
    /// Downloading the round's global model.
    Fetching {
        round: u64,
        fetch: Box<ModelFetch>,
    },
    Training {
        round: u64,
    },
    Encoding {
        round: u64,
    },
    /// An upload of the update is running.
    Sending(Outbound),
    /// The manifest went out; waiting for the aggregator's verdict.
    AwaitingAck(Outbound),
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Fetching { .. } => "fetching",
            Phase::Training { .. } => "training",
            Phase::Encoding { .. } => "encoding",
            Phase::Sending(_) => "sending",
            Phase::AwaitingAck(_) => "awaiting_ack",
        }
    }

    fn outbound(&self) -> Option<&Outbound> {
        match self {
            Phase::Sending(o) | Phase::AwaitingAck(o) => Some(o),
            _ => None,
        }
    }
}

/// What went wrong, counted (shown by `zk0-agent status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Messages that did not decode (round, model manifest, ack).
    pub malformed: u64,
    /// Round announcements older than the newest one acted on (replays), ignored.
    pub stale_rounds: u64,
    /// Aggregator statuses older than the newest one seen (replays), ignored.
    pub stale_statuses: u64,
    /// Announcements, acks and server statuses not signed by the pinned aggregator key, or
    /// signed for another federation or client, and model chunks not matching their signed
    /// hash: dropped.
    pub forged: u64,
    /// Model downloads refused: a manifest not signed by the pinned key or not matching the
    /// model id, or a blob failing its hash.
    pub models_rejected: u64,
    /// Model chunks that did not fit their manifest.
    pub bad_chunks: u64,
    /// Training or encoding runs that failed.
    pub worker_failures: u64,
    /// Chunk resends the aggregator asked for.
    pub resends: u64,
    /// Training runs killed at the round's deadline or the worker timeout.
    pub worker_timeouts: u64,
    /// Exports of a global model for `act --follow-global` that failed or timed out.
    pub export_failures: u64,
}

/// Exports of global models for `act --follow-global` (see the module doc).
#[derive(Debug, Default)]
struct Exports {
    /// The newest verified model waiting for its export: id, round, weights file.
    queued: Option<(String, u64, PathBuf)>,
    /// The export running.
    running: Option<String>,
    /// The model last exported or tried (a failed one is not retried).
    last: Option<String>,
}

impl Exports {
    fn knows(&self, model_id: &str) -> bool {
        [
            self.last.as_deref(),
            self.running.as_deref(),
            self.queued.as_ref().map(|q| q.0.as_str()),
        ]
        .contains(&Some(model_id))
    }
}

/// The agent's state (see the module doc).
#[derive(Debug)]
pub struct Core {
    cfg: AgentConfig,
    codec: Codec,
    topics: Topics,
    pinned: PublicKey,
    /// Signs this agent's status messages.
    key: KeyPair,
    /// This agent's status message (`online`, `session` and the signature set when sent).
    hello: ClientStatus,
    /// The current connection's number.
    session: u64,
    round: Option<RoundAnnouncement>,
    /// The newest announcement acted on (kept across restarts in the status file).
    newest_round: Freshness,
    /// The newest aggregator status seen.
    newest_server: Option<Freshness>,
    phase: Phase,
    /// Rounds this agent finished (acked, rejected, failed or expired).
    finished: BTreeSet<u64>,
    rounds_done: u64,
    /// Uploads started (ids of [`Upload`]).
    uploads: u64,
    exports: Exports,
    status: AgentStatus,
    /// The time of the event being handled.
    now: u64,
    out: Vec<Command>,
}

impl Core {
    /// A core for `cfg` (already validated), trusting what `pinned` signed, announcing itself
    /// with `hello` signed by `key`. `previous` is the status file of the last run: the newest
    /// announcement it acted on stays the floor, so a replay cannot take a restarted agent back.
    pub fn new(
        cfg: AgentConfig,
        pinned: PublicKey,
        key: KeyPair,
        hello: ClientStatus,
        previous: Option<&AgentStatus>,
    ) -> Result<Core, ProtoError> {
        let codec = cfg.codec.parse()?;
        let topics = Topics::new(&cfg.federation)?;
        let status = AgentStatus {
            client_id: cfg.client_id.clone(),
            pid: std::process::id(),
            dataset: cfg.dataset.display().to_string(),
            announcement_seq: previous.map_or(0, |p| p.announcement_seq),
            ..AgentStatus::default()
        };
        Ok(Core {
            cfg,
            codec,
            topics,
            pinned,
            key,
            hello,
            session: 0,
            round: None,
            newest_round: Freshness(status.announcement_seq, false),
            newest_server: None,
            phase: Phase::Idle,
            finished: BTreeSet::new(),
            rounds_done: 0,
            uploads: 0,
            exports: Exports::default(),
            status,
            now: 0,
            out: Vec::new(),
        })
    }

    /// The model the last run exported (`current.json`): not exported again.
    pub fn with_exported(mut self, model_id: Option<String>) -> Self {
        self.exports.last = model_id;
        self
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn client_id(&self) -> &str {
        &self.cfg.client_id
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn counters(&self) -> Counters {
        self.status.counters
    }

    pub fn rounds_done(&self) -> u64 {
        self.rounds_done
    }

    /// Whether `--max-rounds` is reached, no update is still waiting for its ack and no
    /// export is queued or running.
    pub fn is_done(&self, max_rounds: u64) -> bool {
        max_rounds > 0
            && self.rounds_done >= max_rounds
            && self.phase.outbound().is_none()
            && self.exports.running.is_none()
            && self.exports.queued.is_none()
    }

    /// The retained offline status (last will, goodbye): topic and payload.
    pub fn goodbye(&self) -> (String, Bytes) {
        self.status_message(false)
    }

    /// The status file's first version.
    pub fn start(&mut self, now: u64) -> Vec<Command> {
        self.now = now;
        self.save_status();
        std::mem::take(&mut self.out)
    }

    /// Shutting down: the goodbye status and the file marked disconnected.
    pub fn stop(&mut self, now: u64) -> Vec<Command> {
        self.now = now;
        let (topic, payload) = self.goodbye();
        self.out.push(Command::StopUpload);
        self.out.push(Command::Publish {
            topic,
            payload,
            retain: true,
        });
        self.status.connected = false;
        self.save_status();
        std::mem::take(&mut self.out)
    }

    /// Handles one event at `now` (Unix ms) and returns what to do.
    pub fn on(&mut self, ev: Event, now: u64) -> Vec<Command> {
        self.now = now;
        match ev {
            Event::Connected { session } => {
                self.session = session;
                self.on_connected()
            }
            Event::Disconnected => {
                if self.status.connected {
                    self.status.connected = false;
                    self.save_status();
                }
            }
            Event::Round(payload) => self.on_round(&payload),
            Event::ServerStatus(payload) => self.on_server_status(&payload),
            Event::ModelManifest { model_id, payload } => {
                self.on_model_manifest(&model_id, &payload)
            }
            Event::ModelChunk {
                model_id,
                index,
                payload,
            } => self.on_model_chunk(&model_id, index, &payload),
            Event::Ack { round, payload } => self.on_ack(round, &payload),
            Event::Trained { round, out } => self.on_trained(round, out),
            Event::WorkerFailed {
                round,
                error,
                timed_out,
            } => self.on_worker_failed(round, error, timed_out),
            Event::Encoded { round, out } => self.on_encoded(round, out),
            Event::Uploaded { round, upload_id } => match self.take_phase() {
                // The ack wait starts when the manifest went out, not when a slow upload
                // began. A report from an upload since replaced changes nothing.
                Phase::Sending(mut o) if o.round == round && o.upload_id == upload_id => {
                    o.sent_ms = now;
                    self.phase = Phase::AwaitingAck(o);
                }
                other => self.phase = other,
            },
            Event::Exported { model_id, result } => self.on_exported(model_id, result),
            Event::Tick => self.on_tick(),
        }
        self.maybe_export();
        std::mem::take(&mut self.out)
    }

    fn take_phase(&mut self) -> Phase {
        std::mem::replace(&mut self.phase, Phase::Idle)
    }

    /// Takes the update out of a sending or awaiting-ack phase (leaving any other as it is).
    fn take_outbound(&mut self) -> Option<Outbound> {
        match self.take_phase() {
            Phase::Sending(o) | Phase::AwaitingAck(o) => Some(o),
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// Makes the signed offline status of a session: each connection's last will.
    pub fn will_maker(&self) -> impl Fn(u64) -> (String, Bytes) + Send + Sync + 'static {
        let (hello, key) = (self.hello.clone(), self.key.clone());
        let topic = self.topics.client_status(&self.cfg.client_id);
        move |session| (topic.clone(), signed_status(&hello, &key, session, false))
    }

    fn status_message(&self, online: bool) -> (String, Bytes) {
        (
            self.topics.client_status(&self.cfg.client_id),
            signed_status(&self.hello, &self.key, self.session, online),
        )
    }

    /// Checks an aggregator-signed message: the pinned key, this federation. Counts a forgery.
    fn authentic(
        &mut self,
        what: &str,
        federation: &str,
        verified: Result<(), ProtoError>,
    ) -> bool {
        let ok = federation == self.cfg.federation && verified.is_ok();
        if !ok {
            self.status.counters.forged += 1;
            tracing::warn!(
                federation,
                "{what} not signed by the pinned aggregator key for this federation; dropped"
            );
        }
        ok
    }

    fn save_status(&mut self) {
        self.status.rounds_done = self.rounds_done;
        self.status.updated_unix_ms = self.now;
        self.out.push(Command::SaveStatus(self.status.clone()));
    }

    fn subscribe(&mut self, topic: String) {
        self.out.push(Command::Subscribe(topic));
    }

    fn finish_round(&mut self, round: u64) {
        if self.finished.insert(round) {
            self.rounds_done += 1;
        }
        while self.finished.len() > FINISHED_KEPT {
            self.finished.pop_first();
        }
    }

    fn on_connected(&mut self) {
        tracing::info!("connected to the broker");
        self.status.connected = true;
        self.save_status();
        let cid = self.cfg.client_id.clone();
        self.subscribe(self.topics.server_status());
        self.subscribe(self.topics.round());
        self.subscribe(self.topics.acks_for(&cid));
        let (topic, payload) = self.status_message(true);
        self.out.push(Command::Publish {
            topic,
            payload,
            retain: true,
        });
        if let Phase::Fetching { fetch, .. } = &mut self.phase {
            // The subscriptions went with the old session.
            fetch.reset_inflight();
            let t = self.topics.model_manifest(fetch.model_id());
            self.subscribe(t);
            self.request_chunks();
        }
        // Unacknowledged work: send the manifest again; the aggregator answers with the
        // chunks it still lacks, or its verdict.
        if self.phase.outbound().is_some() {
            self.send_outbound();
        }
    }

    fn on_server_status(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let Some(st) = decode::<ServerStatus>(payload, &mut self.status.counters, "server status")
        else {
            return;
        };
        let verified = st.verify_with(&self.pinned);
        if !self.authentic("server status", &st.federation, verified) {
            return;
        }
        let fresh = Freshness::status(st.session, st.online);
        if self.newest_server.is_some_and(|n| !n.admits(fresh)) {
            self.status.counters.stale_statuses += 1;
            tracing::debug!(
                session = st.session,
                "aggregator status older than one seen; ignored"
            );
            return;
        }
        self.newest_server = Some(fresh);
        if self.status.server_online != Some(st.online) {
            tracing::info!(online = st.online, round = st.round, "aggregator status");
            self.status.server_online = Some(st.online);
            self.save_status();
        }
        // Only an online status names the current model: an offline one may be the broker's
        // copy of the aggregator's last will, written when it connected (a stale model).
        if let (true, Some(id)) = (st.online, &st.model_id) {
            self.follow_model(id, st.round);
        }
    }

    /// With `follow_global`: the aggregator's current model (after the last round the final
    /// one), exported if cached, else fetched first when the agent is idle.
    fn follow_model(&mut self, model_id: &str, round: u64) {
        if !self.cfg.infer.follow_global || self.exports.knows(model_id) {
            return;
        }
        match fetch::cached(&self.cfg.cache_dir, model_id) {
            Some(m) => self.note_global(model_id, round, &m.path),
            None if matches!(self.phase, Phase::Idle) => {
                tracing::info!(
                    model = model_id,
                    "fetching the aggregator's model to export it"
                );
                self.start_fetch(round, model_id);
            }
            None => {}
        }
    }

    /// Queues the export of a verified global model, when following and not done already.
    fn note_global(&mut self, model_id: &str, round: u64, weights: &Path) {
        // Never queue an older round's model over a newer one waiting its turn.
        let newer_queued = matches!(&self.exports.queued, Some((_, r, _)) if *r > round);
        if self.cfg.infer.follow_global && !self.exports.knows(model_id) && !newer_queued {
            self.exports.queued = Some((model_id.to_string(), round, weights.to_path_buf()));
        }
    }

    /// Starts the queued export when none runs and neither training nor encoding does.
    fn maybe_export(&mut self) {
        if self.exports.running.is_some()
            || matches!(self.phase, Phase::Training { .. } | Phase::Encoding { .. })
        {
            return;
        }
        let Some((model_id, round, weights)) = self.exports.queued.take() else {
            return;
        };
        // The base checkpoint training loads, else the federation's named base.
        let base = self.round.as_ref().map_or("", |a| a.base_model.as_str());
        let model = if !self.cfg.model_dir.as_os_str().is_empty() {
            self.cfg.model_dir.clone()
        } else if !base.is_empty() {
            PathBuf::from(base)
        } else {
            PathBuf::from("lerobot/smolvla_base")
        };
        tracing::info!(model = %model_id, round, "exporting the global model for act");
        self.exports.running = Some(model_id.clone());
        self.exports.last = Some(model_id.clone());
        self.out.push(Command::SpawnExport {
            model_id,
            round,
            model,
            weights,
        });
    }

    fn on_exported(&mut self, model_id: String, result: Result<Current, String>) {
        if self.exports.running.as_deref() != Some(model_id.as_str()) {
            return;
        }
        self.exports.running = None;
        match result {
            Ok(c) => {
                tracing::info!(model = %model_id, dir = %c.dir.display(), "export ready for act")
            }
            Err(error) => {
                tracing::error!(model = %model_id, %error, "export failed; act keeps the previous one");
                self.status.counters.export_failures += 1;
                self.save_status();
            }
        }
    }

    fn on_round(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let Some(ann) =
            decode::<RoundAnnouncement>(payload, &mut self.status.counters, "round announcement")
        else {
            return;
        };
        let verified = ann.verify_with(&self.pinned);
        if !self.authentic("round announcement", &ann.federation, verified) {
            return;
        }
        let fresh = Freshness::announcement(&ann);
        if !self.newest_round.admits(fresh) {
            self.status.counters.stale_rounds += 1;
            tracing::warn!(
                round = ann.round,
                seq = ann.seq,
                newest = self.newest_round.0,
                "announcement older than one already acted on (a replay); ignored"
            );
            return;
        }
        self.newest_round = fresh;
        if self.round.as_ref().is_some_and(|cur| ann.round < cur.round) {
            // A newer announcement of an earlier round: the federation was started again.
            tracing::warn!(round = ann.round, "the aggregator restarted the federation");
            self.finished.clear();
        }
        if self.status.round != ann.round || self.status.announcement_seq != ann.seq {
            self.status.round = ann.round;
            self.status.announcement_seq = ann.seq;
            self.save_status();
        }
        match &self.phase {
            Phase::Fetching { fetch, .. } if *fetch.model_id() != ann.model_id => self.drop_fetch(),
            Phase::Sending(o) | Phase::AwaitingAck(o) if o.round != ann.round => {
                let r = o.round;
                tracing::warn!(
                    round = r,
                    "round closed before our update was acked; dropped"
                );
                self.phase = Phase::Idle;
                self.out.push(Command::StopUpload);
                self.finish_round(r);
            }
            _ => {}
        }
        self.round = Some(ann);
        self.consider_round();
    }

    fn drop_fetch(&mut self) {
        let Phase::Fetching { fetch, .. } = self.take_phase() else {
            return;
        };
        self.out.push(Command::Unsubscribe(
            self.topics.model_manifest(fetch.model_id()),
        ));
        for i in fetch.inflight() {
            self.out.push(Command::Unsubscribe(
                self.topics.model_chunk(fetch.model_id(), i),
            ));
        }
    }

    /// Takes part in the announced round if idle, selected, and not already done.
    fn consider_round(&mut self) {
        if !matches!(self.phase, Phase::Idle) {
            return; // re-considered when the running work ends
        }
        let Some(ann) = self.round.clone() else {
            return;
        };
        let r = ann.round;
        if self.finished.contains(&r) || ann.deadline_unix_ms <= self.now {
            return;
        }
        if !ann.is_selected(&self.cfg.client_id) {
            tracing::info!(round = r, "not selected this round; waiting");
            return;
        }
        if !ann
            .accepted_codecs
            .iter()
            .any(|c| c.parse::<Codec>().ok() == Some(self.codec))
        {
            tracing::error!(round = r, codec = %self.codec, accepted = ?ann.accepted_codecs, "our codec is not accepted; skipping the round");
            self.finish_round(r);
            return;
        }
        tracing::info!(round = r, model = %ann.model_id, "round announced");
        if let Some(model) = fetch::cached(&self.cfg.cache_dir, &ann.model_id) {
            self.start_training(&ann, model);
            return;
        }
        self.start_fetch(r, &ann.model_id);
    }

    /// Starts downloading `model_id` (for `round`).
    fn start_fetch(&mut self, round: u64, model_id: &str) {
        // A global model is never larger than the update cap times a generous factor.
        let cap = self.round.as_ref().map_or(0, |a| a.max_update_bytes);
        let max_len = cap.saturating_mul(4).max(1 << 30);
        let fetch = ModelFetch::new(model_id.to_string().into(), self.cfg.fetch_window, max_len);
        self.subscribe(self.topics.model_manifest(model_id));
        self.phase = Phase::Fetching {
            round,
            fetch: Box::new(fetch),
        };
    }

    fn on_model_manifest(&mut self, model_id: &str, payload: &[u8]) {
        let Phase::Fetching { fetch, .. } = &mut self.phase else {
            return;
        };
        if fetch.model_id() != model_id || fetch.has_manifest() || payload.is_empty() {
            return;
        }
        let Some(m) = decode::<ModelManifest>(payload, &mut self.status.counters, "model manifest")
        else {
            return;
        };
        if let Err(e) = fetch.on_manifest(m, &self.pinned) {
            self.status.counters.models_rejected += 1;
            tracing::error!(model = model_id, error = %e, "model manifest rejected");
            return;
        }
        tracing::info!(model = model_id, "downloading the global model");
        self.request_chunks();
    }

    fn request_chunks(&mut self) {
        let Phase::Fetching { fetch, .. } = &mut self.phase else {
            return;
        };
        for i in fetch.wanted() {
            self.out.push(Command::Subscribe(
                self.topics.model_chunk(fetch.model_id(), i),
            ));
        }
    }

    fn on_model_chunk(&mut self, model_id: &str, index: u32, payload: &[u8]) {
        let Phase::Fetching { fetch, .. } = &mut self.phase else {
            return;
        };
        if fetch.model_id() != model_id {
            return;
        }
        let was_inflight = fetch.is_inflight(index);
        match fetch.insert(index, payload) {
            Ok(()) => {}
            Err(e @ fetch::FetchError::ForgedChunk(_)) => {
                // Still subscribed: the genuine chunk comes back on the same topic.
                self.status.counters.forged += 1;
                tracing::warn!(model = model_id, index, error = %e, "model chunk dropped");
                return;
            }
            Err(e) => {
                self.status.counters.bad_chunks += 1;
                tracing::warn!(model = model_id, index, error = %e, "bad model chunk");
            }
        }
        if was_inflight {
            self.out.push(Command::Unsubscribe(
                self.topics.model_chunk(model_id, index),
            ));
        }
        if !fetch.is_complete() {
            self.request_chunks();
            return;
        }
        let Phase::Fetching { fetch, round } = self.take_phase() else {
            return; // checked above
        };
        self.out
            .push(Command::Unsubscribe(self.topics.model_manifest(model_id)));
        match fetch.finish(&self.cfg.cache_dir) {
            Ok(model) => {
                tracing::info!(model = model_id, path = %model.path.display(), "global model cached");
                self.note_global(model_id, round, &model.path);
                self.consider_round();
            }
            Err(e) => {
                self.status.counters.models_rejected += 1;
                tracing::error!(model = model_id, error = %e, "model download failed verification");
            }
        }
    }

    fn start_training(&mut self, ann: &RoundAnnouncement, global: CachedModel) {
        let round = ann.round;
        self.note_global(&ann.model_id, round, &global.path);
        let cfg = &self.cfg;
        let nonempty = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.clone());
        let job = TrainJob {
            command: cfg.worker.clone(),
            extra_args: cfg.worker_args.clone(),
            model: nonempty(&cfg.model_dir),
            tokenizer: nonempty(&cfg.tokenizer),
            global: global.path,
            spec: global.spec,
            dataset: cfg.dataset.clone(),
            steps: ann.hyper.local_steps,
            lr: ann.hyper.lr_for(&cfg.client_id),
            mu: ann.hyper.mu,
            batch: ann.hyper.batch_size,
            seed: worker::seed_for(&cfg.client_id, round),
            output: cfg.worker_output,
            out_dir: cfg.work_dir.join(format!("round-{round}")),
        };
        // Past the deadline the update would be refused: the run never outlives it.
        let mut timeout_ms = ann.deadline_unix_ms.saturating_sub(self.now);
        if cfg.worker_timeout_secs > 0 {
            timeout_ms = timeout_ms.min(cfg.worker_timeout_secs.saturating_mul(1000));
        }
        tracing::info!(round, steps = job.steps, timeout_ms, "training started");
        self.phase = Phase::Training { round };
        self.out.push(Command::SpawnTraining {
            round,
            job,
            timeout_ms,
        });
    }

    fn on_trained(&mut self, round: u64, out: TrainOutput) {
        if !matches!(self.phase, Phase::Training { round: r } if r == round) {
            tracing::warn!(
                round,
                phase = self.phase.name(),
                "unexpected training result ignored"
            );
            return;
        }
        self.phase = Phase::Idle;
        let Some(ann) = self.round.clone().filter(|a| a.round == round) else {
            tracing::warn!(round, "round moved on while training; update dropped");
            self.finish_round(round);
            self.consider_round();
            return;
        };
        tracing::info!(
            round,
            loss = out.metrics.report.loss,
            "training finished; encoding"
        );
        self.status.trained_round = round;
        self.status.last_loss = Some(out.metrics.report.loss);
        self.status.last_accepted = None;
        self.save_status();
        self.phase = Phase::Encoding { round };
        self.out.push(Command::SpawnEncode { round, ann, out });
    }

    fn on_worker_failed(&mut self, round: u64, error: String, timed_out: bool) {
        if !matches!(self.phase, Phase::Training { round: r } | Phase::Encoding { round: r } if r == round)
        {
            return;
        }
        tracing::error!(round, error = %error, "training or encoding failed; sitting this round out");
        self.phase = Phase::Idle;
        self.status.counters.worker_failures += 1;
        if timed_out {
            self.status.counters.worker_timeouts += 1;
        }
        self.status.last_error = Some(error);
        self.finish_round(round);
        self.save_status();
        self.consider_round();
    }

    fn on_encoded(&mut self, round: u64, out: Outbound) {
        if !matches!(self.phase, Phase::Encoding { round: r } if r == round) {
            return;
        }
        self.phase = Phase::Idle;
        if self.round.as_ref().is_none_or(|a| a.round != round) {
            tracing::warn!(round, "round moved on while encoding; update dropped");
            self.finish_round(round);
        } else {
            tracing::info!(round, chunks = out.chunk_count(), "sending update");
            self.phase = Phase::Sending(out);
            self.send_outbound();
        }
        self.consider_round();
    }

    /// Publishes the update's manifest (again), unless its deadline passed, in which case the
    /// update is dropped. The aggregator answers with the chunks it wants, or its verdict.
    fn send_outbound(&mut self) {
        let Some(mut o) = self.take_outbound() else {
            return;
        };
        if o.deadline_ms <= self.now {
            self.expire(o.round);
            return;
        }
        o.sent_ms = self.now;
        self.out.push(Command::Publish {
            topic: self.topics.update_manifest(&self.cfg.client_id, o.round),
            payload: o.manifest.clone(),
            retain: false,
        });
        self.phase = Phase::AwaitingAck(o);
    }

    /// Publishes chunks `indices` of `o`.
    fn start_upload(&mut self, mut o: Outbound, indices: Vec<u32>) {
        self.uploads += 1;
        o.upload_id = self.uploads;
        o.sent_ms = self.now;
        let cid = &self.cfg.client_id;
        let up = Upload {
            id: o.upload_id,
            round: o.round,
            chunks: indices
                .into_iter()
                .map(|i| (self.topics.update_chunk(cid, o.round, i), i))
                .collect(),
            blob: o.blob.clone(),
            chunk_size: o.chunk_size,
        };
        self.out.push(Command::StartUpload(up));
        self.phase = Phase::Sending(o);
    }

    fn on_ack(&mut self, round: u64, payload: &[u8]) {
        let Some(ack) = decode::<Ack>(payload, &mut self.status.counters, "ack") else {
            return;
        };
        let verified = ack.verify_with(&self.pinned);
        if !self.authentic("ack", &ack.federation, verified) {
            return;
        }
        if ack.client_id != self.cfg.client_id || ack.round != round {
            // Signed, but for another client or round: replayed onto our topic.
            self.status.counters.forged += 1;
            tracing::warn!(round, client = %ack.client_id, "ack for another client or round; dropped");
            return;
        }
        if self
            .phase
            .outbound()
            .is_none_or(|o| o.round != round || !ack.answers(&o.sha256))
        {
            tracing::debug!(
                round,
                accepted = ack.accepted,
                "ack for an update no longer held"
            );
            return;
        }
        if ack.is_incomplete() {
            self.resend_missing(&ack.missing);
            return;
        }
        if ack.accepted {
            tracing::info!(round, "update accepted");
        } else {
            let reason = ack.reason.map(|r| r.as_str()).unwrap_or("unspecified");
            tracing::warn!(round, reason, detail = %ack.detail, "update rejected");
        }
        self.phase = Phase::Idle;
        self.out.push(Command::StopUpload);
        self.finish_round(round);
        self.status.last_accepted = Some(ack.accepted);
        self.save_status();
        self.consider_round();
    }

    /// Sends the chunks the aggregator asked for: all of them after the first manifest, later
    /// those lost on the way.
    fn resend_missing(&mut self, missing: &[u32]) {
        let Some(mut o) = self.take_outbound() else {
            return;
        };
        if o.upload_id == 0 {
            tracing::info!(
                round = o.round,
                chunks = missing.len(),
                "manifest accepted; sending chunks"
            );
            self.start_upload(o, missing.to_vec());
            return;
        }
        if o.resends >= MAX_RESENDS {
            tracing::warn!(
                round = o.round,
                "chunks lost again after {MAX_RESENDS} resends; waiting for the deadline"
            );
            self.phase = Phase::AwaitingAck(o);
            return;
        }
        o.resends += 1;
        self.status.counters.resends += 1;
        tracing::info!(
            round = o.round,
            missing = missing.len(),
            "resending lost chunks"
        );
        // Indices come from the aggregator; the upload skips any that are not ours.
        self.start_upload(o, missing.to_vec());
    }

    /// Drops the update of `round` (its deadline passed).
    fn expire(&mut self, round: u64) {
        tracing::warn!(round, "deadline passed without an ack; update dropped");
        self.phase = Phase::Idle;
        self.out.push(Command::StopUpload);
        self.finish_round(round);
    }

    /// Once a second: drop an update past its deadline; send the manifest again when no ack
    /// came.
    fn on_tick(&mut self) {
        let now = self.now;
        let Some(o) = self.phase.outbound() else {
            return;
        };
        if o.deadline_ms <= now {
            let r = o.round;
            self.expire(r);
            return;
        }
        if let Phase::AwaitingAck(o) = &mut self.phase {
            if o.sent_ms > 0 && now.saturating_sub(o.sent_ms) >= ACK_WAIT_MS {
                o.sent_ms = now;
                tracing::info!(round = o.round, "no ack yet; sending the manifest again");
                let topic = self.topics.update_manifest(&self.cfg.client_id, o.round);
                let payload = o.manifest.clone();
                self.out.push(Command::Publish {
                    topic,
                    payload,
                    retain: false,
                });
            }
        }
    }
}

/// Decodes a message from the broker; one that does not decode is counted and logged.
fn decode<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    counters: &mut Counters,
    what: &str,
) -> Option<T> {
    match message::decode(payload, message::DEFAULT_MAX_MESSAGE_LEN) {
        Ok(m) => Some(m),
        Err(e) => {
            counters.malformed += 1;
            tracing::warn!(error = %e, "malformed {what} ignored");
            None
        }
    }
}

/// `hello` for connection `session`, online or not, signed and encoded.
fn signed_status(hello: &ClientStatus, key: &KeyPair, session: u64, online: bool) -> Bytes {
    let mut st = hello.clone();
    st.online = online;
    st.session = session;
    st.sign_with(key);
    Bytes::from(message::encode(&st))
}

#[cfg(test)]
mod tests;
