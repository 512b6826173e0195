//! The aggregator's event loop. It owns the state and carries out what the pure cores decide:
//! [`intake`](crate::intake) verdicts (spool, ask for chunks, verify, ack), round transitions
//! ([`round`](crate::round)) and the messages [`publish`](crate::publish) builds. Long work,
//! a blob's verification and a round's close ([`close`](crate::close)), runs as jobs beside
//! the loop and comes back as [`Job`] events; the MQTT inbox is bounded (`zk0_daemon::mqtt`),
//! so nothing queues without limit while it runs.
//!
//! `server/start.rs` boots it (state, broker, connection, resumed uploads); `server/closing.rs`
//! completes a closed round and holds every publish.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use bytes::Bytes;
use rumqttc_ring::{AsyncClient, LastWill, QoS};
use shared_proto::message::{self, Ack, ClientStatus, UpdateManifest};
use shared_proto::sign::KeyPair;
use shared_proto::tensor::ModelSpec;
use shared_proto::topic::{TopicKind, Topics};
use tokio::sync::mpsc;
use zk0_daemon::mqtt::{self, Incoming, Shedding};
use zk0_daemon::{now_ms, write_atomic, Durability::Durable, Lifecycle};

use crate::close::{self, CloseJob, Closed};
use crate::config::Config;
use crate::intake::{ChunkVerdict, Keys, ManifestVerdict, Stored, UploadTable, MAX_MESSAGE_BYTES};
use crate::metrics::{self, Metrics};
use crate::outputs::Outputs as OutputFiles;
use crate::publish::{self, Outgoing};
use crate::round::{CloseReason, Phase, RoundState, Transition};
use crate::spool;
use crate::store::Store;
use crate::verify::{check_weight, verify_update, Limits, Rejection, Verified};
use crate::{aggregate, checkpoint};

mod closing;
mod start;

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
            _ = tick.tick() => srv.refresh_keys(),
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
            Incoming::Connected => return self.on_connected().await,
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
        self.publish_status(true).await;
        // Retained messages do not survive an embedded-broker restart: publish again.
        self.published = None;
        self.publish_model(None).await?;
        if matches!(self.state.phase, Phase::Collecting { .. }) {
            self.announce().await;
        }
        Ok(())
    }

    async fn on_client_status(&mut self, cid: &str, payload: &[u8]) -> Result<()> {
        self.refresh_keys()?;
        let enrolled = self.keys.is_enrolled(cid);
        let status = (!payload.is_empty())
            .then(|| message::decode::<ClientStatus>(payload, MAX_MESSAGE_BYTES))
            .transpose()
            .unwrap_or_else(|e| {
                tracing::warn!(client = cid, error = %e, "malformed client status");
                None
            })
            .filter(|s| s.client_id == cid);
        if let Some(s) = status
            .as_ref()
            .filter(|s| enrolled && !s.dataset.is_empty())
        {
            self.reported_datasets
                .insert(cid.to_string(), s.dataset.clone());
        }
        if let Some(s) = status.as_ref().filter(|s| enrolled && s.examples > 0) {
            self.reported_examples.insert(cid.to_string(), s.examples);
        }
        let online = status.is_some_and(|s| s.online);
        if online && !enrolled {
            tracing::warn!(
                client = cid,
                "client online but not enrolled; ignored (zk0-aggregator keys enroll)"
            );
        }
        let changed = if online && enrolled {
            self.online.insert(cid.to_string())
        } else {
            self.online.remove(cid)
        };
        if changed {
            tracing::info!(client = cid, online, "client status");
            self.metrics.connected_clients.set(self.online.len() as i64);
            let cfg = self.cfg.round_config();
            if online && self.state.join_late(&cfg, cid) == Some(Transition::Reannounce) {
                self.store.save_state(&self.state)?;
                self.announce().await;
            }
        }
        Ok(())
    }

    async fn on_chunk(&mut self, cid: &str, round: u64, index: u32, payload: Bytes) -> Result<()> {
        self.metrics.update_bytes.inc_by(payload.len() as u64);
        let verdict = self.uploads.on_chunk(
            &self.state,
            &self.keys,
            &self.limits,
            cid,
            round,
            index,
            payload.len(),
        );
        match verdict {
            ChunkVerdict::Spool { offset } => {
                spool::write_chunk(&self.store, round, cid, index, offset, &payload)?;
                if let Stored::ReadyToVerify(m) =
                    self.uploads.stored(cid, round, index, payload.len())
                {
                    self.start_verify(*m);
                }
            }
            ChunkVerdict::Ignore(why) => self.metrics.chunk_refused(why.as_str()),
            ChunkVerdict::Reject(r) => {
                spool::discard(&self.store, round, cid);
                self.reject(cid, round, r).await;
            }
        }
        Ok(())
    }

    async fn on_manifest(&mut self, cid: &str, round: u64, payload: &[u8]) -> Result<()> {
        self.refresh_keys()?;
        let verdict =
            self.uploads
                .on_manifest(&self.state, &self.keys, &self.limits, cid, round, payload);
        match verdict {
            ManifestVerdict::Reack => {
                self.send(publish::ack(&self.topics, &Ack::accepted(cid, round)))
                    .await
            }
            ManifestVerdict::Reject(r) => self.reject(cid, round, r).await,
            ManifestVerdict::Discard(r) => {
                spool::discard(&self.store, round, cid);
                self.reject(cid, round, r).await;
            }
            ManifestVerdict::AskMissing(missing) => {
                tracing::info!(
                    client = cid,
                    round,
                    missing = missing.len(),
                    "asking for missing chunks"
                );
                self.metrics.chunks_requested.inc_by(missing.len() as u64);
                let ack = Ack::incomplete(cid, round, missing);
                self.send(publish::ack(&self.topics, &ack)).await;
            }
            ManifestVerdict::ReadyToVerify(m) => self.start_verify(m),
            ManifestVerdict::Verifying => {}
        }
        Ok(())
    }

    /// Reads and verifies the upload's blob on a blocking thread; the verdict comes back as
    /// [`Job::Verified`].
    fn start_verify(&self, manifest: UpdateManifest) {
        let (store, spec, limits, jobs) = (
            self.store.clone(),
            self.spec.clone(),
            self.limits.clone(),
            self.jobs.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let (cid, round) = (manifest.client_id.clone(), manifest.round);
            let result = spool::read_blob(&store, round, &cid, manifest.total_len)
                .map_err(|e| Rejection::new(shared_proto::RejectReason::Internal, format!("{e:#}")))
                .and_then(|blob| verify_update(&manifest, &blob, &spec, &limits));
            let _ = jobs.blocking_send(Job::Verified {
                cid,
                round,
                manifest,
                result,
            });
        });
    }

    async fn on_job(&mut self, job: Job) -> Result<()> {
        match job {
            Job::Verified {
                cid,
                round,
                manifest,
                result,
            } => {
                // The round may have closed while the blob was being verified.
                let result = result.and_then(|v| match self.state.admit(&cid, round) {
                    Ok(()) => Ok(v),
                    Err(_) => Err(Rejection::new(
                        shared_proto::RejectReason::LateOrOldRound,
                        format!("round {round} closed while the update was verified"),
                    )),
                });
                // No more examples than the dataset the client reported (the loop holds that).
                let reported = self.reported_examples.get(&cid).copied();
                let result = result
                    .and_then(|v| check_weight(&manifest, &self.limits, reported).map(|()| v));
                match result {
                    Ok(v) => self.accept(&cid, round, &manifest, &v).await,
                    Err(r) => {
                        self.uploads.refused(&cid, round);
                        spool::discard(&self.store, round, &cid);
                        self.reject(&cid, round, r).await;
                        Ok(())
                    }
                }
            }
            Job::Closed(r) => {
                let reason = self.closing.take().flatten();
                self.on_closed(r?, reason).await
            }
        }
    }

    async fn accept(
        &mut self,
        cid: &str,
        round: u64,
        m: &UpdateManifest,
        v: &Verified,
    ) -> Result<()> {
        spool::accept(&self.store, round, cid, m.total_len)?;
        self.state.record(cid, v.record(m));
        self.store.save_state(&self.state)?;
        self.uploads.accepted(cid);
        self.metrics.updates_accepted.inc();
        tracing::info!(client = cid, round, examples = m.examples, bytes = m.total_len, codec = %m.codec, "update accepted");
        self.send(publish::ack(&self.topics, &Ack::accepted(cid, round)))
            .await;
        Ok(())
    }

    async fn reject(&self, cid: &str, round: u64, r: Rejection) {
        tracing::warn!(client = cid, round, reason = r.reason.as_str(), detail = %r.detail, "update rejected");
        self.metrics.reject(r.reason.as_str());
        let ack = Ack::rejected(cid, round, r.reason, r.detail);
        self.send(publish::ack(&self.topics, &ack)).await;
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
