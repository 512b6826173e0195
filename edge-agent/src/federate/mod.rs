//! `zk0-agent run`: the federated-learning daemon of a robot host.
//!
//! Hello + last will on `client/<cid>/status`; follow the retained `round`; fetch the global
//! model by id (cache, hash, pinned aggregator signature); run the training worker in its own
//! task so MQTT keep-alive never waits on training; encode, sign and send the delta as chunks
//! then a manifest; resend after a reconnect until acked or the deadline passes.
//!
//! Layout: [`config`] (TOML), [`fetch`] (model download state), [`worker`] (the trainer child
//! process), [`upload`] (sending an update, paced to `upload_max_bytes_per_sec`),
//! `zk0_host::systemd` (READY, watchdog), and the event loop in this file.

pub mod config;
pub mod fetch;
pub mod upload;
pub mod worker;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc_ring::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use shared_proto::codec::{encode_delta, Codec, EncodeOptions};
use shared_proto::message::{
    self, Ack, ClientMetrics, ClientStatus, HardwareInfo, ModelManifest, RoundAnnouncement,
    UpdateManifest, PROTOCOL_VERSION,
};
use shared_proto::sign::{KeyPair, PublicKey};
use shared_proto::topic::{TopicKind, Topics};
use tokio::sync::mpsc;

use self::config::AgentConfig;
use self::fetch::ModelFetch;
use self::worker::{TrainJob, TrainOutput};

/// `zk0-agent run` arguments.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Agent config file (TOML).
    #[arg(long, short, env = "ZK0_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override `client_id`.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Override `broker` (mqtt://host:port).
    #[arg(long)]
    pub broker: Option<String>,
    /// Override `federation`.
    #[arg(long)]
    pub federation: Option<String>,
    /// Override `dataset`: a LeRobot dataset directory, or a Hub repo id (`owner/name`)
    /// already in the local LeRobot cache (`$HF_LEROBOT_HOME`, `$HF_HOME/lerobot`,
    /// `~/.cache/huggingface/lerobot`).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Override `work_dir` (also where `start` puts the pidfile, log and status file).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Override `codec` (f32, bf16, int8, topk:<fraction>).
    #[arg(long)]
    pub codec: Option<String>,
    /// Connect without broker credentials (local demos and tests only).
    #[arg(long)]
    pub insecure: bool,
    /// Exit after taking part in this many rounds (0: run forever).
    #[arg(long, default_value_t = 0)]
    pub max_rounds: u64,
}

/// `zk0-agent keys` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCmd {
    /// Create this agent's ed25519 key pair (`<key>` and `<key>.pub`), refusing to overwrite.
    Init {
        /// Private key file.
        #[arg(long, default_value = "agent.key")]
        key: PathBuf,
    },
    /// Print the public key (PEM) and its fingerprint, for `zk0-aggregator keys enroll`.
    Show {
        #[arg(long, default_value = "agent.key")]
        key: PathBuf,
    },
}

/// Runs a `keys` subcommand.
pub fn keys(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Init { key } => {
            anyhow::ensure!(
                !key.exists(),
                "{} exists; refusing to overwrite a key",
                key.display()
            );
            if let Some(d) = key.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d)?;
            }
            let kp = KeyPair::generate();
            zk0_daemon::keys::save_keypair(&key, &kp)?;
            let pub_path = pub_path(&key);
            zk0_daemon::keys::save_public_key(&pub_path, &kp.public())?;
            println!(
                "wrote {} and {} ({})",
                key.display(),
                pub_path.display(),
                kp.public().fingerprint()
            );
        }
        KeysCmd::Show { key } => {
            let kp = zk0_daemon::keys::load_keypair(&key)?;
            print!("{}", kp.public().to_pem());
            eprintln!("fingerprint {}", kp.public().fingerprint());
        }
    }
    Ok(())
}

fn pub_path(key: &std::path::Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Events the main task reacts to.
enum Incoming {
    Connected,
    /// The MQTT connection failed (the event loop keeps reconnecting).
    Disconnected,
    Publish(String, Vec<u8>),
    Trained(u64, Result<TrainOutput>),
    Encoded(u64, Result<Outbound>),
    /// The upload task of this round published its manifest.
    Uploaded(u64),
}

/// A signed update waiting for its ack.
struct Outbound {
    round: u64,
    deadline_ms: u64,
    /// Shared with the upload task.
    chunks: Arc<Vec<Vec<u8>>>,
    manifest: Vec<u8>,
    /// When the manifest was last sent (0: never): with no answer for [`ACK_WAIT_MS`] it is
    /// sent again, and the aggregator re-acks, names missing chunks or gives its verdict.
    sent_ms: u64,
    /// Chunk resends asked for by the aggregator this round (bounded by [`MAX_RESENDS`]).
    resends: u32,
}

/// How long to wait for an ack before sending the manifest again.
const ACK_WAIT_MS: u64 = 30_000;
/// Resend requests honoured per update: a bound, should the broker keep losing chunks.
const MAX_RESENDS: u32 = 8;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Agent {
    cfg: AgentConfig,
    topics: Topics,
    client: AsyncClient,
    key: Arc<KeyPair>,
    pinned: PublicKey,
    tx: mpsc::UnboundedSender<Incoming>,
    round: Option<RoundAnnouncement>,
    fetch: Option<ModelFetch>,
    /// Round whose worker or encoder is running.
    busy: Option<u64>,
    outbound: Option<Outbound>,
    /// The upload of `outbound` in progress (aborted when a new one starts or the update is
    /// settled).
    upload: Option<tokio::task::JoinHandle<()>>,
    /// Rounds this agent finished (acked, rejected, failed or expired).
    finished: BTreeSet<u64>,
    rounds_done: u64,
    /// What `zk0-agent status` shows, mirrored to `<work_dir>/status.json`.
    status: crate::fleet::AgentStatus,
}

/// Runs the daemon until interrupted (or `--max-rounds` rounds are done).
pub fn run(args: RunArgs) -> Result<()> {
    let mut cfg = AgentConfig::load(args.config.as_deref())?;
    if let Some(v) = args.client_id {
        cfg.client_id = v;
    }
    if let Some(v) = args.broker {
        cfg.broker = v;
    }
    if let Some(v) = args.federation {
        cfg.federation = v;
    }
    if let Some(v) = args.dataset {
        cfg.dataset = v;
    }
    if let Some(v) = args.work_dir {
        cfg.work_dir = v;
    }
    cfg.dataset = config::resolve_dataset(&cfg.dataset);
    if let Some(v) = args.codec {
        cfg.codec = v;
    }
    cfg.insecure |= args.insecure;
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(daemon(cfg, args.max_rounds))
}

/// `mqtt://host:port` or `mqtts://host:port` → (tls, host, port).
fn parse_url(url: &str) -> Result<(bool, String, u16)> {
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
    match rest.rsplit_once(':') {
        Some((h, p)) => Ok((
            tls,
            h.to_string(),
            p.parse().with_context(|| format!("bad port in {url:?}"))?,
        )),
        None => Ok((tls, rest.to_string(), if tls { 8883 } else { 1883 })),
    }
}

/// An mqtts transport trusting only the CA certificates in `ca_pem` (ring provider).
fn tls_transport(ca_pem: &std::path::Path) -> Result<rumqttc_ring::Transport> {
    use rustls_ring::pki_types::pem::PemObject;
    let pem = std::fs::read(ca_pem)
        .with_context(|| format!("reading CA certificate {}", ca_pem.display()))?;
    let mut roots = rustls_ring::RootCertStore::empty();
    for cert in rustls_ring::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.with_context(|| format!("parsing {}", ca_pem.display()))?)?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{} holds no certificate",
        ca_pem.display()
    );
    let provider = Arc::new(rustls_ring::crypto::ring::default_provider());
    let config = rustls_ring::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc_ring::Transport::tls_with_config(
        rumqttc_ring::TlsConfiguration::Rustls(Arc::new(config)),
    ))
}

async fn daemon(cfg: AgentConfig, max_rounds: u64) -> Result<()> {
    let key = zk0_daemon::keys::load_keypair(&cfg.key_file).with_context(|| {
        format!(
            "loading {} (create it with `zk0-agent keys init`)",
            cfg.key_file.display()
        )
    })?;
    let pinned = zk0_daemon::keys::load_public_key(&cfg.aggregator_key).with_context(|| {
        format!(
            "loading the pinned aggregator key {}",
            cfg.aggregator_key.display()
        )
    })?;
    let topics = Topics::new(&cfg.federation)?;
    let (tls, host, port) = parse_url(&cfg.broker)?;
    let mut opts = MqttOptions::new(format!("zk0-agent-{}", cfg.client_id), host, port);
    opts.set_keep_alive(Duration::from_secs(15));
    // rumqttc's default 10 KiB cap cannot carry a model chunk.
    opts.set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes);
    opts.set_clean_session(true);
    if tls {
        opts.set_transport(tls_transport(&cfg.ca_file)?);
    }
    if !cfg.username.is_empty() {
        opts.set_credentials(cfg.username.clone(), cfg.password.clone());
    }
    let offline = status(&cfg, &key, false);
    opts.set_last_will(LastWill::new(
        topics.client_status(&cfg.client_id),
        message::encode(&offline),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let etx = tx.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = etx.send(Incoming::Connected);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = etx.send(Incoming::Publish(p.topic, p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = etx.send(Incoming::Disconnected);
                    tracing::warn!(error = %e, "MQTT connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if etx.is_closed() {
                return;
            }
        }
    });

    let mut agent = Agent {
        cfg,
        topics,
        client,
        key: Arc::new(key),
        pinned,
        tx,
        round: None,
        fetch: None,
        busy: None,
        outbound: None,
        upload: None,
        finished: BTreeSet::new(),
        rounds_done: 0,
        status: crate::fleet::AgentStatus::default(),
    };
    agent.status.client_id = agent.cfg.client_id.clone();
    agent.status.pid = std::process::id();
    agent.status.dataset = agent.cfg.dataset.display().to_string();
    agent.save_status();
    zk0_host::systemd::ready();
    let mut watchdog = tokio::time::interval(
        zk0_host::systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
    );
    // systemd stops services with SIGTERM: say goodbye on the status topic as on Ctrl-C.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tracing::info!(client = %agent.cfg.client_id, broker = %agent.cfg.broker, "agent started");
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { anyhow::bail!("event channel closed") };
                if let Err(e) = agent.handle(ev).await {
                    tracing::error!(error = format!("{e:#}"), "event handling failed");
                }
            }
            _ = tick.tick() => agent.expire().await,
            _ = watchdog.tick() => zk0_host::systemd::watchdog(),
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted");
                break;
            }
            _ = sigterm.recv() => {
                tracing::info!("terminated");
                break;
            }
        }
        if max_rounds > 0 && agent.rounds_done >= max_rounds && agent.outbound.is_none() {
            tracing::info!(rounds = agent.rounds_done, "done");
            break;
        }
    }
    let off = status(&agent.cfg, &agent.key, false);
    let _ = agent
        .client
        .publish(
            agent.topics.client_status(&agent.cfg.client_id),
            QoS::AtLeastOnce,
            true,
            message::encode(&off),
        )
        .await;
    let _ = agent.client.disconnect().await;
    agent.status.connected = false;
    agent.save_status();
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

fn status(cfg: &AgentConfig, key: &KeyPair, online: bool) -> ClientStatus {
    // Only CPU and memory: a full refresh would walk every process on the host.
    let mut sys = sysinfo::System::new();
    sys.refresh_cpu_all();
    sys.refresh_memory();
    let cpu = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .unwrap_or_default();
    ClientStatus {
        v: PROTOCOL_VERSION,
        client_id: cfg.client_id.clone(),
        online,
        dataset: cfg.dataset.display().to_string(),
        examples: cfg.examples,
        hardware: HardwareInfo {
            cpu,
            cores: sys.cpus().len() as u32,
            mem_bytes: sys.total_memory(),
            gpu: None,
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        public_key: key.public().to_compact(),
    }
}

impl Agent {
    /// Rewrites `status.json`; a failure only costs `zk0-agent status` its freshness.
    fn save_status(&mut self) {
        self.status.rounds_done = self.rounds_done;
        self.status.updated_unix_ms = now_ms();
        if let Err(e) = self.status.write(&self.cfg.work_dir) {
            tracing::warn!(error = format!("{e:#}"), "writing the status file");
        }
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

    async fn handle(&mut self, ev: Incoming) -> Result<()> {
        match ev {
            Incoming::Disconnected => {
                if self.status.connected {
                    self.status.connected = false;
                    self.save_status();
                }
            }
            Incoming::Connected => {
                tracing::info!("connected to the broker");
                self.status.connected = true;
                self.save_status();
                let cid = self.cfg.client_id.clone();
                self.client
                    .subscribe(self.topics.round(), QoS::AtLeastOnce)
                    .await?;
                self.client
                    .subscribe(self.topics.acks_for(&cid), QoS::AtLeastOnce)
                    .await?;
                let hello = status(&self.cfg, &self.key, true);
                self.publish(
                    self.topics.client_status(&cid),
                    message::encode(&hello),
                    true,
                )
                .await;
                if let Some(f) = &mut self.fetch {
                    f.reset_inflight();
                    let id = f.model_id.clone();
                    self.client
                        .subscribe(self.topics.model_manifest(&id), QoS::AtLeastOnce)
                        .await?;
                    self.request_chunks().await?;
                }
                // Resend unacknowledged work: the aggregator keeps the chunks it has and
                // overwrites repeats, so resending everything is safe.
                self.send_outbound();
            }
            Incoming::Publish(topic, payload) => match self.topics.parse(&topic) {
                Some(TopicKind::Round) => self.on_round(&payload).await?,
                Some(TopicKind::ModelManifest { model_id }) => {
                    self.on_model_manifest(&model_id, &payload).await?
                }
                Some(TopicKind::ModelChunk { model_id, index }) => {
                    self.on_model_chunk(&model_id, index, &payload).await?
                }
                Some(TopicKind::Ack { client_id, round }) if client_id == self.cfg.client_id => {
                    self.on_ack(round, &payload).await
                }
                _ => {}
            },
            Incoming::Trained(round, res) => {
                self.on_trained(round, res);
                if self.busy.is_none() {
                    self.consider_round().await?;
                }
            }
            Incoming::Uploaded(round) => {
                // The ack wait starts when the manifest went out, not when a slow upload began.
                if let Some(o) = self.outbound.as_mut().filter(|o| o.round == round) {
                    o.sent_ms = now_ms();
                }
            }
            Incoming::Encoded(round, res) => {
                match res {
                    Ok(out) => {
                        tracing::info!(round, chunks = out.chunks.len(), "sending update");
                        self.outbound = Some(out);
                        self.send_outbound();
                    }
                    Err(e) => {
                        tracing::error!(
                            round,
                            error = format!("{e:#}"),
                            "encoding the update failed"
                        );
                        self.finish_round(round);
                    }
                }
                self.busy = None;
                self.consider_round().await?;
            }
        }
        Ok(())
    }

    async fn on_round(&mut self, payload: &[u8]) -> Result<()> {
        if payload.is_empty() {
            return Ok(());
        }
        let ann: RoundAnnouncement =
            match message::decode(payload, message::DEFAULT_MAX_MESSAGE_LEN) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed round announcement ignored");
                    return Ok(());
                }
            };
        if self.status.round != ann.round {
            self.status.round = ann.round;
            self.save_status();
        }
        self.round = Some(ann);
        self.consider_round().await
    }

    /// Takes part in the current announced round if selected and not already done or busy.
    async fn consider_round(&mut self) -> Result<()> {
        let Some(ann) = self.round.clone() else {
            return Ok(());
        };
        let r = ann.round;
        if self.busy.is_some() {
            return Ok(()); // re-considered when the running job ends
        }
        if self.finished.contains(&r)
            || self.busy == Some(r)
            || self.outbound.as_ref().is_some_and(|o| o.round == r)
        {
            return Ok(());
        }
        if ann.deadline_unix_ms <= now_ms() {
            return Ok(());
        }
        if !ann.is_selected(&self.cfg.client_id) {
            tracing::info!(round = r, "not selected this round; waiting");
            return Ok(());
        }
        let codec_ok = ann
            .accepted_codecs
            .iter()
            .any(|c| c.parse::<Codec>().ok() == self.cfg.codec.parse::<Codec>().ok());
        if !codec_ok {
            tracing::error!(round = r, codec = %self.cfg.codec, accepted = ?ann.accepted_codecs, "our codec is not accepted; skipping the round");
            self.finish_round(r);
            return Ok(());
        }
        tracing::info!(round = r, model = %ann.model_id, "round announced");
        if let Some(path) = fetch::cached(&self.cfg.cache_dir, &ann.model_id) {
            self.start_training(ann, path);
        } else if self
            .fetch
            .as_ref()
            .is_none_or(|f| f.model_id != ann.model_id)
        {
            if let Some(old) = self.fetch.take() {
                let _ = self
                    .client
                    .unsubscribe(self.topics.model_manifest(&old.model_id))
                    .await;
            }
            // A global model is never larger than the update cap times a generous factor.
            let max_len = ann.max_update_bytes.saturating_mul(4).max(1 << 30);
            self.fetch = Some(ModelFetch::new(
                ann.model_id.clone(),
                self.cfg.fetch_window,
                max_len,
            ));
            self.client
                .subscribe(self.topics.model_manifest(&ann.model_id), QoS::AtLeastOnce)
                .await?;
        }
        Ok(())
    }

    async fn on_model_manifest(&mut self, model_id: &str, payload: &[u8]) -> Result<()> {
        let Some(f) = self
            .fetch
            .as_mut()
            .filter(|f| f.model_id == model_id && !f.has_manifest())
        else {
            return Ok(());
        };
        if payload.is_empty() {
            return Ok(());
        }
        let m: ModelManifest = match message::decode(payload, message::DEFAULT_MAX_MESSAGE_LEN) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(model = model_id, error = %e, "malformed model manifest");
                return Ok(());
            }
        };
        if let Err(e) = f.on_manifest(m, &self.pinned) {
            tracing::error!(model = model_id, error = %e, "model manifest rejected");
            return Ok(());
        }
        tracing::info!(model = model_id, "downloading the global model");
        self.request_chunks().await
    }

    async fn request_chunks(&mut self) -> Result<()> {
        let Some(f) = self.fetch.as_mut() else {
            return Ok(());
        };
        let id = f.model_id.clone();
        for i in f.wanted() {
            self.client
                .subscribe(self.topics.model_chunk(&id, i), QoS::AtLeastOnce)
                .await?;
        }
        Ok(())
    }

    async fn on_model_chunk(&mut self, model_id: &str, index: u32, payload: &[u8]) -> Result<()> {
        let Some(f) = self.fetch.as_mut().filter(|f| f.model_id == model_id) else {
            return Ok(());
        };
        let was_inflight = f.inflight.contains(&index);
        if let Err(e) = f.insert(index, payload) {
            tracing::warn!(model = model_id, index, error = %e, "bad model chunk");
        }
        if was_inflight {
            let _ = self
                .client
                .unsubscribe(self.topics.model_chunk(model_id, index))
                .await;
        }
        let complete = f.is_complete();
        if !complete {
            return self.request_chunks().await;
        }
        let Some(f) = self.fetch.take() else {
            return Ok(());
        };
        let _ = self
            .client
            .unsubscribe(self.topics.model_manifest(model_id))
            .await;
        match f.finish(&self.cfg.cache_dir) {
            Ok(path) => {
                tracing::info!(model = model_id, path = %path.display(), "global model cached");
                if let Some(ann) = self.round.clone().filter(|a| a.model_id == model_id) {
                    if !self.finished.contains(&ann.round)
                        && self.busy.is_none()
                        && ann.is_selected(&self.cfg.client_id)
                    {
                        self.start_training(ann, path);
                    }
                }
            }
            Err(e) => {
                tracing::error!(model = model_id, error = %e, "model download failed verification")
            }
        }
        Ok(())
    }

    fn start_training(&mut self, ann: RoundAnnouncement, global: PathBuf) {
        if self.busy.is_some() {
            return;
        }
        let round = ann.round;
        self.busy = Some(round);
        let nonempty = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.clone());
        let job = TrainJob {
            command: self.cfg.worker.clone(),
            extra_args: self.cfg.worker_args.clone(),
            model: nonempty(&self.cfg.model_dir),
            tokenizer: nonempty(&self.cfg.tokenizer),
            global,
            dataset: self.cfg.dataset.clone(),
            steps: ann.hyper.local_steps,
            lr: ann.hyper.lr_for(&self.cfg.client_id),
            mu: ann.hyper.mu,
            batch: ann.hyper.batch_size,
            seed: worker::seed_for(&self.cfg.client_id, round),
            output: self.cfg.worker_output,
            out_dir: self.cfg.work_dir.join(format!("round-{round}")),
        };
        tracing::info!(round, steps = job.steps, "training started");
        let tx = self.tx.clone();
        // The worker runs in its own task: the MQTT loop keeps pinging meanwhile.
        tokio::spawn(async move {
            let res = worker::run(&job).await;
            let _ = tx.send(Incoming::Trained(round, res));
        });
    }

    fn on_trained(&mut self, round: u64, res: Result<TrainOutput>) {
        let out = match res {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(
                    round,
                    error = format!("{e:#}"),
                    "training failed; sitting this round out"
                );
                self.busy = None;
                self.finish_round(round);
                return;
            }
        };
        let Some(ann) = self.round.clone().filter(|a| a.round == round) else {
            tracing::warn!(round, "round moved on while training; update dropped");
            self.busy = None;
            self.finish_round(round);
            return;
        };
        tracing::info!(
            round,
            loss = out.metrics.loss,
            "training finished; encoding"
        );
        self.status.trained_round = round;
        self.status.last_loss = Some(out.metrics.loss);
        self.status.last_accepted = None;
        self.save_status();
        let cfg = self.cfg.clone();
        let key = self.key.clone();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let res = encode_update(&cfg, &key, &ann, out);
            let _ = tx.send(Incoming::Encoded(round, res));
        });
    }

    fn send_outbound(&mut self) {
        let Some(o) = &mut self.outbound else { return };
        if o.deadline_ms <= now_ms() {
            return;
        }
        o.sent_ms = now_ms();
        let n = o.chunks.len() as u32;
        self.start_upload((0..n).collect());
    }

    /// Publishes chunks `indices` of the outbound update, then its manifest, in a task (paced
    /// to `upload_max_bytes_per_sec`), replacing any upload still running.
    fn start_upload(&mut self, indices: Vec<u32>) {
        self.stop_upload();
        let Some(o) = &self.outbound else { return };
        let cid = &self.cfg.client_id;
        let round = o.round;
        let up = upload::Upload {
            chunks: indices
                .into_iter()
                .map(|i| (self.topics.update_chunk(cid, round, i), i))
                .collect(),
            data: o.chunks.clone(),
            manifest_topic: self.topics.update_manifest(cid, round),
            manifest: o.manifest.clone(),
        };
        let client = self.client.clone();
        let tx = self.tx.clone();
        let rate = self.cfg.upload_max_bytes_per_sec;
        self.upload = Some(tokio::spawn(async move {
            let bytes = upload::send(up, rate, |topic, payload| {
                let client = client.clone();
                async move {
                    if let Err(e) = client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                        .await
                    {
                        tracing::warn!(%topic, error = %e, "publish failed");
                    }
                }
            })
            .await;
            tracing::debug!(round, bytes, "update published");
            let _ = tx.send(Incoming::Uploaded(round));
        }));
    }

    fn stop_upload(&mut self) {
        if let Some(h) = self.upload.take() {
            h.abort();
        }
    }

    fn uploading(&self) -> bool {
        self.upload.as_ref().is_some_and(|h| !h.is_finished())
    }

    async fn on_ack(&mut self, round: u64, payload: &[u8]) {
        let ack: Ack = match message::decode(payload, message::DEFAULT_MAX_MESSAGE_LEN) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(round, error = %e, "malformed ack");
                return;
            }
        };
        if ack.is_incomplete() {
            self.resend_missing(round, &ack.missing);
            return;
        }
        if ack.accepted {
            tracing::info!(round, "update accepted");
        } else {
            let reason = ack.reason.map(|r| r.as_str()).unwrap_or("unspecified");
            tracing::warn!(round, reason, detail = %ack.detail, "update rejected");
        }
        if self.outbound.as_ref().is_some_and(|o| o.round == round) {
            self.outbound = None;
            self.stop_upload();
            self.finish_round(round);
            self.status.last_accepted = Some(ack.accepted);
            self.save_status();
        }
    }

    fn finish_round(&mut self, round: u64) {
        if self.finished.insert(round) {
            self.rounds_done += 1;
        }
        // Keep the set small: only recent rounds can be re-announced.
        while self.finished.len() > 64 {
            self.finished.pop_first();
        }
    }

    /// Drops an unacknowledged update once its round's deadline passed.
    /// Resends the chunks the aggregator did not get, then the manifest.
    fn resend_missing(&mut self, round: u64, missing: &[u32]) {
        let Some(o) = self.outbound.as_mut().filter(|o| o.round == round) else {
            return;
        };
        if o.resends >= MAX_RESENDS {
            tracing::warn!(
                round,
                "chunks lost again after {MAX_RESENDS} resends; waiting for the deadline"
            );
            return;
        }
        o.resends += 1;
        o.sent_ms = now_ms();
        tracing::info!(round, missing = missing.len(), "resending lost chunks");
        // Indices come from the aggregator; the upload skips any that are not ours.
        self.start_upload(missing.to_vec());
    }

    /// Once a second: drop work past its deadline; send the manifest again when no ack came.
    async fn expire(&mut self) {
        let now = now_ms();
        let uploading = self.uploading();
        if let Some(o) = self.outbound.as_mut().filter(|o| {
            !uploading && o.sent_ms > 0 && o.deadline_ms > now && now - o.sent_ms >= ACK_WAIT_MS
        }) {
            o.sent_ms = now;
            tracing::info!(round = o.round, "no ack yet; sending the manifest again");
            let (topic, manifest) = (
                self.topics.update_manifest(&self.cfg.client_id, o.round),
                o.manifest.clone(),
            );
            self.publish(topic, manifest, false).await;
        }
        if let Some(o) = &self.outbound {
            if o.deadline_ms <= now_ms() {
                tracing::warn!(
                    round = o.round,
                    "deadline passed without an ack; update dropped"
                );
                let r = o.round;
                self.outbound = None;
                self.stop_upload();
                self.finish_round(r);
            }
        }
    }
}

/// Encodes the worker's delta with the configured codec, chunks it and signs the manifest.
fn encode_update(
    cfg: &AgentConfig,
    key: &KeyPair,
    ann: &RoundAnnouncement,
    out: TrainOutput,
) -> Result<Outbound> {
    let delta = out.delta().context("the worker's result")?;
    let codec: Codec = cfg
        .codec
        .parse()
        .map_err(|e| anyhow::anyhow!("codec {:?}: {e}", cfg.codec))?;
    let opts = EncodeOptions {
        codec,
        zstd_level: cfg.zstd_level,
    };
    let blob = encode_delta(&delta, &opts, None).context("encoding the delta")?;
    anyhow::ensure!(
        blob.len() as u64 <= ann.max_update_bytes,
        "encoded update of {} bytes exceeds the round's cap of {}",
        blob.len(),
        ann.max_update_bytes
    );
    let chunk_size = (ann.chunk_size as usize).max(1);
    let chunks: Vec<Vec<u8>> = shared_proto::chunk::split(&blob, chunk_size)
        .map(|c| c.to_vec())
        .collect();
    let m = &out.metrics;
    let examples = if cfg.examples > 0 {
        cfg.examples
    } else {
        m.examples.max(1)
    };
    let mut manifest = UpdateManifest {
        v: PROTOCOL_VERSION,
        client_id: cfg.client_id.clone(),
        round: ann.round,
        base_model_id: ann.model_id.clone(),
        codec: codec.to_string(),
        total_len: blob.len() as u64,
        chunk_count: chunks.len() as u32,
        chunk_size: chunk_size as u32,
        sha256: shared_proto::hash::sha256_hex(&blob),
        examples,
        metrics: ClientMetrics {
            loss: m.loss,
            fedprox_loss: m.fedprox_loss,
            grad_norm: m.grad_norm,
            update_norm: m.update_norm,
            steps: m.steps,
            seconds: m.seconds,
        },
        signature: Vec::new(),
    };
    manifest.sign_with(key);
    Ok(Outbound {
        round: ann.round,
        deadline_ms: ann.deadline_unix_ms,
        chunks: Arc::new(chunks),
        manifest: message::encode(&manifest),
        sent_ms: 0,
        resends: 0,
    })
}
