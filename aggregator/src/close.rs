//! Closing a round: fold the accepted updates into the next global model, evaluate it, and
//! write the run's outputs. All of it runs beside the event loop (a task and blocking
//! threads), so intake, keep-alive and the metrics stay responsive however long it takes.
//!
//! [`CloseJob::run`] makes the new model (and its server evaluation) from owned inputs; the
//! event loop then completes the round state and publishes; [`Outputs::run`] writes round
//! records, plots and checkpoints afterwards.
//!
//! Crash safety: the round's state says `aggregating` until the new model is saved and
//! evaluated, so a crash before that redoes the close (the fold is deterministic, the model
//! content-addressed, the evaluation recorded per round). The outputs are saved as
//! [`RoundOutputs`] under `pending/` before the completion is, and written again on restart
//! until they are all there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use shared_proto::codec::decode_delta_each_from;
use shared_proto::tensor::{ModelSpec, TensorSet};

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};

use crate::aggregate::{self, Aggregation, Coordinatewise, Excluded, ServerStep};
use crate::checkpoint;
use crate::config::Config;
use crate::config::Strategy;
use crate::metrics::Metrics;
use crate::outputs::{self, PolicyLossPoint, RoundRecord, ServerEval};
use crate::plots;
use crate::round::{RoundState, RoundSummary, UpdateRecord};
use crate::server_eval;
use crate::store::Store;
use zk0_daemon::{write_atomic, Durability::Durable};

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

/// The new global model, saved (published from its file).
#[derive(Debug)]
pub struct Closed {
    pub model_id: String,
    /// Accepted updates left out of the model, with why.
    pub excluded: Vec<Excluded>,
    pub server_eval: EvalOutcome,
}

impl CloseJob {
    /// Aggregates (on a blocking thread), then evaluates (a child process). Server evaluation
    /// comes before the round is marked complete: a crash during it redoes the round, so the
    /// evaluation is never lost.
    pub async fn run(self) -> Result<Closed> {
        let job = self.clone();
        let agg = tokio::task::spawn_blocking(move || {
            aggregate_round(
                &job.store,
                &job.spec,
                &job.model_id,
                job.round,
                &job.accepted,
                &job.cfg.aggregation(),
            )
        })
        .await
        .context("aggregation task")??;
        self.metrics
            .update_bytes_read_back
            .inc_by(agg.blob_bytes_read);
        let server_eval = server_eval(&self, self.round, &agg.model_id).await;
        Ok(Closed {
            model_id: agg.model_id,
            excluded: agg.excluded,
            server_eval,
        })
    }
}

/// A round's new model: saved under its id, with the updates left out of it.
#[derive(Debug)]
pub struct Aggregated {
    pub model_id: String,
    pub excluded: Vec<Excluded>,
    /// Update blob bytes the folds read (each included blob once per fold).
    pub blob_bytes_read: u64,
}

/// Combines the accepted updates of `round` into the next global model with the configured
/// strategy, leaving out norm outliers and any update that makes the model non-finite.
///
/// The normal path is one pass over the blobs: the norm rule needs only the norms measured on
/// receipt, so the included set is known before the first blob is read; the fold's result is
/// then checked finite. Only when it is not (an attack: honest deltas are tiny next to
/// f32::MAX) is the largest-norm update dropped and the fold redone from the base model, until
/// the model is finite: at most one refold per update, paid by attacked rounds alone, instead of
/// checking every update's effect on every round. Sorted client order throughout, so a redone
/// round (after a crash) gives the same model and the same exclusions.
pub fn aggregate_round(
    store: &Store,
    spec: &ModelSpec,
    model_id: &str,
    round: u64,
    accepted: &BTreeMap<String, UpdateRecord>,
    agg: &Aggregation,
) -> Result<Aggregated> {
    let norms: BTreeMap<String, f64> = accepted.iter().map(|(c, r)| (c.clone(), r.norm)).collect();
    let mut excluded = aggregate::norm_outliers(&norms, agg.norm_bound_multiple);
    let mut blob_bytes_read = 0;
    loop {
        let included: BTreeMap<&String, &UpdateRecord> = accepted
            .iter()
            .filter(|(c, _)| !excluded.iter().any(|e| &e.client_id == *c))
            .collect();
        let mut global = aggregate::load_model(store, model_id)?;
        fold(store, spec, round, &included, agg, &mut global)?;
        blob_bytes_read += included.values().map(|r| r.bytes).sum::<u64>();
        zk0_daemon::crash_point::hold("aggregate", round);
        if aggregate::all_finite(&global) {
            let model_id = aggregate::save_model(store, &global)?;
            for e in &excluded {
                tracing::warn!(round, client = %e.client_id, reason = e.reason.as_str(), detail = %e.detail, "update left out of the aggregate");
            }
            return Ok(Aggregated {
                model_id,
                excluded,
                blob_bytes_read,
            });
        }
        let left: BTreeMap<String, f64> =
            included.keys().map(|c| ((*c).clone(), norms[*c])).collect();
        // With nothing folded the model is the base one, which was finite when published.
        let culprit = aggregate::overflow_culprit(&left)
            .with_context(|| format!("base model {model_id} is not finite"))?;
        excluded.push(culprit);
    }
}

/// Folds the `included` updates into `global` with the configured strategy (nothing included:
/// the model stays).
fn fold(
    store: &Store,
    spec: &ModelSpec,
    round: u64,
    included: &BTreeMap<&String, &UpdateRecord>,
    agg: &Aggregation,
    global: &mut TensorSet,
) -> Result<()> {
    let stat = match agg.strategy {
        Strategy::FedProx => return fold_weighted(store, spec, round, included, agg, global),
        Strategy::TrimmedMean => Coordinatewise::TrimmedMean(agg.trim_fraction),
        Strategy::Median => Coordinatewise::Median,
    };
    if included.is_empty() {
        return Ok(());
    }
    fold_coordinatewise(store, spec, round, included, stat, agg.server_lr, global)
}

/// `global += server_lr · Σ wᵢΔᵢ / Σ wᵢ`, the blobs read one at a time and folded tensor by
/// tensor as each is decoded: peak memory is the global model plus one update's blob.
fn fold_weighted(
    store: &Store,
    spec: &ModelSpec,
    round: u64,
    included: &BTreeMap<&String, &UpdateRecord>,
    agg: &Aggregation,
    global: &mut TensorSet,
) -> Result<()> {
    let total: f64 = included.values().map(|r| r.examples as f64).sum();
    let mut step = ServerStep::new(global, total, agg.server_lr)?;
    for (cid, rec) in included {
        each_delta(store, spec, round, cid, |name, delta| {
            step.add_tensor(rec.examples as f64, name, &delta)
        })?;
    }
    Ok(())
}

/// A coordinate-wise statistic needs every client's value of a coordinate at once, but a blob
/// (zstd over the whole update) only decodes from its start. So each blob is decoded once into
/// a scratch file of raw f32 in spec order, then the files are read side by side, one tensor of
/// each at a time: memory is the model plus n × one tensor, disk n × the model's f32 size.
fn fold_coordinatewise(
    store: &Store,
    spec: &ModelSpec,
    round: u64,
    included: &BTreeMap<&String, &UpdateRecord>,
    stat: Coordinatewise,
    server_lr: f64,
    global: &mut TensorSet,
) -> Result<()> {
    let scratch = store.scratch_round_dir(round);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut readers = Vec::with_capacity(included.len());
    for cid in included.keys() {
        let path = scratch.join(format!("{cid}.f32"));
        let mut out = BufWriter::new(
            File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        each_delta(store, spec, round, cid, |_, delta| {
            let raw: Vec<u8> = delta.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok(out.write_all(&raw)?)
        })?;
        out.flush()?;
        readers.push(BufReader::new(File::open(&path)?));
    }
    let mut deltas: Vec<Vec<f32>> = vec![Vec::new(); readers.len()];
    let mut bytes = Vec::new();
    for name in spec.tensors.keys() {
        let g = global
            .get_mut(name)
            .with_context(|| format!("global model lacks {name}"))?;
        bytes.resize(g.data.len() * 4, 0);
        for (d, r) in deltas.iter_mut().zip(&mut readers) {
            r.read_exact(&mut bytes)
                .with_context(|| format!("reading back {name}"))?;
            d.clear();
            d.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        aggregate::robust_step(stat, server_lr, &mut g.data, &deltas)?;
    }
    drop(readers);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// Decodes the accepted blob of `cid` tensor by tensor (spec order) into `each`.
fn each_delta(
    store: &Store,
    spec: &ModelSpec,
    round: u64,
    cid: &str,
    mut each: impl FnMut(&str, Vec<f32>) -> Result<()>,
) -> Result<()> {
    let path = store.accepted_path(round, cid);
    let blob = File::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let max_decoded = spec.f32_bytes().saturating_add(1 << 20);
    // Inflated straight from the file: never the compressed blob beside the decompressed one.
    let blob = BufReader::with_capacity(1 << 20, blob);
    decode_delta_each_from(blob, spec, max_decoded, |name, _, delta| each(name, delta))
        .with_context(|| format!("decoding {}", path.display()))?;
    Ok(())
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
    match server_eval::evaluate(&o.eval, base, &model_path, model_id, round, &scratch).await {
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
/// accepted updates; it decides the adaptive part of the next announcement. Updates left out
/// of the aggregate do not steer it either.
pub fn observe_schedule(
    state: &mut RoundState,
    cfg: &Config,
    round: u64,
    server_loss: Option<f64>,
    excluded: &[Excluded],
) {
    let clients = state
        .accepted
        .iter()
        .filter(|(c, _)| !excluded.iter().any(|e| &e.client_id == *c))
        .filter_map(|(c, rec)| Some((c.clone(), (*rec.metrics.get("loss")?, rec.examples))))
        .collect();
    let obs = crate::schedule::RoundObservation {
        round,
        clients,
        server_loss,
    };
    state.schedule.observe(&cfg.schedule, &obs);
}

/// What the run outputs of one completed round are made of (`rounds/round_NNN.json`,
/// `federated_metrics.json`, `round_NNN_server_eval.json`, plots and, when due, a checkpoint,
/// pushed to the Hub after the last round).
///
/// Saved durably under `pending/` *before* the round's completion is (see [`Pending`]), and
/// removed once every output is written: a crash in between leaves the file, and the restart
/// writes the outputs again. Every output is written whole under its round's name (atomic
/// replace), so writing twice leaves each exactly once.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RoundOutputs {
    /// The state right after the round completed (for the checkpoint's training state).
    pub state: RoundState,
    pub summary: RoundSummary,
    pub accepted: BTreeMap<String, UpdateRecord>,
    pub server_eval: EvalOutcome,
}

/// The `pending/` directory of a state dir: completed rounds whose outputs are not all written.
#[derive(Debug, Clone)]
pub struct Pending {
    dir: PathBuf,
}

impl Pending {
    pub fn new(store: &Store) -> Self {
        Pending {
            dir: store.dir.join("pending"),
        }
    }

    fn path(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round_{round:03}.json"))
    }

    /// Records `o` before the round's completion is saved (durable: the completion is).
    pub fn save(&self, o: &RoundOutputs) -> Result<()> {
        let path = self.path(o.summary.round);
        write_atomic(&path, &serde_json::to_vec(o)?, Durable)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn remove(&self, round: u64) {
        let _ = std::fs::remove_file(self.path(round));
    }

    /// The pending rounds that `state` shows completed, oldest first. A file of a round the
    /// state has not completed (a crash between the two saves) is stale: the round's close is
    /// redone and saves it again, so it is removed.
    pub fn completed(&self, state: &RoundState) -> Result<Vec<RoundOutputs>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(out);
        };
        for e in entries {
            let path = e?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let o: RoundOutputs = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?;
            if state.history.iter().any(|h| h.round == o.summary.round) {
                out.push(o);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        out.sort_by_key(|o| o.summary.round);
        Ok(out)
    }
}

/// Writes a completed round's [`RoundOutputs`] on a blocking thread, after the new model is
/// published; failures are logged (outputs never stop the federation) and leave the round
/// pending, so the next start tries again.
#[derive(Debug)]
pub struct Outputs {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub base_dir: Option<PathBuf>,
    pub round: RoundOutputs,
}

impl Outputs {
    /// The outputs of a pending round (its model is in the state dir).
    pub fn resume(
        cfg: Arc<Config>,
        store: Store,
        base_dir: Option<PathBuf>,
        round: RoundOutputs,
    ) -> Result<Outputs> {
        let path = store.model_path(&round.summary.model_id);
        anyhow::ensure!(path.is_file(), "model {} is missing", path.display());
        Ok(Outputs {
            cfg,
            store,
            base_dir,
            round,
        })
    }

    pub fn run(self) {
        let round = self.round.summary.round;
        let pending = Pending::new(&self.store);
        match self.write() {
            Ok(()) => pending.remove(round),
            Err(e) => tracing::error!(
                round,
                error = format!("{e:#}"),
                "writing run outputs failed (tried again at the next start)"
            ),
        }
    }

    fn write(self) -> Result<()> {
        let RoundOutputs {
            state,
            summary,
            accepted,
            server_eval,
        } = self.round;
        let round = summary.round;
        write_atomic(
            &self.store.round_summary_path(round),
            &serde_json::to_vec_pretty(&summary)?,
            Durable,
        )?;
        // Every round so far in one file, for plots and dashboards.
        write_atomic(
            &self.store.dir.join("federated_metrics.json"),
            &serde_json::to_vec_pretty(&state.history)?,
            Durable,
        )?;
        let outputs = outputs::Outputs::new(&self.store);
        let mut record = RoundRecord::new(&summary, &accepted);
        match server_eval {
            Some(Ok(e)) => record.server_eval = Some(e),
            Some(Err(e)) => record.server_eval_error = Some(e),
            None => {}
        }
        outputs.save_round(&record)?;
        zk0_daemon::crash_point::hold("outputs", round);
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
        let global = self.store.model_path(&summary.model_id);
        let training = checkpoint::TrainingState {
            round,
            model_id: summary.model_id.clone().into(),
            state,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::ExcludeReason;
    use shared_proto::codec::{encode_delta, Codec, EncodeOptions};
    use shared_proto::tensor::Tensor;

    /// A model of two tensors, `a` (2 values) and `b` (1 value).
    fn model(a: [f32; 2], b: f32) -> TensorSet {
        [
            (
                "a".to_string(),
                Tensor {
                    shape: vec![2],
                    data: a.to_vec(),
                },
            ),
            (
                "b".to_string(),
                Tensor {
                    shape: vec![1],
                    data: vec![b],
                },
            ),
        ]
        .into()
    }

    /// A state dir holding base model `base` and round-1 accepted updates (id, examples, Δ).
    fn round(
        base: &TensorSet,
        updates: &[(&str, u64, TensorSet)],
    ) -> (
        tempfile::TempDir,
        Store,
        String,
        BTreeMap<String, UpdateRecord>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        std::fs::create_dir_all(store.dir.join("models")).unwrap();
        let id = aggregate::save_model(&store, base).unwrap();
        let mut accepted = BTreeMap::new();
        for (cid, examples, delta) in updates {
            let opts = EncodeOptions {
                codec: Codec::F32,
                zstd_level: 1,
            };
            let blob = encode_delta(delta, &opts, None).unwrap();
            let path = store.accepted_path(1, cid);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &blob).unwrap();
            let norm = delta
                .values()
                .flat_map(|t| &t.data)
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            let rec = UpdateRecord {
                examples: *examples,
                sha256: Default::default(),
                codec: "f32".into(),
                bytes: blob.len() as u64,
                norm,
                metrics: BTreeMap::new(),
                dataset: None,
            };
            accepted.insert(cid.to_string(), rec);
        }
        (d, store, id, accepted)
    }

    fn agg(strategy: Strategy, server_lr: f64) -> Aggregation {
        Aggregation {
            strategy,
            trim_fraction: 0.2,
            server_lr,
            norm_bound_multiple: 10.0,
        }
    }

    fn run(
        store: &Store,
        id: &str,
        accepted: &BTreeMap<String, UpdateRecord>,
        a: &Aggregation,
    ) -> (TensorSet, Vec<(String, ExcludeReason)>) {
        let spec = ModelSpec::from_tensors(&aggregate::load_model(store, id).unwrap());
        let out = aggregate_round(store, &spec, id, 1, accepted, a).unwrap();
        let m = aggregate::load_model(store, &out.model_id).unwrap();
        assert_eq!(
            shared_proto::tensor::model_id(&m),
            out.model_id,
            "the saved file holds the model of that id"
        );
        let ex = out
            .excluded
            .iter()
            .map(|e| (e.client_id.clone(), e.reason))
            .collect();
        (m, ex)
    }

    fn values(m: &TensorSet) -> Vec<f32> {
        [&m["a"].data[..], &m["b"].data[..]].concat()
    }

    #[test]
    fn fedprox_is_the_weighted_average_without_the_norm_outlier() {
        let base = model([1.0, 2.0], 0.0);
        let (_d, store, id, acc) = round(
            &base,
            &[
                ("a", 1, model([1.0, 0.0], 4.0)),
                ("b", 3, model([0.0, 4.0], 0.0)),
                ("c", 4, model([0.5, 0.5], 1.0)),
                ("evil", 1000, model([1000.0, -1000.0], 1000.0)),
            ],
        );
        let (m, ex) = run(&store, &id, &acc, &agg(Strategy::FedProx, 1.0));
        assert_eq!(ex, vec![("evil".to_string(), ExcludeReason::NormOutlier)]);
        // (1·Δa + 3·Δb + 4·Δc) / 8 added to the base.
        assert_eq!(values(&m), vec![1.375, 3.75, 1.0]);
    }

    #[test]
    fn fewer_than_three_updates_exclude_nobody_by_norm() {
        let base = model([0.0, 0.0], 0.0);
        let (_d, store, id, acc) = round(
            &base,
            &[
                ("a", 1, model([1.0, 1.0], 1.0)),
                ("big", 1, model([1000.0, 1000.0], 1000.0)),
            ],
        );
        let (m, ex) = run(&store, &id, &acc, &agg(Strategy::FedProx, 1.0));
        assert!(ex.is_empty());
        assert_eq!(values(&m), vec![500.5, 500.5, 500.5]);
    }

    #[test]
    fn an_update_overflowing_the_aggregate_is_left_out() {
        // Finite values near f32::MAX with most of the weight and server_lr 3: the step would
        // make ±∞ (in every strategy). The norm rule cannot catch it with two updates.
        let base = model([1.0, 1.0], 1.0);
        let (_d, store, id, acc) = round(
            &base,
            &[
                ("a", 1, model([0.5, -0.5], 0.25)),
                ("huge", 3, model([f32::MAX, -f32::MAX], 1.0)),
            ],
        );
        for strategy in [Strategy::FedProx, Strategy::Median, Strategy::TrimmedMean] {
            let (m, ex) = run(&store, &id, &acc, &agg(strategy, 3.0));
            assert_eq!(
                ex,
                vec![("huge".to_string(), ExcludeReason::NonFiniteAggregate)],
                "{strategy:?}"
            );
            assert!(aggregate::all_finite(&m));
            // The model of the rest: base + 3·Δa.
            assert_eq!(values(&m), vec![2.5, -0.5, 1.75], "{strategy:?}");
        }
    }

    #[test]
    fn coordinatewise_strategies_read_every_client_per_tensor() {
        let base = model([0.0, 0.0], 10.0);
        let (_d, store, id, acc) = round(
            &base,
            &[
                ("a", 1, model([-5.0, 1.0], 1.0)),
                ("b", 100, model([1.0, 2.0], 2.0)),
                ("c", 1, model([2.0, 3.0], 3.0)),
                ("d", 1, model([3.0, 4.0], 4.0)),
                ("e", 1, model([5.0, 9.0], -5.0)),
            ],
        );
        // Unweighted: b's 100 examples change nothing. Median per coordinate: 2, 3, 2.
        let (m, ex) = run(&store, &id, &acc, &agg(Strategy::Median, 1.0));
        assert!(ex.is_empty());
        assert_eq!(values(&m), vec![2.0, 3.0, 12.0]);
        // Trim 0.2 of 5 cuts one at each end: means of {1,2,3}, {2,3,4}, {1,2,3}.
        let (m, _) = run(&store, &id, &acc, &agg(Strategy::TrimmedMean, 1.0));
        assert_eq!(values(&m), vec![2.0, 3.0, 12.0]);
        assert!(
            !store.scratch_round_dir(1).exists(),
            "scratch files are removed"
        );
        // And the strategies differ where they should: trim 0 is the plain mean.
        let plain = Aggregation {
            trim_fraction: 0.0,
            ..agg(Strategy::TrimmedMean, 1.0)
        };
        let (m, _) = run(&store, &id, &acc, &plain);
        assert_eq!(values(&m), vec![1.2, 3.8, 11.0]);
    }

    #[test]
    fn pending_outputs_are_those_of_completed_rounds_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let pending = Pending::new(&store);
        let mut state = RoundState::new("m0");
        let mut saved = Vec::new();
        for round in 1..=3 {
            state.phase = crate::round::Phase::Aggregating {
                started_ms: 0,
                closed_ms: 0,
            };
            let summary = state.complete(
                format!("m{round}"),
                crate::round::CloseReason::AllReported,
                vec![],
                0,
            );
            saved.push(RoundOutputs {
                state: state.clone(),
                summary,
                accepted: BTreeMap::new(),
                server_eval: None,
            });
        }
        // Saved newest first; round 3 as if the crash came before its completion was saved.
        for o in saved.iter().rev() {
            pending.save(o).unwrap();
        }
        let state_at_crash = saved[1].state.clone();
        let got = pending.completed(&state_at_crash).unwrap();
        let rounds: Vec<u64> = got.iter().map(|o| o.summary.round).collect();
        assert_eq!(rounds, vec![1, 2]);
        assert_eq!(got[1].summary.model_id, "m2");
        assert!(
            !pending.path(3).exists(),
            "the stale round-3 file is removed"
        );
        pending.remove(1);
        let left = pending.completed(&state_at_crash).unwrap();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn no_update_left_keeps_the_model() {
        let base = model([1.0, 2.0], 3.0);
        let (_d, store, id, acc) = round(&base, &[]);
        for strategy in [Strategy::FedProx, Strategy::Median] {
            let (m, ex) = run(&store, &id, &acc, &agg(strategy, 1.0));
            assert!(ex.is_empty());
            assert_eq!(m, base);
        }
    }
}
