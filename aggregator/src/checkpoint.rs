//! Checkpoints in LeRobot's `pretrained_model/` layout, the zk0 training state that
//! `init --resume` continues from, and warm starts (`init --init`) from any LeRobot SmolVLA
//! checkpoint.
//!
//! ```text
//! checkpoints/round_NNN/pretrained_model/config.json        copied from the base checkpoint
//! checkpoints/round_NNN/pretrained_model/model.safetensors  base weights, global tensors applied
//! checkpoints/round_NNN/pretrained_model/<processor files>  copied (policy_*processor*, tokenizer)
//! checkpoints/round_NNN/pretrained_model/README.md          model card from the run's values
//! checkpoints/round_NNN/pretrained_model/metrics.json       the run's metrics
//! checkpoints/round_NNN/training_state/global_trainable.safetensors  exact f32 global tensors
//! checkpoints/round_NNN/training_state/zk0_state.json       round, history, records
//! ```
//!
//! The aggregator never links libtorch, so the merge works on the safetensors bytes: every base
//! tensor is copied as is, except the global (trainable) ones, converted from f32 to the base
//! tensor's dtype (F32, BF16 or F16).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use shared_proto::tensor::{
    parse_raw, read_safetensors, write_raw, ModelSpec, RawTensor, TensorSet,
};
use smolvla_config::{is_trainable, SmolVlaConfig};

use crate::config::Config;
use crate::outputs::{PolicyLossHistory, RoundRecord};
use crate::round::RoundState;

/// `training_state/zk0_state.json`: everything a resumed run needs besides the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Last completed round.
    pub round: u64,
    /// Global model after that round (content id of `global_trainable.safetensors`).
    pub model_id: String,
    /// The round state after that round (history, schedule state), as `state.json` held it.
    pub state: RoundState,
    pub policy_loss: PolicyLossHistory,
    pub rounds: Vec<RoundRecord>,
}

/// A LeRobot checkpoint directory from a path or a Hub id already in the local Hugging Face
/// cache (`HF_HUB_CACHE`, else `HF_HOME/hub`; nothing is downloaded).
pub fn resolve(id_or_dir: &str) -> Result<PathBuf> {
    zk0_host::hf_cache::cached_checkpoint(id_or_dir)
}

/// The trainable tensors of a LeRobot SmolVLA checkpoint, as f32. With `like`, exactly its
/// names and shapes (the running federation's spec); else the set the checkpoint's
/// `config.json` freeze settings train ([`smolvla_config::is_trainable`], zk0-train's rule).
pub fn trainable_from(dir: &Path, like: Option<&ModelSpec>) -> Result<TensorSet> {
    let wpath = dir.join("model.safetensors");
    let bytes = std::fs::read(&wpath).with_context(|| format!("reading {}", wpath.display()))?;
    let (all, _) = read_safetensors(&bytes)
        .with_context(|| format!("{} is not a readable safetensors file", wpath.display()))?;
    let out: TensorSet = match like {
        Some(spec) => spec
            .tensors
            .iter()
            .map(|(name, shape)| {
                let t = all
                    .get(name)
                    .with_context(|| format!("{} lacks the tensor {name}", wpath.display()))?;
                anyhow::ensure!(
                    &t.shape == shape,
                    "{name}: shape {:?} in {}, {shape:?} in the federation",
                    t.shape,
                    wpath.display()
                );
                Ok((name.clone(), t.clone()))
            })
            .collect::<Result<_>>()?,
        None => {
            let cfg = SmolVlaConfig::from_file(dir.join("config.json"))?;
            anyhow::ensure!(
                cfg.kind == "smolvla",
                "{} is a {:?} policy, not SmolVLA",
                dir.display(),
                cfg.kind
            );
            all.into_iter()
                .filter(|(n, _)| is_trainable(n, &cfg))
                .collect()
        }
    };
    anyhow::ensure!(
        !out.is_empty(),
        "no trainable tensors found in {}",
        wpath.display()
    );
    ModelSpec::from_tensors(&out)
        .validate(&out)
        .with_context(|| format!("trainable tensors of {}", dir.display()))?;
    Ok(out)
}

/// `base` (safetensors bytes) with every tensor of `global` replaced, stored in the base
/// tensor's dtype (F32, BF16 or F16); every other tensor and the metadata are copied as is.
pub fn merge_weights(base: &[u8], global: &TensorSet) -> Result<Vec<u8>> {
    let (mut tensors, metadata) =
        parse_raw(base).context("base weights are not a readable safetensors file")?;
    for (name, t) in global {
        let b = tensors
            .get_mut(name)
            .with_context(|| format!("the base checkpoint has no tensor {name}"))?;
        anyhow::ensure!(
            b.shape == t.shape,
            "{name}: global shape {:?}, base {:?}",
            t.shape,
            b.shape
        );
        *b = RawTensor::from_f32(b.dtype, t.shape.clone(), &t.data)
            .with_context(|| format!("{name}: cannot write dtype {}", b.dtype.as_str()))?;
    }
    Ok(write_raw(&tensors, &metadata))
}

/// Files of a LeRobot checkpoint that travel with the weights: configs, processor pipelines
/// and their state, tokenizer files.
fn is_companion_file(name: &str) -> bool {
    if name == "model.safetensors" || name == "README.md" || name == "metrics.json" {
        return false;
    }
    name.ends_with(".json")
        || name.ends_with(".txt")
        || name.ends_with(".model")
        || (name.ends_with(".safetensors") && name.contains("processor"))
}

/// What a checkpoint is made from.
#[derive(Debug)]
pub struct CheckpointInput<'a> {
    pub cfg: &'a Config,
    pub training: &'a TrainingState,
    /// The global model's file (`models/<id>.safetensors`: the exact f32 trainable tensors).
    pub global: &'a Path,
    /// The base LeRobot checkpoint; without it only `training_state/` and the card are written.
    pub base_dir: Option<&'a Path>,
}

/// Writes `<checkpoints>/round_NNN/` (replacing an older one) and returns its path.
pub fn write(checkpoints: &Path, input: &CheckpointInput<'_>) -> Result<PathBuf> {
    let round = input.training.round;
    let final_dir = checkpoints.join(format!("round_{round:03}"));
    let tmp = checkpoints.join(format!(".round_{round:03}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let pm = tmp.join("pretrained_model");
    let ts = tmp.join("training_state");
    std::fs::create_dir_all(&pm).with_context(|| format!("creating {}", pm.display()))?;
    std::fs::create_dir_all(&ts)?;

    // The model file is that encoding already: copied, not decoded and encoded again.
    std::fs::copy(input.global, ts.join("global_trainable.safetensors"))
        .with_context(|| format!("copying {}", input.global.display()))?;
    std::fs::write(
        ts.join("zk0_state.json"),
        serde_json::to_vec_pretty(input.training)?,
    )?;
    if let Some(base) = input.base_dir {
        let wpath = base.join("model.safetensors");
        let base_bytes =
            std::fs::read(&wpath).with_context(|| format!("reading {}", wpath.display()))?;
        let global = crate::aggregate::read_model_file(input.global)?;
        let merged = merge_weights(&base_bytes, &global)
            .with_context(|| format!("applying the global tensors to {}", wpath.display()))?;
        drop(base_bytes);
        std::fs::write(pm.join("model.safetensors"), merged)?;
        for e in std::fs::read_dir(base).with_context(|| format!("reading {}", base.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if e.file_type()?.is_file() && is_companion_file(&name) {
                std::fs::copy(e.path(), pm.join(&name))
                    .with_context(|| format!("copying {}", e.path().display()))?;
            }
        }
    }
    let metrics = metrics_json(input);
    std::fs::write(
        pm.join("metrics.json"),
        serde_json::to_vec_pretty(&metrics)?,
    )?;
    std::fs::write(pm.join("README.md"), model_card(input))?;
    zk0_daemon::crash_point::hold("checkpoint", round);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming onto {}", final_dir.display()))?;
    Ok(final_dir)
}

/// The final figures of a run: what the card states and `metrics.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalMetrics {
    pub rounds_completed: u64,
    pub model_id: String,
    pub initial_policy_loss: Option<f64>,
    pub final_policy_loss: Option<f64>,
    pub best_policy_loss: Option<f64>,
    pub best_round: Option<u64>,
    /// The last round's example-weighted client metrics.
    pub final_client_metrics: BTreeMap<String, f64>,
}

pub fn final_metrics(t: &TrainingState) -> FinalMetrics {
    let pts = &t.policy_loss.points;
    let best = pts
        .iter()
        .filter(|p| p.round > 0)
        .min_by(|a, b| a.policy_loss.total_cmp(&b.policy_loss));
    FinalMetrics {
        rounds_completed: t.round,
        model_id: t.model_id.clone(),
        initial_policy_loss: pts.iter().find(|p| p.round == 0).map(|p| p.policy_loss),
        final_policy_loss: pts
            .iter()
            .find(|p| p.round == t.round && p.model_id == t.model_id)
            .map(|p| p.policy_loss),
        best_policy_loss: best.map(|p| p.policy_loss),
        best_round: best.map(|p| p.round),
        final_client_metrics: t
            .state
            .history
            .last()
            .map(|h| h.metrics.clone())
            .unwrap_or_default(),
    }
}

fn metrics_json(input: &CheckpointInput<'_>) -> serde_json::Value {
    serde_json::json!({
        "final": final_metrics(input.training),
        "policy_loss_history": input.training.policy_loss,
        "federated_metrics": input.training.state.history,
    })
}

fn datasets(cfg: &Config) -> Vec<String> {
    let mut v: Vec<String> = cfg
        .datasets
        .clients
        .iter()
        .map(|e| e.repo_id.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if v.is_empty() {
        v.push("(not listed in the [datasets] config)".into());
    }
    v
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |x| x.to_string())
}

/// README.md: a Hugging Face model card generated from the run (values printed exactly, so
/// they can be checked against `metrics.json`).
pub fn model_card(input: &CheckpointInput<'_>) -> String {
    let cfg = input.cfg;
    let r = &cfg.rounds;
    let t = input.training;
    let f = final_metrics(t);
    let ds = datasets(cfg);
    let mut s = String::new();
    let _ = writeln!(s, "---");
    let _ = writeln!(s, "library_name: lerobot");
    let _ = writeln!(s, "pipeline_tag: robotics");
    let _ = writeln!(s, "base_model: {}", r.base_model);
    let _ = writeln!(s, "tags:\n- smolvla\n- federated-learning\n- zk0");
    let _ = writeln!(s, "datasets:");
    for d in &ds {
        let _ = writeln!(s, "- {d}");
    }
    let _ = writeln!(s, "---\n");
    let _ = writeln!(s, "# SmolVLA fine-tuned with zk0 federated learning\n");
    let _ = writeln!(
        s,
        "Federation `{}`: {} rounds of FedProx over {} client(s), aggregated by zk0-aggregator.\n",
        cfg.federation,
        t.round,
        t.state.history.last().map_or(0, |h| h.accepted.len())
    );
    let _ = writeln!(s, "- Base model: {}", r.base_model);
    let _ = writeln!(s, "- Client datasets: {}", ds.join(", "));
    let _ = writeln!(
        s,
        "- Evaluation dataset: {}",
        if cfg.outputs.eval.dataset.is_empty() {
            "(none)"
        } else {
            &cfg.outputs.eval.dataset
        }
    );
    let _ = writeln!(s, "- Global model id: {}\n", t.model_id);
    let _ = writeln!(s, "## Hyper-parameters\n");
    let _ = writeln!(s, "| name | value |\n|---|---|");
    let _ = writeln!(s, "| rounds | {} |", t.round);
    let _ = writeln!(s, "| rounds_configured | {} |", r.rounds);
    let _ = writeln!(s, "| min_clients | {} |", r.min_clients);
    let _ = writeln!(s, "| local_steps | {} |", r.local_steps);
    let _ = writeln!(s, "| batch_size | {} |", r.batch_size);
    let _ = writeln!(s, "| lr | {} |", r.lr);
    let _ = writeln!(s, "| mu | {} |", r.mu);
    let _ = writeln!(s, "| server_lr | {} |", r.server_lr);
    let _ = writeln!(s, "| codecs | {} |", r.accepted_codecs.join(" "));
    let _ = writeln!(s, "\n## Final metrics\n");
    let _ = writeln!(s, "| metric | value |\n|---|---|");
    let _ = writeln!(s, "| rounds_completed | {} |", f.rounds_completed);
    let _ = writeln!(
        s,
        "| initial_policy_loss | {} |",
        opt(f.initial_policy_loss)
    );
    let _ = writeln!(s, "| final_policy_loss | {} |", opt(f.final_policy_loss));
    let _ = writeln!(s, "| best_policy_loss | {} |", opt(f.best_policy_loss));
    let _ = writeln!(
        s,
        "| best_round | {} |",
        f.best_round.map_or("n/a".into(), |b| b.to_string())
    );
    for (k, v) in &f.final_client_metrics {
        let _ = writeln!(s, "| client_{k} | {v} |");
    }
    let _ = writeln!(s, "\n## Policy loss per round (server evaluation)\n");
    let _ = writeln!(s, "| round | policy_loss |\n|---|---|");
    for p in &t.policy_loss.points {
        let _ = writeln!(s, "| {} | {} |", p.round, p.policy_loss);
    }
    let _ = writeln!(
        s,
        "\nLoad with LeRobot: `SmolVLAPolicy.from_pretrained(\"<this directory>\")`. \
         `metrics.json` holds every round's metrics."
    );
    s
}

/// A checkpoint's training state and exact global tensors; `path` is the `round_NNN` dir or
/// its `pretrained_model/` or `training_state/` subdirectory.
pub fn load_resume(path: &Path) -> Result<(TrainingState, TensorSet)> {
    let root = match path.file_name().and_then(|n| n.to_str()) {
        Some("pretrained_model") | Some("training_state") => path.parent().unwrap_or(path),
        _ => path,
    };
    let ts = root.join("training_state");
    let sp = ts.join("zk0_state.json");
    let state: TrainingState = serde_json::from_slice(
        &std::fs::read(&sp)
            .with_context(|| format!("reading {} (not a zk0 checkpoint?)", sp.display()))?,
    )
    .with_context(|| format!("parsing {}", sp.display()))?;
    let gp = ts.join("global_trainable.safetensors");
    let (global, _) =
        read_safetensors(&std::fs::read(&gp).with_context(|| format!("reading {}", gp.display()))?)
            .with_context(|| format!("parsing {}", gp.display()))?;
    let id = shared_proto::tensor::model_id(&global);
    anyhow::ensure!(
        id == state.model_id,
        "{} does not hold model {} (it hashes to {id})",
        gp.display(),
        state.model_id
    );
    Ok((state, global))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::tensor::{write_safetensors, Tensor};

    /// A base file with one BF16 and one F32 tensor plus a frozen one, built by hand.
    fn base() -> Vec<u8> {
        let frozen: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let bf: Vec<u8> = [0.5f32, -1.0, 3.0]
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f: Vec<u8> = [7.0f32].iter().flat_map(|x| x.to_le_bytes()).collect();
        let header = serde_json::json!({
            "__metadata__": {"format": "pt"},
            "frozen": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "a": {"dtype": "BF16", "shape": [3], "data_offsets": [8, 14]},
            "b": {"dtype": "F32", "shape": [1, 1], "data_offsets": [14, 18]},
        });
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(frozen);
        out.extend(bf);
        out.extend(f);
        out
    }

    #[test]
    fn merge_replaces_global_tensors_in_their_dtype() {
        let mut g = TensorSet::new();
        g.insert(
            "a".into(),
            Tensor::new(vec![3], vec![0.25, 4.0, -2.0]).unwrap(),
        );
        g.insert("b".into(), Tensor::new(vec![1, 1], vec![0.125]).unwrap());
        let merged = merge_weights(&base(), &g).unwrap();
        let (set, meta) = read_safetensors(&merged).unwrap();
        assert_eq!(set["frozen"].data, vec![1.0, 2.0]);
        assert_eq!(set["a"].data, vec![0.25, 4.0, -2.0]);
        assert_eq!(set["b"].data, vec![0.125]);
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        let n = u64::from_le_bytes(merged[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        assert!(String::from_utf8_lossy(&merged[8..8 + n]).contains("\"BF16\""));

        g.insert("missing".into(), Tensor::new(vec![1], vec![0.0]).unwrap());
        assert!(merge_weights(&base(), &g).is_err());
        g.remove("missing");
        g.insert("b".into(), Tensor::new(vec![1], vec![0.0]).unwrap());
        assert!(merge_weights(&base(), &g).is_err(), "shape mismatch");
        assert!(merge_weights(&base()[..20], &g).is_err(), "truncated");
    }

    #[test]
    fn trainable_set_follows_the_checkpoints_freeze_settings() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "model.state_proj.weight",
            "model.action_in_proj.weight",
            "model.vlm_with_expert.lm_expert.layers.0.mlp.up_proj.weight",
            "model.vlm_with_expert.vlm.lm_head.weight",
            "model.vlm_with_expert.vlm.model.text_model.layers.0.mlp.up_proj.weight",
        ];
        let all: TensorSet = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    Tensor::new(vec![2], vec![1.0, -1.0]).unwrap(),
                )
            })
            .collect();
        std::fs::write(
            dir.path().join("model.safetensors"),
            write_safetensors(&all, &BTreeMap::new()),
        )
        .unwrap();
        let trained = |config: &str| {
            std::fs::write(dir.path().join("config.json"), config).unwrap();
            trainable_from(dir.path(), None).map(|t| t.into_keys().collect::<Vec<_>>())
        };
        assert_eq!(
            trained(r#"{"type": "smolvla", "train_state_proj": false}"#).unwrap(),
            [names[1], names[2]]
        );
        // A full fine-tune (two VLM layers, so layer 0 is not the gradient-less last one).
        assert_eq!(
            trained(r#"{"train_expert_only": false, "num_vlm_layers": 2}"#).unwrap(),
            [names[1], names[0], names[2], names[4]]
        );
        let err = trained(r#"{"type": "pi0"}"#).unwrap_err().to_string();
        assert!(err.contains("not SmolVLA"), "{err}");
        let err = format!("{:#}", trained("{").unwrap_err());
        assert!(err.contains("config.json"), "{err}");
    }
}
