//! Closing a round: fold the accepted updates into the next global model, evaluate it, and
//! write the run's outputs. All of it runs beside the event loop (a task and blocking
//! threads), so intake, keep-alive and the metrics stay responsive however long it takes.
//!
//! [`CloseJob::run`] makes the new model (and its server evaluation) from owned inputs; the
//! event loop then completes the round state and publishes; [`Outputs::run`] writes round
//! records, plots and checkpoints afterwards.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use shared_proto::codec::decode_delta_each;
use shared_proto::tensor::{read_safetensors, ModelSpec};

use crate::aggregate::{self, ServerStep};
use crate::checkpoint;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outputs::{self, PolicyLossPoint, RoundRecord, ServerEval};
use crate::plots;
use crate::round::{RoundState, RoundSummary, UpdateRecord};
use crate::server_eval;
use crate::store::Store;

/// A server evaluation's outcome: `None` when not due this round, `Some(Err)` when it failed
/// (logged and counted; the federation goes on).
pub type EvalOutcome = Option<std::result::Result<ServerEval, String>>;

/// Everything a round close needs, owned.
#[derive(Debug, Clone)]
pub struct CloseJob {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub spec: Arc<ModelSpec>,
    pub metrics: Arc<Metrics>,
    pub base_dir: Option<PathBuf>,
    pub round: u64,
    pub model_id: String,
    pub accepted: BTreeMap<String, UpdateRecord>,
}

/// The new global model, saved, with its bytes for publishing.
#[derive(Debug)]
pub struct Closed {
    pub model_id: String,
    pub model: Bytes,
    pub server_eval: EvalOutcome,
}

impl CloseJob {
    /// Aggregates (on a blocking thread), then evaluates (a child process). Server evaluation
    /// comes before the round is marked complete: a crash during it redoes the round, so the
    /// evaluation is never lost.
    pub async fn run(self) -> Result<Closed> {
        let job = self.clone();
        let (model_id, model) = tokio::task::spawn_blocking(move || {
            aggregate_round(
                &job.store,
                &job.spec,
                &job.model_id,
                job.round,
                &job.accepted,
                job.cfg.rounds.server_lr,
            )
        })
        .await
        .context("aggregation task")??;
        let server_eval = server_eval(&self, self.round, &model_id).await;
        Ok(Closed {
            model_id,
            model: Bytes::from(model),
            server_eval,
        })
    }
}

/// `global += server_lr · Σ wᵢΔᵢ / Σ wᵢ` over the accepted blobs, read one at a time in
/// sorted client order and folded tensor by tensor as each is decoded: peak memory is the
/// global model plus one update's blob, and the result does not depend on arrival order.
/// Returns the new model's id and bytes (already saved).
pub fn aggregate_round(
    store: &Store,
    spec: &ModelSpec,
    model_id: &str,
    round: u64,
    accepted: &BTreeMap<String, UpdateRecord>,
    server_lr: f64,
) -> Result<(String, Vec<u8>)> {
    let (_, mut global) = aggregate::load_model(store, model_id)?;
    let max_decoded = spec.f32_bytes().saturating_add(1 << 20);
    let total: f64 = accepted.values().map(|r| r.examples as f64).sum();
    let mut step = ServerStep::new(&mut global, total, server_lr)?;
    for (cid, rec) in accepted {
        let path = store.accepted_path(round, cid);
        let blob = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        decode_delta_each(&blob, spec, max_decoded, |name, _, delta| {
            step.add_tensor(rec.examples as f64, name, &delta)
        })
        .with_context(|| format!("decoding {}", path.display()))?;
    }
    aggregate::save_model(store, &global)
}

/// Evaluates model `model_id` on the held-out dataset when round `round` is due (round 0: the
/// initial model), and records its policy loss.
pub async fn server_eval(job: &CloseJob, round: u64, model_id: &str) -> EvalOutcome {
    let cfg = &job.cfg;
    let o = &cfg.outputs;
    let due = if round == 0 {
        o.eval.initial && !o.eval.dataset.is_empty()
    } else {
        o.eval_due(round, cfg.rounds.rounds)
    };
    if !due {
        return None;
    }
    let Some(base) = job.base_dir.as_deref() else {
        job.metrics.server_eval_failures.inc();
        return Some(Err(format!(
            "no base checkpoint directory for {:?} (set outputs.base_model_dir)",
            cfg.rounds.base_model
        )));
    };
    tracing::info!(round, model = %model_id, dataset = %o.eval.dataset, "server evaluation");
    let scratch = job.store.dir.join("eval");
    let model_path = job.store.model_path(model_id);
    match server_eval::evaluate(&o.eval, base, &model_path, model_id, &scratch).await {
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
            let outputs = outputs::Outputs::new(&job.store);
            if let Err(err) = outputs.record_policy_loss(&e.dataset, point) {
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
            job.metrics.server_eval_failures.inc();
            Some(Err(msg))
        }
    }
}

/// Feeds the closing round's client losses to the zk0 schedule, before `complete` clears the
/// accepted updates; it decides the adaptive part of the next announcement.
pub fn observe_schedule(
    state: &mut RoundState,
    cfg: &Config,
    round: u64,
    server_loss: Option<f64>,
) {
    let clients = state
        .accepted
        .iter()
        .filter_map(|(c, rec)| Some((c.clone(), (*rec.metrics.get("loss")?, rec.examples))))
        .collect();
    let obs = crate::schedule::RoundObservation {
        round,
        clients,
        server_loss,
    };
    state.schedule.observe(&cfg.schedule, &obs);
}

/// The run outputs of one closed round: `round_NNN_server_eval.json`, plots and, when due, a
/// checkpoint (pushed to the Hub after the last round). Written on a blocking thread after
/// the new model is published; failures are logged, outputs never stop the federation.
#[derive(Debug)]
pub struct Outputs {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub base_dir: Option<PathBuf>,
    /// The state right after the round completed (for the checkpoint's training state).
    pub state: RoundState,
    pub summary: RoundSummary,
    pub accepted: BTreeMap<String, UpdateRecord>,
    /// Client id → dataset, for the round record.
    pub datasets: BTreeMap<String, String>,
    pub server_eval: EvalOutcome,
    /// The new global model's bytes (parsed again for a checkpoint, never re-read from disk).
    pub model: Bytes,
}

impl Outputs {
    pub fn run(self) {
        let round = self.summary.round;
        if let Err(e) = self.write() {
            tracing::error!(
                round,
                error = format!("{e:#}"),
                "writing run outputs failed"
            );
        }
    }

    fn write(self) -> Result<()> {
        let outputs = outputs::Outputs::new(&self.store);
        let mut record = RoundRecord::new(&self.summary, &self.accepted, &self.datasets);
        match self.server_eval {
            Some(Ok(e)) => record.server_eval = Some(e),
            Some(Err(e)) => record.server_eval_error = Some(e),
            None => {}
        }
        let round = self.summary.round;
        outputs.save_round(&record)?;
        let history = outputs.load_history()?;
        let rounds = outputs.load_rounds(round)?;
        let o = &self.cfg.outputs;
        if o.plots {
            if let Err(e) = plots::write_all(&outputs.plots_dir(), &history, &rounds) {
                tracing::warn!(error = format!("{e:#}"), "plots not written");
            }
        }
        if !o.checkpoint_due(round, self.cfg.rounds.rounds) {
            return Ok(());
        }
        let (global, _) = read_safetensors(&self.model).context("decoding the new model")?;
        let training = checkpoint::TrainingState {
            round,
            model_id: self.summary.model_id.clone(),
            state: self.state,
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
        if last && !o.push_to_hub.is_empty() {
            push_to_hub(&o.push_to_hub, &dir.join("pretrained_model"));
        }
        Ok(())
    }
}

/// Uploads the final checkpoint; failures are logged (the run's files stay on disk;
/// `zk0-aggregator push` retries by hand). Blocking HTTP: called on a blocking thread.
fn push_to_hub(repo: &str, dir: &std::path::Path) {
    let Some(token) = crate::hub::token_from_env() else {
        tracing::warn!(%repo, "not pushed: no Hugging Face token (HF_TOKEN)");
        return;
    };
    match crate::hub::push_folder(&crate::hub::endpoint_from_env(), &token, repo, dir) {
        Ok(r) => {
            tracing::info!(%repo, url = %r.repo_url, files = r.regular.len() + r.lfs.len(), "checkpoint pushed to the Hub")
        }
        Err(e) => {
            tracing::warn!(%repo, error = format!("{e:#}"), "push to the Hub failed; retry with `zk0-aggregator push`")
        }
    }
}
