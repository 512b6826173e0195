//! The agent ↔ training-worker contract's one data type: the metrics file the worker
//! (`zk0-train train --out-metrics <file>`) writes as JSON and the agent reads back, then
//! reports to the aggregator as [`ClientMetrics`].
//!
//! Reading is lenient on purpose (other workers honour the same contract): unknown keys are
//! ignored and missing ones read as 0.

use serde::{Deserialize, Serialize};

use crate::message::ClientMetrics;

/// What one local training run reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerMetrics {
    /// Mean flow-matching loss over the steps.
    pub loss: f64,
    /// Mean proximal term (mu/2)·‖θ − θ_global‖².
    pub fedprox_loss: f64,
    /// Gradient norm of the last step, before clipping.
    pub grad_norm: f64,
    /// ‖θ_trained − θ_global‖ over the trainable tensors.
    pub update_norm: f64,
    pub steps: u64,
    pub seconds: f64,
    /// Training examples seen (the aggregation weight unless the agent's config overrides it).
    pub examples: u64,
    /// Tensors in the worker's output (informational).
    pub trainable_tensors: u64,
}

impl WorkerMetrics {
    /// The JSON the worker writes.
    pub fn to_json(&self) -> Vec<u8> {
        // Plain numbers and no maps with non-string keys: serialization cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses a worker's metrics file.
    pub fn from_json(bytes: &[u8]) -> Result<WorkerMetrics, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// What the agent reports with its update.
    pub fn client_metrics(&self) -> ClientMetrics {
        ClientMetrics {
            loss: self.loss,
            fedprox_loss: self.fedprox_loss,
            grad_norm: self.grad_norm,
            update_norm: self.update_norm,
            steps: self.steps,
            seconds: self.seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_missing_and_extra_keys() {
        let m = WorkerMetrics {
            loss: 1.5,
            examples: 7,
            steps: 3,
            ..WorkerMetrics::default()
        };
        assert_eq!(WorkerMetrics::from_json(&m.to_json()).unwrap(), m);
        let m =
            WorkerMetrics::from_json(br#"{"loss": 2.5, "examples": 9, "extra": true}"#).unwrap();
        assert_eq!((m.loss, m.examples, m.steps), (2.5, 9, 0));
        assert_eq!(m.client_metrics().loss, 2.5);
        assert!(WorkerMetrics::from_json(b"{\"loss\": \"high\"}").is_err());
    }
}
