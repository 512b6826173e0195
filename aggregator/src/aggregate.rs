//! FedProx/FedAvg server step and global-model files.
//!
//! `global += server_lr · Σ wᵢ·Δᵢ / Σ wᵢ`, with wᵢ the client's example count. Every weight is
//! known before the first delta is read (the accepted updates are on disk), so each delta is
//! folded straight into the global model, one tensor at a time as it is decoded: memory is one
//! model plus one update's encoded blob, whatever the number of clients. Clients are folded in
//! sorted id order, so a resumed round produces bit-identical results.

use anyhow::{Context, Result};
use shared_proto::tensor::{read_safetensors, write_safetensors, TensorSet};

use zk0_daemon::{write_atomic, Durability};

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

/// Writes a global model into the state dir under its id; returns the id and the bytes
/// written (to publish without reading the file back).
pub fn save_model(store: &Store, tensors: &TensorSet) -> Result<(String, Vec<u8>)> {
    // The id is the SHA-256 of exactly these bytes (canonical encoding, no metadata).
    let bytes = write_safetensors(tensors, &Default::default());
    let id = shared_proto::hash::sha256_hex(&bytes);
    let path = store.model_path(&id);
    if !path.exists() {
        write_atomic(&path, &bytes, Durability::Durable)?;
    }
    Ok((id, bytes))
}

/// Reads a global model by id.
pub fn load_model(store: &Store, model_id: &str) -> Result<(Vec<u8>, TensorSet)> {
    let path = store.model_path(model_id);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let (tensors, _) =
        read_safetensors(&bytes).with_context(|| format!("decoding {}", path.display()))?;
    Ok((bytes, tensors))
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
