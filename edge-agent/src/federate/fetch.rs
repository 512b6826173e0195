//! Downloading a global model: verify the signed manifest against the pinned aggregator key,
//! request chunks a window at a time, reassemble, check the hash, cache by model id.
//!
//! Pure state (no MQTT): the daemon subscribes to whatever [`ModelFetch::wanted`] returns and
//! feeds received chunks to [`ModelFetch::insert`]. Chunks are subscribed one topic each rather
//! than with a wildcard because brokers may cap how many retained messages one subscription
//! delivers at once (rumqttd drops those past its inflight window).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use shared_proto::chunk::Reassembly;
use shared_proto::message::{ModelBlobKind, ModelManifest};
use shared_proto::sign::PublicKey;

/// Why a model download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("model manifest: {0}")]
    Manifest(String),
    #[error(transparent)]
    Proto(#[from] shared_proto::ProtoError),
    #[error("caching the model: {0}")]
    Io(#[from] std::io::Error),
}

/// Path of a cached model.
pub fn cache_path(cache_dir: &Path, model_id: &str) -> PathBuf {
    cache_dir
        .join("models")
        .join(format!("{model_id}.safetensors"))
}

/// Whether a cached file exists and really is `model_id` (its SHA-256).
pub fn cached(cache_dir: &Path, model_id: &str) -> Option<PathBuf> {
    let p = cache_path(cache_dir, model_id);
    let bytes = std::fs::read(&p).ok()?;
    (shared_proto::hash::sha256_hex(&bytes) == model_id).then_some(p)
}

/// An in-progress download of one model.
#[derive(Debug)]
pub struct ModelFetch {
    pub model_id: String,
    manifest: Option<ModelManifest>,
    reassembly: Option<Reassembly>,
    /// Chunk topics currently subscribed.
    pub inflight: BTreeSet<u32>,
    window: u32,
    max_len: u64,
}

impl ModelFetch {
    pub fn new(model_id: String, window: u32, max_len: u64) -> Self {
        ModelFetch {
            model_id,
            manifest: None,
            reassembly: None,
            inflight: BTreeSet::new(),
            window: window.max(1),
            max_len,
        }
    }

    pub fn has_manifest(&self) -> bool {
        self.manifest.is_some()
    }

    /// Accepts the manifest if it is for this model, a full model, and signed by `pinned`.
    pub fn on_manifest(&mut self, m: ModelManifest, pinned: &PublicKey) -> Result<(), FetchError> {
        if self.manifest.is_some() {
            return Ok(());
        }
        if m.model_id != self.model_id {
            return Err(FetchError::Manifest(format!(
                "manifest is for {}, wanted {}",
                m.model_id, self.model_id
            )));
        }
        m.verify_with(pinned)
            .map_err(|e| FetchError::Manifest(format!("aggregator signature: {e}")))?;
        if m.kind != ModelBlobKind::Full {
            return Err(FetchError::Manifest(
                "only full-model manifests are fetched".into(),
            ));
        }
        // The id is the hash of the blob; a manifest that disagrees cannot be right.
        if m.sha256 != m.model_id {
            return Err(FetchError::Manifest(
                "manifest hash differs from the model id".into(),
            ));
        }
        self.reassembly = Some(m.reassembly(self.max_len)?);
        self.manifest = Some(m);
        Ok(())
    }

    /// Chunk indices to subscribe to next (missing, not yet in flight, within the window).
    pub fn wanted(&mut self) -> Vec<u32> {
        let Some(r) = &self.reassembly else {
            return Vec::new();
        };
        let room = self.window.saturating_sub(self.inflight.len() as u32) as usize;
        let next: Vec<u32> = r
            .missing()
            .into_iter()
            .filter(|i| !self.inflight.contains(i))
            .take(room)
            .collect();
        self.inflight.extend(next.iter().copied());
        next
    }

    /// Forget what was in flight (after a reconnect the subscriptions are gone).
    pub fn reset_inflight(&mut self) {
        self.inflight.clear();
    }

    /// Stores a chunk. Empty payloads (a cleared retained message) are ignored.
    pub fn insert(&mut self, index: u32, bytes: &[u8]) -> Result<(), FetchError> {
        self.inflight.remove(&index);
        if bytes.is_empty() {
            return Ok(());
        }
        if let Some(r) = &mut self.reassembly {
            r.insert(index, bytes)?;
        }
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.reassembly.as_ref().is_some_and(|r| r.is_complete())
    }

    /// Verifies the whole blob and writes it into the cache; returns its path.
    pub fn finish(self, cache_dir: &Path) -> Result<PathBuf, FetchError> {
        let r = self
            .reassembly
            .ok_or_else(|| FetchError::Manifest("no manifest".into()))?;
        let bytes = r.finish()?;
        let path = cache_path(cache_dir, &self.model_id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("part");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::message::{ModelManifest, PROTOCOL_VERSION};
    use shared_proto::sign::KeyPair;

    fn manifest(blob: &[u8], chunk: u32, key: &KeyPair) -> ModelManifest {
        let id = shared_proto::hash::sha256_hex(blob);
        let mut m = ModelManifest {
            v: PROTOCOL_VERSION,
            model_id: id.clone(),
            round: 1,
            tensors: Vec::new(),
            total_len: blob.len() as u64,
            chunk_count: shared_proto::chunk::chunk_count(blob.len(), chunk as usize),
            chunk_size: chunk,
            sha256: id,
            kind: ModelBlobKind::Full,
            signature: Vec::new(),
        };
        m.sign_with(key);
        m
    }

    #[test]
    fn fetches_in_windows_verifies_and_caches() {
        let key = KeyPair::generate();
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let m = manifest(&blob, 1000, &key);
        let mut f = ModelFetch::new(m.model_id.clone(), 3, 1 << 20);
        assert!(
            f.wanted().is_empty(),
            "nothing is requested before the manifest"
        );
        f.on_manifest(m.clone(), &key.public()).unwrap();
        let mut rounds = 0;
        while !f.is_complete() {
            let want = f.wanted();
            assert!(!want.is_empty() && want.len() <= 3);
            // Deliver in reverse with a duplicate: order and repeats do not matter.
            for &i in want.iter().rev() {
                let s = i as usize * 1000;
                f.insert(i, &blob[s..(s + 1000).min(blob.len())]).unwrap();
            }
            f.insert(want[0], &blob[want[0] as usize * 1000..][..1000])
                .unwrap();
            rounds += 1;
            assert!(rounds < 10);
        }
        let d = tempfile::tempdir().unwrap();
        let p = f.finish(d.path()).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), blob);
        assert_eq!(cached(d.path(), &m.model_id), Some(p));
    }

    #[test]
    fn rejects_a_manifest_not_signed_by_the_pinned_key_or_for_another_model() {
        let key = KeyPair::generate();
        let blob = vec![7u8; 100];
        let m = manifest(&blob, 64, &KeyPair::generate());
        let mut f = ModelFetch::new(m.model_id.clone(), 2, 1 << 20);
        assert!(f.on_manifest(m, &key.public()).is_err());
        let other = manifest(&[1u8; 10], 64, &key);
        assert!(f.on_manifest(other, &key.public()).is_err());
        assert!(!f.has_manifest());
    }

    #[test]
    fn a_corrupted_chunk_fails_the_hash_and_nothing_is_cached() {
        let key = KeyPair::generate();
        let blob = vec![3u8; 100];
        let m = manifest(&blob, 64, &key);
        let mut f = ModelFetch::new(m.model_id.clone(), 4, 1 << 20);
        f.on_manifest(m.clone(), &key.public()).unwrap();
        f.wanted();
        f.insert(0, &[9u8; 64]).unwrap();
        f.insert(1, &blob[64..]).unwrap();
        let d = tempfile::tempdir().unwrap();
        assert!(f.finish(d.path()).is_err());
        assert_eq!(cached(d.path(), &m.model_id), None);
    }
}
