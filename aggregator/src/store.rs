//! The aggregator's state directory: atomic files, the round state, models, enrolled keys and
//! the update spool.
//!
//! Layout:
//! ```text
//! <state_dir>/state.json                    round state (RoundState), replaced atomically
//! <state_dir>/aggregator.key|.pub           the aggregator's ed25519 signing key pair (PEM)
//! <state_dir>/keys.json                     enrolled client keys: client id → public key PEM
//! <state_dir>/models/<model_id>.safetensors global models (trainable tensors, f32)
//! <state_dir>/spool/r<round>/<cid>/<i>      update chunks as they arrive
//! <state_dir>/accepted/r<round>/<cid>.delta verified, accepted update blobs
//! <state_dir>/rounds/round_NNN.json         per-round summary (metrics, who dropped)
//! <state_dir>/federated_metrics.json        every round's summary, oldest first
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::round::RoundState;

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file, never a torn
/// one: write a sibling temp file, fsync it, rename over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    if let Ok(d) = fs::File::open(dir) {
        // Directory fsync makes the rename itself durable; not supported everywhere, so best effort.
        let _ = d.sync_all();
    }
    Ok(())
}

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
    pub fn model_path(&self, model_id: &str) -> PathBuf {
        self.dir
            .join("models")
            .join(format!("{model_id}.safetensors"))
    }
    pub fn spool_dir(&self, round: u64, cid: &str) -> PathBuf {
        self.dir.join("spool").join(format!("r{round}")).join(cid)
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
        write_atomic(&self.state_path(), &serde_json::to_vec_pretty(s)?)
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
        write_atomic(&self.keys_path(), &serde_json::to_vec_pretty(k)?)
    }
}

/// Client ids become path components and topic levels: keep them to a safe alphabet.
pub fn valid_client_id(cid: &str) -> bool {
    !cid.is_empty()
        && cid.len() <= 64
        && cid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !cid.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path().join("sub")).unwrap().count(), 1);
    }

    #[test]
    fn client_ids_are_path_safe() {
        assert!(valid_client_id("robot-1_a.b"));
        assert!(!valid_client_id("../x"));
        assert!(!valid_client_id("a/b"));
        assert!(!valid_client_id(""));
        assert!(!valid_client_id("+"));
    }
}
