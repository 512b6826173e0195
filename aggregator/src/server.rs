//! The aggregator's event loop. It owns the state and carries out what the pure cores decide:
//! [`intake`](crate::intake) verdicts (spool, ask for chunks, verify, ack), round transitions
//! ([`round`](crate::round)) and the messages [`publish`](crate::publish) builds. Long work,
//! a blob's verification and a round's close ([`close`](crate::close)), runs as jobs beside
//! the loop and comes back as [`Job`] events; the MQTT inbox is bounded (`zk0_daemon::mqtt`),
//! so nothing queues without limit while it runs.
//!
//! `server/start.rs` boots it (state, broker, connection, resumed uploads);
//! `server/uploads.rs` carries out the intake's verdicts on chunks and manifests, verifies and
//! accepts; `server/closing.rs` completes a closed round and holds every publish;
//! `server/control.rs` checks client statuses and restores the aggregator's retained topics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use bytes::Bytes;
use rumqttc_ring::{AsyncClient, LastWill, QoS};
use shared_proto::message::{self, ClientStatus, Freshness, ModelManifest, UpdateManifest};
use shared_proto::sign::KeyPair;
use shared_proto::tensor::ModelSpec;
use shared_proto::topic::{TopicKind, Topics};
use tokio::sync::mpsc;
use zk0_daemon::mqtt::{self, Incoming, Sequence, Shedding};
use zk0_daemon::{now_ms, Lifecycle};

use crate::broker::ModelLink;
use crate::close::{self, CloseJob, Closed};
use crate::config::Config;
use crate::intake::{Keys, UploadTable, MAX_MESSAGE_BYTES};
use crate::metrics::{self, Metrics};
use crate::model_file::ModelFile;
use crate::outputs::Outputs as OutputFiles;
use crate::publish::{self, Outgoing};
use crate::round::{CloseReason, Phase, RoundState, Transition};
use crate::spool;
use crate::store::Store;
use crate::verify::{Limits, Rejection, Verified};
use crate::{aggregate, checkpoint};

/// The intake's view of the loop's state ([`Gate`]), borrowed field by field so the upload
/// table beside it stays mutable.
macro_rules! gate {
    ($srv:expr) => {
        $crate::intake::Gate {
            state: &$srv.state,
            keys: &$srv.keys,
            limits: &$srv.limits,
            federation: &$srv.cfg.federation,
        }
    };
}

mod closing;
mod control;
mod start;
mod uploads;

/// A job's result, back on the event loop.
#[derive(Debug)]
pub enum Job {
    Verified {
        cid: String,
        round: u64,
        manifest: UpdateManifest,
        result: std::result::Result<Verified, Rejection>,
    },
    Closed(Result<Closed>),
}

struct Server {
    cfg: Arc<Config>,
    limits: Limits,
    store: Store,
    state: RoundState,
    signer: KeyPair,
    metrics: Arc<Metrics>,
    topics: Topics,
    client: AsyncClient,
    jobs: mpsc::Sender<Job>,
    online: BTreeSet<String>,
    /// The newest signed status of each client: an older one (a replay) is dropped.
    statuses: BTreeMap<String, Freshness>,
    /// Sequence numbers of the announcements and acks this aggregator signs.
    seq: Sequence,
    /// The current broker connection's session (its will carries the same number).
    session: u64,
    /// The retained announcement and status last published, to restore them should anyone
    /// else overwrite them (a broker without ACLs lets any login publish there).
    announced: Option<Bytes>,
    status_sent: Option<Bytes>,
    /// The dataset each client says it trains on (its retained status), for the round records
    /// when the federation config does not name one.
    reported_datasets: BTreeMap<String, String>,
    /// The dataset size each enrolled client reports (when it does): an update may not claim
    /// more examples.
    reported_examples: BTreeMap<String, u64>,
    uploads: UploadTable,
    spec: Arc<ModelSpec>,
    /// Enrolled keys, re-read when `keys.json` changes (so `keys enroll|revoke` apply live).
    keys: Keys,
    keys_mtime: Option<SystemTime>,
    /// Model id and chunk count whose retained messages are currently published.
    published: Option<(String, u32)>,
    /// That model's file, mapped: its chunks are slices of it wherever they wait (broker,
    /// client queue, outputs), and its touched pages are trimmed on every tick.
    model_file: Option<ModelFile>,
    /// The embedded broker's in-process link, which carries the model's retained messages;
    /// `None` with an external broker (they go over the MQTT connection then).
    model_link: Option<ModelLink>,
    /// That model's signed manifest (decoded, and as published), to put back what someone
    /// else publishes on its topics.
    model_manifest: Option<(ModelManifest, Bytes)>,
    /// Base LeRobot checkpoint the global tensors apply to (server eval, checkpoints).
    base_dir: Option<PathBuf>,
    /// A close job is running; with the reason the round closed for.
    closing: Option<Option<CloseReason>>,
    /// The last round's outputs being written (one at a time, awaited before exit).
    outputs: Option<tokio::task::JoinHandle<()>>,
    done: bool,
}

/// Runs the daemon until SIGTERM / Ctrl-C (or, with `exit_when_done`, until the last round
/// is published and its outputs written).
pub async fn run(cfg: Config, store: Store, exit_when_done: bool) -> Result<()> {
    let (jobs_tx, mut jobs) = mpsc::channel(16);
    let (mut srv, mut inbox) = Server::start(cfg, store, jobs_tx).await?;
    let mut life = Lifecycle::start()?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let r = tokio::select! {
            stop = life.stopped() => {
                tracing::info!(?stop, "stopping; state is persisted");
                srv.stop().await;
                return Ok(());
            }
            ev = inbox.recv() => match ev {
                Some(ev) => srv.handle(ev).await,
                None => anyhow::bail!("MQTT event loop ended"),
            },
            Some(job) = jobs.recv() => srv.on_job(job).await,
            _ = tick.tick() => {
                srv.trim_model();
                srv.refresh_keys()
            }
        };
        if let Err(e) = r {
            tracing::error!(error = format!("{e:#}"), "event handling failed");
        }
        if let Err(e) = srv.advance().await {
            tracing::error!(error = format!("{e:#}"), "round step failed");
        }
        if srv.done && exit_when_done && srv.closing.is_none() {
            srv.stop().await;
            // Give the MQTT task a moment to flush the last publishes.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        }
    }
}

impl Server {
    async fn handle(&mut self, ev: Incoming) -> Result<()> {
        let (topic, payload) = match ev {
            Incoming::Publish { topic, payload } => (topic, payload),
            Incoming::Disconnected => return Ok(()),
            Incoming::Connected { session } => {
                self.session = session;
                return self.on_connected().await;
            }
        };
        match self.topics.parse(&topic) {
            Some(TopicKind::ClientStatus { client_id }) => {
                self.on_client_status(&client_id, &payload).await
            }
            Some(TopicKind::UpdateChunk {
                client_id,
                round,
                index,
            }) => self.on_chunk(&client_id, round, index, payload).await,
            Some(TopicKind::UpdateManifest { client_id, round }) => {
                self.on_manifest(&client_id, round, &payload).await
            }
            Some(TopicKind::Round) => {
                let ours = self.announced.clone();
                self.restore(self.topics.round(), ours, &payload).await;
                Ok(())
            }
            Some(TopicKind::ModelManifest { model_id }) => {
                self.guard_model(&model_id, None, &payload).await
            }
            Some(TopicKind::ModelChunk { model_id, index }) => {
                self.guard_model(&model_id, Some(index), &payload).await
            }
            Some(TopicKind::ServerStatus) => {
                let ours = self.status_sent.clone();
                self.restore(self.topics.server_status(), ours, &payload)
                    .await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn on_connected(&mut self) -> Result<()> {
        tracing::info!("connected to the broker");
        self.client
            .subscribe(self.topics.all_client_status(), QoS::AtLeastOnce)
            .await?;
        self.client
            .subscribe(self.topics.all_updates(), QoS::AtLeastOnce)
            .await?;
        // Our own retained topics: to notice when someone else overwrites them.
        for t in [self.topics.round(), self.topics.server_status()] {
            self.client.subscribe(t, QoS::AtLeastOnce).await?;
        }
        self.publish_status(true).await;
        // Retained messages do not survive an embedded-broker restart: publish again.
        self.published = None;
        self.publish_model().await?;
        if matches!(self.state.phase, Phase::Collecting { .. }) {
            self.announce().await;
        }
        Ok(())
    }

    async fn on_job(&mut self, job: Job) -> Result<()> {
        match job {
            Job::Verified {
                cid,
                round,
                manifest,
                result,
            } => self.on_verified(cid, round, manifest, result).await,
            Job::Closed(r) => {
                let reason = self.closing.take().flatten();
                self.on_closed(r?, reason).await
            }
        }
    }

    /// Runs the round machine until it has nothing more to do right now.
    async fn advance(&mut self) -> Result<()> {
        let cfg = self.cfg.round_config();
        while self.closing.is_none() {
            let Some(t) = self.state.tick(&cfg, &self.online, now_ms()) else {
                // Also an aggregation interrupted by a crash, redone on restart.
                if let Phase::Aggregating { .. } = self.state.phase {
                    self.start_close(None);
                }
                return Ok(());
            };
            self.store.save_state(&self.state)?;
            match t {
                Transition::Announce | Transition::Reannounce => {
                    self.uploads.clear();
                    self.metrics.current_round.set(self.state.round as i64);
                    tracing::info!(round = self.state.round, selected = ?self.state.selected, "round announced");
                    self.announce().await;
                }
                Transition::Close { reason, dropped } => {
                    tracing::info!(round = self.state.round, ?reason, ?dropped, accepted = ?self.state.accepted.keys().collect::<Vec<_>>(), "round closed");
                    self.start_close(Some(reason));
                }
                Transition::Finish => {
                    tracing::info!(rounds = self.state.round - 1, "all rounds done");
                    self.done = true;
                    self.publish_status(true).await;
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
