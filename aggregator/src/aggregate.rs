//! FedProx/FedAvg server step and global-model files.
//!
//! `global += server_lr · Σ wᵢ·Δᵢ / Σ wᵢ`, with wᵢ the client's example count. Deltas are
//! folded one at a time into a single f32 accumulator, so memory is about two models (global +
//! accumulator) plus the one delta being read, whatever the number of clients. Clients are
//! folded in sorted id order, so a resumed round produces bit-identical results.

use anyhow::{Context, Result};
use shared_proto::tensor::{read_safetensors, write_safetensors, ModelSpec, TensorSet};

use crate::store::{write_atomic, Store};

/// Running weighted sum of deltas.
#[derive(Debug)]
pub struct Accumulator {
    sum: TensorSet,
    total_weight: f64,
}

impl Accumulator {
    /// A zero accumulator shaped like `spec`.
    pub fn new(spec: &ModelSpec) -> Self {
        let sum = spec
            .tensors
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                (
                    name.clone(),
                    shared_proto::tensor::Tensor {
                        shape: shape.clone(),
                        data: vec![0.0; n],
                    },
                )
            })
            .collect();
        Accumulator {
            sum,
            total_weight: 0.0,
        }
    }

    /// Adds `weight · delta`. The delta was validated against the model spec on receipt, so a
    /// mismatch here is an internal error.
    pub fn add(&mut self, weight: f64, delta: &TensorSet) -> Result<()> {
        anyhow::ensure!(
            weight > 0.0 && weight.is_finite(),
            "weight {weight} must be positive"
        );
        // Check every tensor before touching any, so a bad delta leaves the sum unchanged.
        for (name, acc) in &self.sum {
            let d = delta
                .get(name)
                .with_context(|| format!("delta lacks {name}"))?;
            anyhow::ensure!(
                d.data.len() == acc.data.len(),
                "delta {name} has the wrong length"
            );
        }
        let w = weight as f32;
        for (name, acc) in self.sum.iter_mut() {
            if let Some(d) = delta.get(name) {
                for (a, x) in acc.data.iter_mut().zip(&d.data) {
                    *a += w * *x;
                }
            }
        }
        self.total_weight += weight;
        Ok(())
    }

    /// Applies the server step to `global` in place. With no contributions the model is kept.
    pub fn apply(&self, global: &mut TensorSet, server_lr: f64) -> Result<()> {
        if self.total_weight <= 0.0 {
            return Ok(());
        }
        let scale = (server_lr / self.total_weight) as f32;
        for (name, acc) in &self.sum {
            let g = global
                .get_mut(name)
                .with_context(|| format!("global model lacks {name}"))?;
            anyhow::ensure!(
                g.data.len() == acc.data.len(),
                "global {name} has the wrong length"
            );
            for (x, a) in g.data.iter_mut().zip(&acc.data) {
                *x += scale * *a;
            }
        }
        Ok(())
    }
}

/// Writes a global model into the state dir under its id and returns the id.
pub fn save_model(store: &Store, tensors: &TensorSet) -> Result<String> {
    // The id is the SHA-256 of exactly these bytes (canonical encoding, no metadata).
    let bytes = write_safetensors(tensors, &Default::default());
    let id = shared_proto::hash::sha256_hex(&bytes);
    let path = store.model_path(&id);
    if !path.exists() {
        write_atomic(&path, &bytes)?;
    }
    Ok(id)
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
        let spec = ModelSpec::from_tensors(&g);
        let mut acc = Accumulator::new(&spec);
        acc.add(1.0, &set(&[1.0, 0.0])).unwrap();
        acc.add(3.0, &set(&[0.0, 4.0])).unwrap();
        acc.apply(&mut g, 1.0).unwrap();
        assert_eq!(g["w"].data, vec![1.25, 4.0]);
    }

    #[test]
    fn no_contributions_keep_the_model_and_bad_weights_fail() {
        let mut g = set(&[2.0]);
        let mut acc = Accumulator::new(&ModelSpec::from_tensors(&g));
        assert!(acc.add(0.0, &set(&[1.0])).is_err());
        assert!(acc.add(1.0, &set(&[1.0, 2.0])).is_err());
        acc.apply(&mut g, 1.0).unwrap();
        assert_eq!(g["w"].data, vec![2.0]);
    }
}
