//! The agent ↔ training-worker contract's one data type: the metrics file the worker
//! (`zk0-train train --out-metrics <file>`) writes as JSON and the agent reads back, then
//! reports to the aggregator as [`ClientMetrics`].
//!
//! Reading is lenient on purpose (other workers honour the same contract): unknown keys are
//! ignored and missing ones read as 0.

use serde::{Deserialize, Serialize};

use crate::message::ClientMetrics;

/// What one local training run reports: the metrics the agent forwards to the aggregator,
/// plus what only the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerMetrics {
    /// Loss, proximal term, norms, steps and seconds: reported as they are.
    #[serde(flatten)]
    pub report: ClientMetrics,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_missing_and_extra_keys() {
        let m = WorkerMetrics {
            report: ClientMetrics {
                loss: 1.5,
                steps: 3,
                ..ClientMetrics::default()
            },
            examples: 7,
            ..WorkerMetrics::default()
        };
        assert_eq!(WorkerMetrics::from_json(&m.to_json()).unwrap(), m);
        // The file is flat: the reported fields sit beside `examples`.
        let v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(
            (v["loss"].as_f64(), v["examples"].as_u64()),
            (Some(1.5), Some(7))
        );
        let m = WorkerMetrics::from_json(br#"{"loss": 2, "examples": 9, "extra": true}"#).unwrap();
        assert_eq!((m.report.loss, m.examples, m.report.steps), (2.0, 9, 0));
        assert!(WorkerMetrics::from_json(b"{\"loss\": \"high\"}").is_err());
    }
}
