//! The update an agent sends for a round: the worker's delta encoded with the configured
//! codec, one signed manifest (with every chunk's hash), and the blob whose slices are the
//! chunks.

use anyhow::{Context, Result};
use bytes::Bytes;
use shared_proto::codec::{encode_delta, Codec, EncodeOptions};
use shared_proto::message::{self, RoundAnnouncement, UpdateManifest, PROTOCOL_VERSION};
use shared_proto::sign::KeyPair;
use shared_proto::Sha256Hex;

use super::config::AgentConfig;
use super::worker::TrainOutput;

/// A signed update waiting for its ack.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub round: u64,
    pub deadline_ms: u64,
    /// The encoded delta; chunks are slices of it.
    pub blob: Bytes,
    pub chunk_size: usize,
    /// The signed, CBOR-encoded manifest.
    pub manifest: Bytes,
    /// The blob's hex SHA-256: acks name it.
    pub sha256: Sha256Hex,
    /// When the manifest was last sent (0: never): with no answer for the ack wait it is sent
    /// again, and the aggregator re-acks, names missing chunks or gives its verdict.
    pub sent_ms: u64,
    /// Chunk resends asked for by the aggregator this round (bounded by the core).
    pub resends: u32,
    /// The id of the upload of this update in progress or last finished.
    pub upload_id: u64,
}

impl Outbound {
    pub fn chunk_count(&self) -> u32 {
        shared_proto::chunk::chunk_count(self.blob.len(), self.chunk_size.max(1))
    }
}

/// Encodes the worker's delta with `cfg`'s codec, checks it against the round's size cap and
/// signs its manifest with `key`.
pub fn encode_update(
    cfg: &AgentConfig,
    key: &KeyPair,
    ann: &RoundAnnouncement,
    out: TrainOutput,
) -> Result<Outbound> {
    let delta = out.delta().context("the worker's result")?;
    let codec: Codec = cfg
        .codec
        .parse()
        .map_err(|e| anyhow::anyhow!("codec {:?}: {e}", cfg.codec))?;
    let opts = EncodeOptions {
        codec,
        zstd_level: cfg.zstd_level,
    };
    let blob = encode_delta(&delta, &opts, None).context("encoding the delta")?;
    anyhow::ensure!(
        blob.len() as u64 <= ann.max_update_bytes,
        "encoded update of {} bytes exceeds the round's cap of {}",
        blob.len(),
        ann.max_update_bytes
    );
    let chunk_size = (ann.chunk_size as usize).max(1);
    let m = &out.metrics;
    let examples = if cfg.examples > 0 {
        cfg.examples
    } else {
        m.examples.max(1)
    };
    let mut manifest = UpdateManifest {
        v: PROTOCOL_VERSION,
        federation: cfg.federation.clone(),
        client_id: cfg.client_id.clone(),
        round: ann.round,
        base_model_id: ann.model_id.clone(),
        codec: codec.to_string(),
        total_len: 0,
        chunk_count: 0,
        chunk_size: 0,
        sha256: Default::default(),
        examples,
        metrics: m.report.clone(),
        chunk_sha256: Vec::new(),
        signature: Vec::new(),
    };
    manifest.describe_blob(&blob, chunk_size as u32);
    manifest.sign_with(key);
    Ok(Outbound {
        round: ann.round,
        deadline_ms: ann.deadline_unix_ms,
        blob: Bytes::from(blob),
        chunk_size,
        manifest: Bytes::from(message::encode(&manifest)),
        sha256: manifest.sha256,
        sent_ms: 0,
        resends: 0,
        upload_id: 0,
    })
}
