//! `zk0-agent run`: the federated-learning daemon of a robot host.
//!
//! Hello + last will on `client/<cid>/status`; follow the retained `round`; fetch the global
//! model by id (cache, hash, pinned aggregator signature); run the training worker in its own
//! task so MQTT keep-alive never waits on training; encode, sign and send the delta as chunks
//! then a manifest; resend after a reconnect until acked or the deadline passes.
//!
//! Layout (thin-edge style: the domain logic is a converter, the loop only executes):
//! - [`core`]: the state machine, `Core::on(Event, now) -> Vec<Command>`, no I/O but the
//!   model cache;
//! - this file: the event loop, which turns MQTT traffic and finished jobs into events and
//!   executes the core's commands (subscribe, publish, spawn the worker, upload, status file);
//! - [`fetch`] (model download state), [`worker`] (the trainer child process), [`export`]
//!   (the ONNX export of each new global model, with `[infer] follow_global`), [`outbound`]
//!   (encoding and signing an update), [`upload`] (publishing it, paced to
//!   `upload_max_bytes_per_sec`), [`config`] (TOML); the MQTT connection (bounded inbox),
//!   signals and systemd READY/watchdog come from `zk0_daemon`, shared with the aggregator.

pub mod config;
pub mod core;
pub mod export;
pub mod fetch;
pub mod outbound;
pub mod upload;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc_ring::{AsyncClient, QoS};
use shared_proto::message::{ClientStatus, HardwareInfo, PROTOCOL_VERSION};
use shared_proto::sign::KeyPair;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::config::AgentConfig;
use self::core::{Command, Core, Event};
use zk0_daemon::mqtt::{Incoming, Settings, Shedding};
use zk0_daemon::{now_ms, BrokerUrl, Lifecycle};

/// Runs the daemon until interrupted (or `max_rounds` rounds are done; 0: forever).
pub fn run(cfg: AgentConfig, max_rounds: u64) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(daemon(cfg, max_rounds))
}

/// What this host reports in its status message, read once at start (`nvidia-smi` is slow);
/// the core sets the session and signs it.
fn hello(cfg: &AgentConfig, key: &KeyPair) -> ClientStatus {
    let host = zk0_host::host();
    let gpu = zk0_host::gpu().map(|g| match g.memory_bytes {
        Some(b) => format!("{} ({} GiB)", g.name, b >> 30),
        None => g.name,
    });
    ClientStatus {
        v: PROTOCOL_VERSION,
        federation: cfg.federation.clone(),
        session: 0,
        client_id: cfg.client_id.clone(),
        online: true,
        dataset: cfg.dataset.display().to_string(),
        examples: cfg.examples,
        hardware: HardwareInfo {
            cpu: host.cpu,
            cores: host.cores as u32,
            mem_bytes: zk0_host::memory().total_bytes,
            gpu,
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        public_key: key.public().to_compact(),
        signature: Vec::new(),
    }
}

/// Runs the core's commands: owns the MQTT client, the running upload and the job tasks.
struct Executor {
    cfg: Arc<AgentConfig>,
    key: Arc<KeyPair>,
    client: AsyncClient,
    /// Where job tasks report (training, encoding, upload).
    jobs: mpsc::UnboundedSender<Event>,
    upload: Option<JoinHandle<()>>,
}

impl Executor {
    async fn execute(&mut self, cmds: Vec<Command>) {
        for cmd in cmds {
            self.execute_one(cmd).await;
        }
    }

    async fn execute_one(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe(topic) => {
                if let Err(e) = self.client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                    tracing::warn!(%topic, error = %e, "subscribe failed");
                }
            }
            Command::Unsubscribe(topic) => {
                let _ = self.client.unsubscribe(topic).await;
            }
            Command::Publish {
                topic,
                payload,
                retain,
            } => {
                if let Err(e) = self
                    .client
                    .publish_bytes(topic.clone(), QoS::AtLeastOnce, retain, payload)
                    .await
                {
                    tracing::warn!(%topic, error = %e, "publish failed");
                }
            }
            Command::SpawnTraining {
                round,
                job,
                timeout_ms,
            } => {
                let tx = self.jobs.clone();
                // The worker runs in its own task: the MQTT loop keeps pinging meanwhile.
                // On timeout the run's future is dropped, which kills the child.
                tokio::spawn(async move {
                    let limit = Duration::from_millis(timeout_ms);
                    let ev = match tokio::time::timeout(limit, worker::run(&job)).await {
                        Ok(Ok(out)) => Event::Trained { round, out },
                        Ok(Err(e)) => Event::WorkerFailed {
                            round,
                            error: format!("{e:#}"),
                            timed_out: false,
                        },
                        Err(_) => Event::WorkerFailed {
                            round,
                            error: format!("the worker ran past {limit:?} and was killed"),
                            timed_out: true,
                        },
                    };
                    let _ = tx.send(ev);
                });
            }
            Command::SpawnEncode { round, ann, out } => {
                let (cfg, key, tx) = (self.cfg.clone(), self.key.clone(), self.jobs.clone());
                tokio::task::spawn_blocking(move || {
                    let ev = match outbound::encode_update(&cfg, &key, &ann, out) {
                        Ok(out) => Event::Encoded { round, out },
                        Err(e) => Event::WorkerFailed {
                            round,
                            error: format!("encoding the update: {e:#}"),
                            timed_out: false,
                        },
                    };
                    let _ = tx.send(ev);
                });
            }
            Command::StartUpload(up) => self.start_upload(up),
            Command::StopUpload => {
                if let Some(h) = self.upload.take() {
                    h.abort();
                }
            }
            Command::SpawnExport {
                model_id,
                round,
                model,
                weights,
            } => {
                let job = export_job(&self.cfg, model_id.clone(), round, model, weights);
                let tx = self.jobs.clone();
                // Its own task: a slow export never holds up the loop; the timeout kills it.
                tokio::spawn(async move {
                    let result = export::run(&job).await.map_err(|e| e.to_string());
                    let _ = tx.send(Event::Exported { model_id, result });
                });
            }
            Command::SaveStatus(st) => {
                // A failure only costs `zk0-agent status` its freshness.
                if let Err(e) = st.write(&self.cfg.work_dir) {
                    tracing::warn!(error = format!("{e:#}"), "writing the status file");
                }
            }
        }
    }

    /// Publishes `up` in a task (paced to `upload_max_bytes_per_sec`), replacing any upload
    /// still running.
    fn start_upload(&mut self, up: upload::Upload) {
        if let Some(h) = self.upload.take() {
            h.abort();
        }
        let (client, tx) = (self.client.clone(), self.jobs.clone());
        let rate = self.cfg.upload_max_bytes_per_sec;
        self.upload = Some(tokio::spawn(async move {
            let (round, upload_id) = (up.round, up.id);
            let bytes = upload::send(up, rate, |topic, payload| {
                let client = client.clone();
                async move {
                    if let Err(e) = client
                        .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload)
                        .await
                    {
                        tracing::warn!(%topic, error = %e, "publish failed");
                    }
                }
            })
            .await;
            tracing::debug!(round, bytes, "update published");
            let _ = tx.send(Event::Uploaded { round, upload_id });
        }));
    }
}

/// The export of `model_id`: `[infer] export_command`, else the worker's program with
/// `export-onnx`; the tokenizer training uses.
fn export_job(
    cfg: &AgentConfig,
    model_id: String,
    round: u64,
    model: std::path::PathBuf,
    global: std::path::PathBuf,
) -> export::ExportJob {
    let command = if cfg.infer.export_command.is_empty() {
        let program = cfg.worker.first().cloned().unwrap_or_default();
        vec![program, "export-onnx".into()]
    } else {
        cfg.infer.export_command.clone()
    };
    export::ExportJob {
        command,
        model,
        tokenizer: (!cfg.tokenizer.as_os_str().is_empty()).then(|| cfg.tokenizer.clone()),
        global,
        model_id,
        round,
        exports: export::exports_dir(&cfg.work_dir),
        timeout: Duration::from_secs(cfg.infer.export_timeout_secs.max(1)),
    }
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
    let hello = hello(&cfg, &key);
    // The last run's status file: the newest announcement it acted on stays the floor.
    let previous = crate::fleet::AgentStatus::read(&cfg.work_dir)
        .ok()
        .flatten();
    // The export the last run left current is not made again.
    let exported = export::read_current(&export::exports_dir(&cfg.work_dir))
        .ok()
        .flatten()
        .map(|c| c.model_id);
    let mut core = Core::new(cfg.clone(), pinned, key.clone(), hello, previous.as_ref())?
        .with_exported(exported);
    let mut settings = Settings::new(
        zk0_daemon::mqtt::agent_client_id(&cfg.client_id),
        BrokerUrl::parse(&cfg.broker)?,
    );
    settings.ca_file = cfg.ca_file.clone();
    if !cfg.cert_file.as_os_str().is_empty() {
        settings.client_cert = Some((cfg.cert_file.clone(), cfg.cert_key_file.clone()));
    }
    settings.max_packet_bytes = cfg.max_packet_bytes;
    if !cfg.username.is_empty() {
        settings.credentials = Some((cfg.username.clone(), cfg.password.clone()));
    }
    // Each connection's will is the offline status of that session, signed.
    let will_core = core.will_maker();
    settings.last_will = Some(zk0_daemon::mqtt::WillFn::new(move |session| {
        let (topic, payload) = will_core(session);
        rumqttc_ring::LastWill::new(topic, payload, QoS::AtLeastOnce, true)
    }));
    // Nothing the agent receives is shed: model chunks are few and it asks for them in
    // windows, so a full inbox only slows the connection task down (back-pressure).
    let (client, mut mqtt) = zk0_daemon::mqtt::connect(settings, Shedding::never())?;
    let (jobs, mut job_rx) = mpsc::unbounded_channel();
    let mut exec = Executor {
        cfg: Arc::new(cfg),
        key: Arc::new(key),
        client,
        jobs,
        upload: None,
    };
    exec.execute(core.start(now_ms())).await;
    // SIGTERM (systemd) and Ctrl-C both say goodbye on the status topic.
    let mut life = Lifecycle::start()?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tracing::info!(client = %exec.cfg.client_id, broker = %exec.cfg.broker, "agent started");
    loop {
        let ev = tokio::select! {
            m = mqtt.recv() => match m.context("the MQTT task ended")? {
                Incoming::Connected { session } => Some(Event::Connected { session }),
                Incoming::Disconnected => Some(Event::Disconnected),
                Incoming::Publish { topic, payload } => {
                    Event::from_publish(core.topics(), core.client_id(), &topic, payload)
                }
            },
            ev = job_rx.recv() => ev,
            _ = tick.tick() => Some(Event::Tick),
            stop = life.stopped() => {
                tracing::info!(?stop, "stopping");
                break;
            }
        };
        if let Some(ev) = ev {
            let cmds = core.on(ev, now_ms());
            exec.execute(cmds).await;
        }
        if core.is_done(max_rounds) {
            tracing::info!(rounds = core.rounds_done(), "done");
            break;
        }
    }
    exec.execute(core.stop(now_ms())).await;
    let _ = exec.client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}
