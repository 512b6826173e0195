//! Run outputs: per-round server-evaluation records, the policy-loss history, plots and
//! checkpoints, all in the state directory, and their configuration (`[outputs]`).
//!
//! ```toml
//! [outputs]
//! base_model_dir = ""             # LeRobot SmolVLA checkpoint dir or Hub id (local cache);
//!                                 # empty: rounds.base_model
//! plots = true                    # plots/*.png and plots/*.svg after every round
//! push_to_hub = ""                # Hub model repo (owner/name) the final checkpoint's
//!                                 # pretrained_model/ is pushed to (token: HF_TOKEN); empty: none
//!
//! [outputs.eval]                  # server evaluation through `zk0-train eval`
//! dataset = ""                    # held-out LeRobot dataset dir; empty: the first
//!                                 # [datasets] server entry if it is a directory, else none
//! every = 1                       # every N rounds (the last round is always evaluated)
//! initial = true                  # also evaluate the initial model (round 0)
//! worker = ""                     # zk0-train path; empty: next to zk0-aggregator, else PATH
//! worker_args = []                # before the subcommand, e.g. ["--threads", "2"]
//! episodes = 0                    # first N episodes; 0: all
//! batch_size = 8
//! seed = 0
//! tokenizer = ""                  # empty: MODEL/tokenizer.json
//! timeout_s = 1800
//!
//! [outputs.checkpoint]
//! every = 0                       # also every N rounds; 0: only at the end
//! ```
//!
//! Files (state dir):
//! ```text
//! round_NNN_server_eval.json   aggregated + server eval + per-client metrics of round NNN
//! policy_loss_history.json     server policy loss per evaluated round (0 = initial model)
//! plots/{server_policy_loss,client_loss,update_norms,bytes_per_round}.{png,svg}
//! checkpoints/round_NNN/pretrained_model/   LeRobot layout + README.md + metrics.json
//! checkpoints/round_NNN/training_state/     what `init --resume` needs
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::round::{RoundSummary, UpdateRecord};
use zk0_daemon::{write_atomic, Durability};

use crate::store::Store;

/// `[outputs]`: server evaluation, plots and checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputsConfig {
    pub base_model_dir: String,
    pub plots: bool,
    pub push_to_hub: String,
    pub eval: ServerEvalConfig,
    pub checkpoint: CheckpointConfig,
}

/// `[outputs.eval]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerEvalConfig {
    pub dataset: String,
    pub every: u64,
    pub initial: bool,
    pub worker: String,
    pub worker_args: Vec<String>,
    pub episodes: u64,
    pub batch_size: u32,
    pub seed: i64,
    pub tokenizer: String,
    pub timeout_s: f64,
}

/// `[outputs.checkpoint]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    pub every: u64,
}

impl Default for OutputsConfig {
    fn default() -> Self {
        OutputsConfig {
            base_model_dir: String::new(),
            plots: true,
            push_to_hub: String::new(),
            eval: ServerEvalConfig::default(),
            checkpoint: CheckpointConfig::default(),
        }
    }
}

impl Default for ServerEvalConfig {
    fn default() -> Self {
        ServerEvalConfig {
            dataset: String::new(),
            every: 1,
            initial: true,
            worker: String::new(),
            worker_args: Vec::new(),
            episodes: 0,
            batch_size: 8,
            seed: 0,
            tokenizer: String::new(),
            timeout_s: 1800.0,
        }
    }
}

impl OutputsConfig {
    /// Checks values a TOML schema cannot.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.eval.timeout_s > 0.0 && self.eval.timeout_s.is_finite(),
            "outputs.eval.timeout_s must be > 0"
        );
        anyhow::ensure!(
            self.push_to_hub.is_empty() || crate::datasets::is_repo_id(&self.push_to_hub),
            "outputs.push_to_hub: {:?} is not a Hub repo id (owner/name)",
            self.push_to_hub
        );
        anyhow::ensure!(
            self.eval.batch_size > 0,
            "outputs.eval.batch_size must be > 0"
        );
        Ok(())
    }

    /// Fills `eval.dataset` from the first `[datasets] server` entry when that is a local
    /// directory (`zk0-train eval` reads directories; Hub ids must be downloaded first).
    pub fn resolve_eval_dataset(&mut self, datasets: &crate::datasets::DatasetsConfig) {
        if self.eval.dataset.is_empty() {
            if let Some(e) = datasets.server.first() {
                if Path::new(&e.repo_id).is_dir() {
                    self.eval.dataset = e.repo_id.clone();
                }
            }
        }
    }

    /// Whether round `round` of `rounds` (0: forever) is evaluated on the server.
    pub fn eval_due(&self, round: u64, rounds: u64) -> bool {
        !self.eval.dataset.is_empty() && is_due(round, rounds, self.eval.every)
    }

    /// Whether a checkpoint is written after round `round` of `rounds`.
    pub fn checkpoint_due(&self, round: u64, rounds: u64) -> bool {
        is_due(round, rounds, self.checkpoint.every)
    }
}

/// Every `every` rounds (0: never on a period) and always at the last round.
fn is_due(round: u64, rounds: u64, every: u64) -> bool {
    (rounds > 0 && round == rounds) || (every > 0 && round.is_multiple_of(every))
}

/// One client's contribution to a round, as recorded in `round_NNN_server_eval.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub client_id: String,
    /// From the config's `[datasets]` clients list, else what the agent reports in its status.
    pub dataset: Option<String>,
    pub loss: Option<f64>,
    pub fedprox_loss: Option<f64>,
    pub grad_norm: Option<f64>,
    pub update_norm: Option<f64>,
    pub steps: Option<f64>,
    pub seconds: Option<f64>,
    pub examples: u64,
    pub codec: String,
    pub bytes: u64,
    pub sha256: String,
}

impl ClientRecord {
    pub fn new(cid: &str, rec: &UpdateRecord) -> Self {
        let m = |k: &str| rec.metrics.get(k).copied();
        ClientRecord {
            client_id: cid.to_string(),
            dataset: rec.dataset.clone(),
            loss: m("loss"),
            fedprox_loss: m("fedprox_loss"),
            grad_norm: m("grad_norm"),
            update_norm: m("update_norm"),
            steps: m("steps"),
            seconds: m("seconds"),
            examples: rec.examples,
            codec: rec.codec.clone(),
            bytes: rec.bytes,
            sha256: rec.sha256.clone().into(),
        }
    }
}

/// What the server evaluation of one model gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEval {
    /// Held-out policy (flow-matching) loss: the primary metric.
    pub policy_loss: f64,
    pub model_id: String,
    pub dataset: String,
    pub seconds: f64,
    /// `zk0-train eval`'s whole JSON report.
    pub report: serde_json::Value,
}

/// `round_NNN_server_eval.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub model_id: String,
    pub base_model_id: String,
    /// Example-weighted means of the client metrics (of the aggregated updates).
    pub aggregated: BTreeMap<String, f64>,
    /// Sum of the accepted updates' encoded sizes.
    pub bytes_received: u64,
    pub server_eval: Option<ServerEval>,
    /// Why there is no server evaluation although one was due (the error).
    pub server_eval_error: Option<String>,
    /// Every accepted update, including those left out of the aggregate …
    pub clients: Vec<ClientRecord>,
    /// … which are listed here with why.
    #[serde(default)]
    pub excluded: Vec<crate::aggregate::Excluded>,
    pub duration_ms: u64,
}

impl RoundRecord {
    pub fn new(summary: &RoundSummary, accepted: &BTreeMap<String, UpdateRecord>) -> Self {
        let clients: Vec<ClientRecord> = accepted
            .iter()
            .map(|(cid, r)| ClientRecord::new(cid, r))
            .collect();
        RoundRecord {
            round: summary.round,
            model_id: summary.model_id.clone().into(),
            base_model_id: summary.base_model_id.clone().into(),
            aggregated: summary.metrics.clone(),
            bytes_received: clients.iter().map(|c| c.bytes).sum(),
            server_eval: None,
            server_eval_error: None,
            clients,
            excluded: summary.excluded.clone(),
            duration_ms: summary.duration_ms,
        }
    }
}

/// One entry of `policy_loss_history.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyLossPoint {
    /// 0: the initial model.
    pub round: u64,
    pub model_id: String,
    pub policy_loss: f64,
}

/// `policy_loss_history.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyLossHistory {
    /// Held-out dataset the losses were measured on.
    pub dataset: String,
    pub points: Vec<PolicyLossPoint>,
}

/// The run outputs of a state directory.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub dir: PathBuf,
}

impl Outputs {
    pub fn new(store: &Store) -> Self {
        Outputs {
            dir: store.dir.clone(),
        }
    }
    pub fn round_path(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round_{round:03}_server_eval.json"))
    }
    pub fn history_path(&self) -> PathBuf {
        self.dir.join("policy_loss_history.json")
    }
    pub fn plots_dir(&self) -> PathBuf {
        self.dir.join("plots")
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    pub fn save_round(&self, r: &RoundRecord) -> Result<()> {
        Ok(write_atomic(
            &self.round_path(r.round),
            &serde_json::to_vec_pretty(r)?,
            Durability::Durable,
        )?)
    }

    /// Every round record present, oldest first (rounds without a file are skipped).
    pub fn load_rounds(&self, upto: u64) -> Result<Vec<RoundRecord>> {
        let mut v = Vec::new();
        for r in 0..=upto {
            let p = self.round_path(r);
            match std::fs::read(&p) {
                Ok(b) => v.push(
                    serde_json::from_slice(&b)
                        .with_context(|| format!("parsing {}", p.display()))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            }
        }
        Ok(v)
    }

    pub fn load_history(&self) -> Result<PolicyLossHistory> {
        let p = self.history_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PolicyLossHistory::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Adds (or replaces, after a redone round) the point of `round` and saves the history.
    pub fn record_policy_loss(&self, dataset: &str, point: PolicyLossPoint) -> Result<()> {
        let mut h = self.load_history()?;
        h.dataset = dataset.to_string();
        h.points.retain(|p| p.round != point.round);
        h.points.push(point);
        h.points.sort_by_key(|p| p.round);
        self.save_history(&h)
    }

    pub fn save_history(&self, h: &PolicyLossHistory) -> Result<()> {
        Ok(write_atomic(
            &self.history_path(),
            &serde_json::to_vec_pretty(h)?,
            Durability::Durable,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_every_n_and_at_the_end() {
        let mut c = OutputsConfig::default();
        assert!(!c.eval_due(1, 5), "no dataset: no evaluation");
        c.eval.dataset = "ds".into();
        c.eval.every = 2;
        let due: Vec<u64> = (1..=5).filter(|r| c.eval_due(*r, 5)).collect();
        assert_eq!(due, vec![2, 4, 5]);
        let ck: Vec<u64> = (1..=5).filter(|r| c.checkpoint_due(*r, 5)).collect();
        assert_eq!(ck, vec![5]);
        c.checkpoint.every = 3;
        let ck: Vec<u64> = (1..=7).filter(|r| c.checkpoint_due(*r, 7)).collect();
        assert_eq!(ck, vec![3, 6, 7]);
        assert!(!c.checkpoint_due(5, 0), "forever: only on the period");
    }

    #[test]
    fn history_replaces_a_redone_round() {
        let d = tempfile::tempdir().unwrap();
        let o = Outputs::new(&Store::new(d.path()));
        for (r, l) in [(0, 3.0), (1, 2.0), (1, 1.5)] {
            o.record_policy_loss(
                "held",
                PolicyLossPoint {
                    round: r,
                    model_id: format!("m{r}"),
                    policy_loss: l,
                },
            )
            .unwrap();
        }
        let h = o.load_history().unwrap();
        assert_eq!(h.dataset, "held");
        let got: Vec<(u64, f64)> = h.points.iter().map(|p| (p.round, p.policy_loss)).collect();
        assert_eq!(got, vec![(0, 3.0), (1, 1.5)]);
    }
}
