//! Downloading a global model: verify the signed manifest against the pinned aggregator key,
//! request chunks a window at a time, reassemble, check the hash, cache by model id.
//!
//! Pure state (no MQTT): the daemon subscribes to whatever [`ModelFetch::wanted`] returns and
//! feeds received chunks to [`ModelFetch::insert`]. Chunks are subscribed one topic each rather
//! than with a wildcard because brokers may cap how many retained messages one subscription
//! delivers at once (rumqttd drops those past its inflight window).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared_proto::chunk::Reassembly;
use shared_proto::message::{ModelBlobKind, ModelManifest, TensorInfo};
use shared_proto::sign::PublicKey;
use shared_proto::tensor::ModelSpec;
use shared_proto::ModelId;

/// Why a model download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("model manifest: {0}")]
    Manifest(String),
    /// A chunk that is not the one the signed manifest lists (another publisher's): dropped,
    /// and the genuine one awaited on the same topic.
    #[error("model chunk {0} does not match its signed hash")]
    ForgedChunk(u32),
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

/// A model in the cache: its file and the tensors its signed manifest listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    pub path: PathBuf,
    pub spec: ModelSpec,
}

/// What [`ModelFetch::finish`] records next to a model it verified (`<id>.json`): the file's
/// size and mtime then, and the manifest's tensor list.
#[derive(Debug, Serialize, Deserialize)]
struct Sidecar {
    len: u64,
    mtime_ns: u128,
    tensors: Vec<TensorInfo>,
}

fn sidecar_path(cache_dir: &Path, model_id: &str) -> PathBuf {
    cache_dir.join("models").join(format!("{model_id}.json"))
}

fn mtime_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// The cached model `model_id`, if [`ModelFetch::finish`] verified and wrote it and the file
/// is unchanged since (same size and mtime): a stat and a small read, not a re-hash of the
/// whole model every round. A file without its sidecar, or changed, is not trusted.
pub fn cached(cache_dir: &Path, model_id: &str) -> Option<CachedModel> {
    let path = cache_path(cache_dir, model_id);
    let meta = std::fs::metadata(&path).ok()?;
    let side: Sidecar =
        serde_json::from_slice(&std::fs::read(sidecar_path(cache_dir, model_id)).ok()?).ok()?;
    (side.len == meta.len() && side.mtime_ns == mtime_ns(&meta)).then(|| CachedModel {
        path,
        spec: ModelSpec {
            tensors: side
                .tensors
                .into_iter()
                .map(|t| (t.name, t.shape))
                .collect(),
        },
    })
}

/// An in-progress download of one model.
#[derive(Debug)]
pub struct ModelFetch {
    model_id: ModelId,
    manifest: Option<ModelManifest>,
    reassembly: Option<Reassembly>,
    /// Chunk topics currently subscribed.
    inflight: BTreeSet<u32>,
    window: u32,
    max_len: u64,
}

impl ModelFetch {
    pub fn new(model_id: ModelId, window: u32, max_len: u64) -> Self {
        ModelFetch {
            model_id,
            manifest: None,
            reassembly: None,
            inflight: BTreeSet::new(),
            window: window.max(1),
            max_len,
        }
    }

    pub fn model_id(&self) -> &ModelId {
        &self.model_id
    }

    /// Chunk indices currently requested (subscribed) and not yet received.
    pub fn inflight(&self) -> impl Iterator<Item = u32> + '_ {
        self.inflight.iter().copied()
    }

    pub fn is_inflight(&self, index: u32) -> bool {
        self.inflight.contains(&index)
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
        if m.sha256.as_str() != m.model_id.as_str() {
            return Err(FetchError::Manifest(
                "manifest hash differs from the model id".into(),
            ));
        }
        if !m.chunk_sha256.is_empty() && !m.chunk_hashes_complete() {
            return Err(FetchError::Manifest(
                "chunk hash list does not match the chunk count".into(),
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

    /// Stores a chunk. Empty payloads (a cleared retained message) are ignored. A chunk not
    /// matching the manifest's hash for it stays missing and in flight (the aggregator puts
    /// its own back on the topic).
    pub fn insert(&mut self, index: u32, bytes: &[u8]) -> Result<(), FetchError> {
        if bytes.is_empty() {
            self.inflight.remove(&index);
            return Ok(());
        }
        if let Some(want) = self.manifest.as_ref().and_then(|m| m.chunk_hash(index)) {
            if shared_proto::hash::sha256(bytes)[..] != *want {
                return Err(FetchError::ForgedChunk(index));
            }
        }
        self.inflight.remove(&index);
        if let Some(r) = &mut self.reassembly {
            r.insert(index, bytes)?;
        }
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.reassembly.as_ref().is_some_and(|r| r.is_complete())
    }

    /// Verifies the whole blob (its SHA-256 is the model id) and writes it into the cache,
    /// with the sidecar that lets [`cached`] trust it later without hashing it again.
    pub fn finish(self, cache_dir: &Path) -> Result<CachedModel, FetchError> {
        let (Some(r), Some(m)) = (self.reassembly, self.manifest) else {
            return Err(FetchError::Manifest("no manifest".into()));
        };
        let bytes = r.finish()?;
        let path = cache_path(cache_dir, &self.model_id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let side_path = sidecar_path(cache_dir, &self.model_id);
        // The sidecar goes last: a crash in between leaves a model that is fetched again.
        let _ = std::fs::remove_file(&side_path);
        let tmp = path.with_extension("part");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)?;
        let meta = std::fs::metadata(&path)?;
        let side = Sidecar {
            len: meta.len(),
            mtime_ns: mtime_ns(&meta),
            tensors: m.tensors,
        };
        let tmp = side_path.with_extension("json.part");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&side).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &side_path)?;
        Ok(cached(cache_dir, &self.model_id).ok_or_else(|| {
            std::io::Error::other("the cached model changed while it was written")
        })?)
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
            model_id: id.clone().into(),
            round: 1,
            tensors: vec![shared_proto::message::TensorInfo {
                name: "w".into(),
                shape: vec![blob.len() / 4],
            }],
            total_len: blob.len() as u64,
            chunk_count: shared_proto::chunk::chunk_count(blob.len(), chunk as usize),
            chunk_size: chunk,
            sha256: id.into(),
            chunk_sha256: Vec::new(),
            kind: ModelBlobKind::Full,
            signature: Vec::new(),
        };
        m.sign_with(key);
        m
    }

    /// A manifest as today's aggregator signs it: with every chunk's hash.
    fn manifest_with_chunk_hashes(blob: &[u8], chunk: u32, key: &KeyPair) -> ModelManifest {
        let mut m = manifest(blob, chunk, key);
        m.describe_blob(blob, chunk);
        m.sign_with(key);
        m
    }

    #[test]
    fn a_chunk_not_matching_its_signed_hash_is_dropped_and_the_genuine_one_awaited() {
        let key = KeyPair::generate();
        let blob: Vec<u8> = (0..300u32).map(|i| (i % 199) as u8).collect();
        let m = manifest_with_chunk_hashes(&blob, 128, &key);
        let mut f = ModelFetch::new(m.model_id.clone(), 4, 1 << 20);
        f.on_manifest(m.clone(), &key.public()).unwrap();
        assert_eq!(f.wanted(), vec![0, 1, 2]);
        let err = f.insert(1, &[0x5a; 128]).unwrap_err();
        assert!(matches!(err, FetchError::ForgedChunk(1)), "{err}");
        assert!(f.is_inflight(1), "still subscribed for the genuine chunk");
        for i in [0usize, 2, 1] {
            f.insert(i as u32, &blob[i * 128..((i + 1) * 128).min(300)])
                .unwrap();
        }
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            std::fs::read(f.finish(d.path()).unwrap().path).unwrap(),
            blob
        );
        // A signed list that does not cover every chunk is refused with the manifest.
        let mut short = manifest_with_chunk_hashes(&blob, 128, &key);
        short.chunk_sha256.truncate(64);
        short.sign_with(&key);
        let mut g = ModelFetch::new(short.model_id.clone(), 4, 1 << 20);
        assert!(g.on_manifest(short, &key.public()).is_err());
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
        let c = f.finish(d.path()).unwrap();
        assert_eq!(std::fs::read(&c.path).unwrap(), blob);
        assert_eq!(c.spec.tensors["w"], vec![2500]);
        assert_eq!(cached(d.path(), &m.model_id), Some(c.clone()));
        // A file changed after it was verified is not trusted (and fetched again).
        std::fs::write(&c.path, b"tampered").unwrap();
        assert_eq!(cached(d.path(), &m.model_id), None);
        // Nor is a file that only has the right name, with no sidecar from a verified fetch.
        let other = tempfile::tempdir().unwrap();
        let p = cache_path(other.path(), &m.model_id);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &blob).unwrap();
        assert_eq!(cached(other.path(), &m.model_id), None);
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
