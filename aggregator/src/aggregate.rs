//! The aggregation math, without file I/O: the server steps of each strategy, the rules that
//! leave an accepted update out of the aggregate, and global-model files.
//!
//! - `fedprox` ([`ServerStep`]): `global += server_lr · Σ wᵢ·Δᵢ / Σ wᵢ`, with wᵢ the client's
//!   example count. Every weight is known before the first delta is read (the accepted updates
//!   are on disk), so each delta is folded straight into the global model, one tensor at a time
//!   as it is decoded: memory is one model plus one update's encoded blob, whatever the number
//!   of clients. Clients are folded in sorted id order, so a resumed round produces
//!   bit-identical results.
//! - `trimmed-mean` / `median` ([`robust_step`]): per coordinate, over the clients' values of
//!   one tensor, unweighted (as Flower's FedTrimmedAvg and FedMedian), computed in f64.
//! - Left out at close ([`norm_outliers`], [`overflow_culprit`]): an update whose norm is far
//!   above the round's median, and one whose values push the new model to ±∞.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use shared_proto::hash::StreamHasher;
use shared_proto::tensor::{read_safetensors_from, write_safetensors_to, TensorSet};

use crate::store::Store;

/// The server step under way: folds weighted deltas into the global model in place.
#[derive(Debug)]
pub struct ServerStep<'a> {
    global: &'a mut TensorSet,
    /// `server_lr / Σ wᵢ`: a delta of weight w is added with factor `w · per_weight`.
    per_weight: f64,
}

impl<'a> ServerStep<'a> {
    /// A step over updates whose weights sum to `total_weight`. With no weight (no
    /// contributions) nothing may be added and the model is kept.
    pub fn new(global: &'a mut TensorSet, total_weight: f64, server_lr: f64) -> Result<Self> {
        anyhow::ensure!(
            total_weight >= 0.0 && total_weight.is_finite() && server_lr.is_finite(),
            "total weight {total_weight} and server lr {server_lr} must be finite, weight >= 0"
        );
        let per_weight = if total_weight > 0.0 {
            server_lr / total_weight
        } else {
            0.0
        };
        Ok(ServerStep { global, per_weight })
    }

    /// Adds `weight · delta` for one tensor of one client's update. The update was validated
    /// against the model spec on receipt, so a mismatch here is an internal error.
    pub fn add_tensor(&mut self, weight: f64, name: &str, delta: &[f32]) -> Result<()> {
        anyhow::ensure!(
            weight > 0.0 && weight.is_finite() && self.per_weight > 0.0,
            "weight {weight} must be positive (and the step's total weight too)"
        );
        let g = self
            .global
            .get_mut(name)
            .with_context(|| format!("global model lacks {name}"))?;
        anyhow::ensure!(
            g.data.len() == delta.len(),
            "delta {name} has {} values, the model {}",
            delta.len(),
            g.data.len()
        );
        let f = (weight * self.per_weight) as f32;
        for (x, d) in g.data.iter_mut().zip(delta) {
            *x += f * *d;
        }
        Ok(())
    }
}

/// How round close combines the accepted updates (from `[rounds]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregation {
    pub strategy: crate::config::Strategy,
    pub trim_fraction: f64,
    pub server_lr: f64,
    /// See [`norm_outliers`]; 0 turns the rule off.
    pub norm_bound_multiple: f64,
}

/// Why an accepted update was left out of the round's aggregate (it was acked accepted on
/// receipt; these rules need the whole round). Labels of `zk0_aggregator_updates_excluded_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExcludeReason {
    /// ‖Δ‖₂ over `norm_bound_multiple` × the round's median norm.
    NormOutlier,
    /// With it the new global model was not finite (f32 overflow to ±∞).
    NonFiniteAggregate,
}

impl ExcludeReason {
    pub const ALL: [ExcludeReason; 2] = [Self::NormOutlier, Self::NonFiniteAggregate];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NormOutlier => "norm_outlier",
            Self::NonFiniteAggregate => "non_finite_aggregate",
        }
    }
}

/// One accepted update left out of a round's aggregate, as recorded in the round's outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    pub client_id: String,
    pub reason: ExcludeReason,
    pub detail: String,
}

/// The relative norm bound: with at least 3 updates, those whose ‖Δ‖₂ exceeds `multiple` × the
/// median of the round's norms are outliers. The median is the reference because an attacker
/// cannot move it without controlling half the round; below 3 updates there is no majority to
/// be relative to, and a median of 0 (most clients sent nothing) gives no scale either.
/// `multiple` 0 turns the rule off. Norms were measured on receipt (no decoding here).
pub fn norm_outliers(norms: &BTreeMap<String, f64>, multiple: f64) -> Vec<Excluded> {
    if multiple <= 0.0 || norms.len() < 3 {
        return Vec::new();
    }
    let mut sorted: Vec<f64> = norms.values().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let median = median_sorted(&sorted);
    if !(median > 0.0 && median.is_finite()) {
        return Vec::new();
    }
    let bound = multiple * median;
    norms
        .iter()
        .filter(|(_, &n)| n > bound)
        .map(|(cid, n)| Excluded {
            client_id: cid.clone(),
            reason: ExcludeReason::NormOutlier,
            detail: format!("‖Δ‖₂ = {n:.6e} exceeds {multiple} × the round's median {median:.6e}"),
        })
        .collect()
}

/// Which update to leave out when the aggregate is not finite: the one with the largest norm
/// (its values bound its contribution to every coordinate), ties by client id. `None` when no
/// update is left.
pub fn overflow_culprit(norms: &BTreeMap<String, f64>) -> Option<Excluded> {
    let (cid, n) = norms
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))?;
    Some(Excluded {
        client_id: cid.clone(),
        reason: ExcludeReason::NonFiniteAggregate,
        detail: format!(
            "the aggregate overflowed to ±∞ with this update (‖Δ‖₂ = {n:.6e}, the round's largest)"
        ),
    })
}

/// Whether every value of the model is finite.
pub fn all_finite(model: &TensorSet) -> bool {
    model.values().all(|t| t.data.iter().all(|x| x.is_finite()))
}

/// A coordinate-wise statistic over the clients' values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Coordinatewise {
    /// Mean after cutting ⌊fraction·n⌋ values at each end (scipy's `trim_mean`).
    TrimmedMean(f64),
    /// The middle value; the mean of the two middle ones for an even count (`np.median`).
    Median,
}

/// `global += server_lr · stat(Δ₁…Δₙ)` for one tensor, coordinate by coordinate: `deltas` holds
/// every included client's values of this tensor (so memory is n × one tensor, never n models).
/// Computed in f64 and rounded once; an overflow shows up as ±∞ in `global`.
pub fn robust_step(
    stat: Coordinatewise,
    server_lr: f64,
    global: &mut [f32],
    deltas: &[Vec<f32>],
) -> Result<()> {
    anyhow::ensure!(!deltas.is_empty(), "no deltas to combine");
    anyhow::ensure!(
        deltas.iter().all(|d| d.len() == global.len()),
        "delta lengths differ from the tensor's {}",
        global.len()
    );
    let n = deltas.len();
    let cut = match stat {
        Coordinatewise::TrimmedMean(f) => ((f * n as f64).floor() as usize).min((n - 1) / 2),
        Coordinatewise::Median => 0,
    };
    let mut column = vec![0.0f64; n];
    for (j, x) in global.iter_mut().enumerate() {
        for (c, d) in column.iter_mut().zip(deltas) {
            *c = f64::from(d[j]);
        }
        column.sort_by(f64::total_cmp);
        let v = match stat {
            Coordinatewise::TrimmedMean(_) => {
                let kept = &column[cut..n - cut];
                kept.iter().sum::<f64>() / kept.len() as f64
            }
            Coordinatewise::Median => median_sorted(&column),
        };
        *x = (f64::from(*x) + server_lr * v) as f32;
    }
    Ok(())
}

/// The median of sorted, non-empty values.
fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Writes a global model into the state dir under its id and returns the id. The encoding is
/// streamed into a temporary file and hashed on the way (the id is the SHA-256 of exactly these
/// bytes: canonical encoding, no metadata), so no encoded copy of the model is ever in memory;
/// the file is synced, then renamed onto `<id>.safetensors`.
pub fn save_model(store: &Store, tensors: &TensorSet) -> Result<String> {
    let dir = store.models_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".saving-{}.tmp", std::process::id()));
    let written = (|| -> std::io::Result<String> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let mut hasher = StreamHasher::new();
        let mut failed = None;
        write_safetensors_to(tensors, &Default::default(), &mut |b| {
            hasher.update(b);
            if failed.is_none() {
                failed = out.write_all(b).err();
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(hasher.finalize_hex())
    })();
    let id = match written {
        Ok(id) => id,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing {}", tmp.display()));
        }
    };
    let path = store.model_path(&id);
    if path.exists() {
        // Content-addressed: the same model is there already, and must not be replaced
        // under a mapping that serves it.
        let _ = std::fs::remove_file(&tmp);
        return Ok(id);
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming onto {}", path.display()))?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all(); // the rename itself survives a power loss
    }
    Ok(id)
}

/// Reads a global model by id (see [`read_model_file`]).
pub fn load_model(store: &Store, model_id: &str) -> Result<TensorSet> {
    read_model_file(&store.model_path(model_id))
}

/// Reads a global model file, streamed one tensor at a time: never the file's bytes and the
/// decoded model at once.
pub fn read_model_file(path: &Path) -> Result<TensorSet> {
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let len = file.metadata()?.len();
    let (tensors, _) = read_safetensors_from(&mut BufReader::with_capacity(1 << 20, file), len)
        .with_context(|| format!("decoding {}", path.display()))?;
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::tensor::Tensor;

    fn set(vals: &[f32]) -> TensorSet {
        [(
            "w".to_string(),
            Tensor {
                shape: vec![vals.len()],
                data: vals.to_vec(),
            },
        )]
        .into()
    }

    #[test]
    fn models_are_saved_streamed_under_their_content_id() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let m = set(&[1.0, -2.5, 3.0]);
        let id = save_model(&store, &m).unwrap();
        let bytes = std::fs::read(store.model_path(&id)).unwrap();
        let encoded = shared_proto::tensor::write_safetensors(&m, &Default::default());
        assert_eq!(bytes, encoded);
        assert_eq!(id, shared_proto::hash::sha256_hex(&bytes));
        assert_eq!(load_model(&store, &id).unwrap(), m);
        // Saved again: the same id, one file, no temporary left behind.
        assert_eq!(save_model(&store, &m).unwrap(), id);
        let files = std::fs::read_dir(store.models_dir()).unwrap().count();
        assert_eq!(files, 1);
        // A damaged file is an error, not a model.
        std::fs::write(store.model_path(&id), &bytes[..bytes.len() - 1]).unwrap();
        assert!(load_model(&store, &id).is_err());
    }

    #[test]
    fn weighted_average_server_step() {
        let mut g = set(&[1.0, 1.0]);
        let mut step = ServerStep::new(&mut g, 4.0, 1.0).unwrap();
        step.add_tensor(1.0, "w", &[1.0, 0.0]).unwrap();
        step.add_tensor(3.0, "w", &[0.0, 4.0]).unwrap();
        assert_eq!(g["w"].data, vec![1.25, 4.0]);
        // The server learning rate scales the averaged delta.
        let mut g = set(&[0.0]);
        let mut step = ServerStep::new(&mut g, 2.0, 0.5).unwrap();
        step.add_tensor(2.0, "w", &[4.0]).unwrap();
        assert_eq!(g["w"].data, vec![2.0]);
    }

    #[test]
    fn trimmed_mean_and_median_per_coordinate() {
        // Five clients; coordinate 0 has an outlier at each end, coordinate 1 one huge value.
        let deltas: Vec<Vec<f32>> = [
            [-100.0, 1.0],
            [1.0, 2.0],
            [2.0, 3.0],
            [3.0, 4.0],
            [100.0, 1000.0],
        ]
        .iter()
        .map(|r| r.to_vec())
        .collect();
        // trim 0.2 of 5 cuts one value at each end: mean of {1,2,3} and of {2,3,4}.
        let mut g = vec![10.0f32, 0.0];
        robust_step(Coordinatewise::TrimmedMean(0.2), 1.0, &mut g, &deltas).unwrap();
        assert_eq!(g, vec![12.0, 3.0]);
        // trim 0.1 of 5 cuts nothing (⌊0.5⌋ = 0): the plain mean, as scipy's trim_mean.
        let mut g = vec![0.0f32, 0.0];
        robust_step(Coordinatewise::TrimmedMean(0.1), 1.0, &mut g, &deltas).unwrap();
        assert_eq!(g, vec![1.2, 202.0]);
        let mut g = vec![0.0f32, 1.0];
        robust_step(Coordinatewise::Median, 0.5, &mut g, &deltas).unwrap();
        assert_eq!(g, vec![1.0, 2.5], "median 2 and 3, scaled by server_lr 0.5");
        // An even count takes the mean of the two middle values.
        let mut g = vec![0.0f32];
        let four: Vec<Vec<f32>> = [[4.0], [1.0], [-7.0], [2.0]]
            .iter()
            .map(|r| r.to_vec())
            .collect();
        robust_step(Coordinatewise::Median, 1.0, &mut g, &four).unwrap();
        assert_eq!(g, vec![1.5]);
        // Mismatched lengths or no clients are errors, not panics.
        assert!(robust_step(Coordinatewise::Median, 1.0, &mut g, &deltas).is_err());
        assert!(robust_step(Coordinatewise::Median, 1.0, &mut g, &[]).is_err());
    }

    #[test]
    fn coordinatewise_overflow_shows_as_non_finite() {
        let big = vec![vec![f32::MAX], vec![f32::MAX], vec![f32::MAX]];
        let mut g = vec![0.0f32];
        robust_step(Coordinatewise::Median, 2.0, &mut g, &big).unwrap();
        assert!(!all_finite(&set(&g)));
        assert!(all_finite(&set(&[1.0, -2.0])));
    }

    fn norms(v: &[(&str, f64)]) -> BTreeMap<String, f64> {
        v.iter().map(|(c, n)| (c.to_string(), *n)).collect()
    }

    #[test]
    fn norm_outliers_are_relative_to_the_median() {
        let n = norms(&[("a", 1.0), ("b", 1.2), ("c", 0.9), ("evil", 1000.0)]);
        let out = norm_outliers(&n, 10.0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].client_id, "evil");
        assert_eq!(out[0].reason, ExcludeReason::NormOutlier);
        // Median of {0.9, 1, 1.2, x} is 1.1: 11.5 is over 10×, 10.9 is not.
        let n = norms(&[("a", 1.0), ("b", 1.2), ("c", 0.9), ("d", 11.5)]);
        assert_eq!(norm_outliers(&n, 10.0).len(), 1);
        let n = norms(&[("a", 1.0), ("b", 1.2), ("c", 0.9), ("d", 10.9)]);
        assert!(norm_outliers(&n, 10.0).is_empty());
        // Fewer than 3 updates: no majority to be relative to.
        assert!(norm_outliers(&norms(&[("a", 1.0), ("evil", 1e9)]), 10.0).is_empty());
        // Off, or no scale (a median of 0).
        let n = norms(&[("a", 1.0), ("b", 1.0), ("evil", 1e9)]);
        assert!(norm_outliers(&n, 0.0).is_empty());
        assert_eq!(norm_outliers(&n, 10.0).len(), 1);
        let n = norms(&[("a", 0.0), ("b", 0.0), ("c", 5.0)]);
        assert!(norm_outliers(&n, 10.0).is_empty());
    }

    #[test]
    fn overflow_culprit_is_the_largest_norm() {
        let n = norms(&[("a", 1.0), ("big", 3e38), ("b", 2.0)]);
        let c = overflow_culprit(&n).unwrap();
        assert_eq!(
            (c.client_id.as_str(), c.reason),
            ("big", ExcludeReason::NonFiniteAggregate)
        );
        assert!(overflow_culprit(&BTreeMap::new()).is_none());
    }

    #[test]
    fn bad_weights_names_and_lengths_fail_without_touching_the_model() {
        let mut g = set(&[2.0]);
        let mut step = ServerStep::new(&mut g, 1.0, 1.0).unwrap();
        assert!(step.add_tensor(0.0, "w", &[1.0]).is_err());
        assert!(step.add_tensor(f64::NAN, "w", &[1.0]).is_err());
        assert!(step.add_tensor(1.0, "w", &[1.0, 2.0]).is_err());
        assert!(step.add_tensor(1.0, "other", &[1.0]).is_err());
        assert_eq!(g["w"].data, vec![2.0]);
        // No contributions: nothing can be added, the model stays.
        let mut step = ServerStep::new(&mut g, 0.0, 1.0).unwrap();
        assert!(step.add_tensor(1.0, "w", &[1.0]).is_err());
        assert!(ServerStep::new(&mut g, f64::INFINITY, 1.0).is_err());
        assert_eq!(g["w"].data, vec![2.0]);
    }
}
