//! The aggregator's state directory: the round state, models, enrolled keys and
//! the update spool.
//!
//! Layout:
//! ```text
//! <state_dir>/state.json                    round state (RoundState), replaced atomically
//! <state_dir>/aggregator.key|.pub           the aggregator's ed25519 signing key pair (PEM)
//! <state_dir>/keys.json                     enrolled client keys: client id → public key PEM
//! <state_dir>/models/<model_id>.safetensors global models (trainable tensors, f32)
//! <state_dir>/spool/r<round>/<cid>.part     an upload's chunks, in place (see `spool`)
//! <state_dir>/spool/r<round>/<cid>.chunks   which chunks of it are stored
//! <state_dir>/accepted/r<round>/<cid>.delta verified, accepted update blobs
//! <state_dir>/rounds/round_NNN.json         per-round summary (metrics, who dropped)
//! <state_dir>/federated_metrics.json        every round's summary, oldest first
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use shared_proto::message::Freshness;

use zk0_daemon::{write_atomic, Durability};

use crate::round::RoundState;

/// Enrolled client keys.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct KeyRegistry {
    /// client id → enrolled key.
    pub clients: BTreeMap<String, EnrolledKey>,
}

/// One enrolled client key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrolledKey {
    pub public_key_pem: String,
    pub fingerprint: String,
    pub enrolled_unix_ms: u64,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("aggregator.key")
    }
    pub fn pub_path(&self) -> PathBuf {
        self.dir.join("aggregator.pub")
    }
    pub fn keys_path(&self) -> PathBuf {
        self.dir.join("keys.json")
    }
    /// `models/`: the global models, one file per id.
    pub fn models_dir(&self) -> PathBuf {
        self.dir.join("models")
    }

    pub fn model_path(&self, model_id: &str) -> PathBuf {
        self.models_dir().join(format!("{model_id}.safetensors"))
    }
    pub fn spool_round_dir(&self, round: u64) -> PathBuf {
        self.dir.join("spool").join(format!("r{round}"))
    }
    pub fn accepted_path(&self, round: u64, cid: &str) -> PathBuf {
        self.dir
            .join("accepted")
            .join(format!("r{round}"))
            .join(format!("{cid}.delta"))
    }
    pub fn accepted_round_dir(&self, round: u64) -> PathBuf {
        self.dir.join("accepted").join(format!("r{round}"))
    }
    /// Scratch space of a round close (coordinate-wise strategies), removed when it is done.
    pub fn scratch_round_dir(&self, round: u64) -> PathBuf {
        self.dir.join("scratch").join(format!("r{round}"))
    }
    /// The freshness of each client's newest status (so a restart refuses older replays).
    pub fn statuses_path(&self) -> PathBuf {
        self.dir.join("client_statuses.json")
    }
    pub fn round_summary_path(&self, round: u64) -> PathBuf {
        self.dir
            .join("rounds")
            .join(format!("round_{round:03}.json"))
    }

    pub fn load_state(&self) -> Result<Option<RoundState>> {
        let p = self.state_path();
        match fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save_state(&self, s: &RoundState) -> Result<()> {
        // Durable: the state dir is what a restart resumes from.
        Ok(write_atomic(
            &self.state_path(),
            &serde_json::to_vec_pretty(s)?,
            Durability::Durable,
        )?)
    }

    /// The statuses' freshness as last saved (none: an empty map; unreadable: an error).
    pub fn load_statuses(&self) -> Result<BTreeMap<String, Freshness>> {
        let p = self.statuses_path();
        match fs::read(&p) {
            Ok(b) => {
                Ok(serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", p.display()))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save_statuses(&self, s: &BTreeMap<String, Freshness>) -> Result<()> {
        // Atomic is enough: after a power loss the worst is an older floor.
        Ok(write_atomic(
            &self.statuses_path(),
            &serde_json::to_vec_pretty(s)?,
            Durability::Atomic,
        )?)
    }

    pub fn load_keys(&self) -> Result<KeyRegistry> {
        let p = self.keys_path();
        match fs::read(&p) {
            Ok(b) => {
                Ok(serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", p.display()))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyRegistry::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save_keys(&self, k: &KeyRegistry) -> Result<()> {
        Ok(write_atomic(
            &self.keys_path(),
            &serde_json::to_vec_pretty(k)?,
            Durability::Durable,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_freshness_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        assert!(store.load_statuses().unwrap().is_empty(), "none saved yet");
        let saved: BTreeMap<String, Freshness> = [
            ("arm-a".to_string(), Freshness::status(7, false)),
            ("arm-b".to_string(), Freshness::status(9, true)),
        ]
        .into();
        store.save_statuses(&saved).unwrap();
        let loaded = store.load_statuses().unwrap();
        assert_eq!(loaded, saved);
        // arm-a's will of session 7 is in: its online status of session 7, replayed, is not.
        assert!(!loaded["arm-a"].admits(Freshness::status(7, true)));
        std::fs::write(store.statuses_path(), b"{not json").unwrap();
        assert!(store.load_statuses().is_err(), "a damaged file is an error");
    }
}
