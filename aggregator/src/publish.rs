//! What the aggregator publishes, as pure message building: the global model (retained chunks
//! as slices of one buffer, then the signed manifest), the round announcement, its status and
//! acks. The event loop only sends the [`Outgoing`]s.

use std::collections::BTreeMap;

use bytes::Bytes;
use shared_proto::chunk;
use shared_proto::message::{
    self, Ack, HyperParams, ModelBlobKind, ModelManifest, RoundAnnouncement, ServerStatus,
    PROTOCOL_VERSION,
};
use shared_proto::sign::KeyPair;
use shared_proto::tensor::ModelSpec;
use shared_proto::topic::Topics;

use crate::config::Config;
use crate::round::RoundState;

/// One MQTT publish (QoS 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

impl Outgoing {
    pub fn new(topic: String, payload: impl Into<Bytes>, retain: bool) -> Self {
        Outgoing {
            topic,
            payload: payload.into(),
            retain,
        }
    }
}

/// Model `id` (its safetensors `bytes`): retained chunks, sliced out of `bytes` without a copy,
/// then the signed manifest, so a client that sees the manifest finds every chunk.
pub fn model(
    topics: &Topics,
    id: &str,
    round: u64,
    bytes: &Bytes,
    spec: &ModelSpec,
    chunk_size: usize,
    signer: &KeyPair,
) -> Vec<Outgoing> {
    let chunk_size = chunk_size.max(1);
    let count = chunk::chunk_count(bytes.len(), chunk_size);
    let mut out: Vec<Outgoing> = (0..count)
        .map(|i| {
            let start = i as usize * chunk_size;
            let end = (start + chunk_size).min(bytes.len());
            Outgoing::new(topics.model_chunk(id, i), bytes.slice(start..end), true)
        })
        .collect();
    let mut manifest = ModelManifest {
        v: PROTOCOL_VERSION,
        model_id: id.to_string().into(),
        round,
        tensors: ModelManifest::tensor_infos(spec),
        total_len: 0,
        chunk_count: 0,
        chunk_size: 0,
        sha256: Default::default(),
        chunk_sha256: Vec::new(),
        kind: ModelBlobKind::Full,
        signature: Vec::new(),
    };
    // Length, count, whole-blob and per-chunk hashes (agents drop a chunk that is not ours).
    manifest.describe_blob(bytes, chunk_size as u32);
    manifest.sign_with(signer);
    out.push(Outgoing::new(
        topics.model_manifest(id),
        message::encode(&manifest),
        true,
    ));
    out
}

/// Empty retained publishes that delete model `id`'s `count` chunks and manifest from the
/// broker, so it never holds two models at once.
pub fn clear_model(topics: &Topics, id: &str, count: u32) -> Vec<Outgoing> {
    std::iter::once(topics.model_manifest(id))
        .chain((0..count).map(|i| topics.model_chunk(id, i)))
        .map(|t| Outgoing::new(t, Bytes::new(), true))
        .collect()
}

/// The retained announcement of the collecting round (`None` when none collects), with zk0's
/// schedules (warm restarts, stall, adaptive mu, per-client boosts) over the configured values.
/// Signed with sequence number `seq`.
pub fn announcement(
    topics: &Topics,
    state: &RoundState,
    cfg: &Config,
    seq: u64,
    signer: &KeyPair,
) -> Option<Outgoing> {
    let deadline = state.deadline_ms()?;
    let r = &cfg.rounds;
    let base = HyperParams {
        local_steps: r.local_steps,
        lr: r.lr,
        mu: r.mu,
        batch_size: r.batch_size,
        lr_overrides: BTreeMap::new(),
    };
    let ann = RoundAnnouncement {
        v: PROTOCOL_VERSION,
        federation: cfg.federation.clone(),
        seq,
        round: state.round,
        model_id: state.model_id.clone(),
        base_model: r.base_model.clone(),
        hyper: state.schedule.hyper(&cfg.schedule, &base, state.round),
        deadline_unix_ms: deadline,
        min_clients: r.min_clients as u32,
        selected: state.selected.iter().cloned().collect(),
        accepted_codecs: r.accepted_codecs.clone(),
        chunk_size: r.chunk_size as u32,
        max_update_bytes: r.max_update_bytes,
        signature: Vec::new(),
    }
    .signed(signer);
    Some(Outgoing::new(topics.round(), message::encode(&ann), true))
}

/// The aggregator's retained status of connection `session`, signed (also each connection's
/// last will, with `online: false`).
pub fn status(
    topics: &Topics,
    state: &RoundState,
    signer: &KeyPair,
    session: u64,
    online: bool,
    now_ms: u64,
) -> Outgoing {
    let s = ServerStatus {
        v: PROTOCOL_VERSION,
        federation: topics.federation().to_string(),
        session,
        online,
        round: state.round,
        model_id: Some(state.model_id.clone()),
        aggregator_key: signer.public().fingerprint(),
        ts_ms: now_ms,
        signature: Vec::new(),
    }
    .signed(signer);
    Outgoing::new(topics.server_status(), message::encode(&s), true)
}

/// The answer to `ack.client_id`'s update (not retained); `ack` is sealed already.
pub fn ack(topics: &Topics, ack: &Ack) -> Outgoing {
    Outgoing::new(
        topics.ack(&ack.client_id, ack.round),
        message::encode(ack),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::chunk::Reassembly;
    use shared_proto::tensor::{write_safetensors, Tensor};

    #[test]
    fn model_messages_reassemble_and_verify() {
        let topics = Topics::new("fed").unwrap();
        let key = KeyPair::generate();
        let mut set = shared_proto::tensor::TensorSet::new();
        set.insert(
            "w".into(),
            Tensor::new(vec![300], (0..300).map(|i| i as f32).collect()).unwrap(),
        );
        let bytes = Bytes::from(write_safetensors(&set, &BTreeMap::new()));
        let spec = ModelSpec::from_tensors(&set);
        let out = model(&topics, "abc", 2, &bytes, &spec, 256, &key);
        let (manifest, chunks) = out.split_last().unwrap();
        assert_eq!(manifest.topic, topics.model_manifest("abc"));
        let m: ModelManifest = message::decode(&manifest.payload, 1 << 20).unwrap();
        m.verify_with(&key.public()).unwrap();
        assert_eq!(m.chunk_count as usize, chunks.len());
        let mut r = Reassembly::new(
            m.total_len,
            m.chunk_count,
            m.chunk_size,
            shared_proto::hash::parse_sha256_hex(&m.sha256).unwrap(),
            u64::MAX,
        )
        .unwrap();
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.retain);
            assert_eq!(c.topic, topics.model_chunk("abc", i as u32));
            r.insert(i as u32, &c.payload).unwrap();
        }
        assert_eq!(r.finish().unwrap(), bytes.to_vec());
        let cleared = clear_model(&topics, "abc", m.chunk_count);
        assert_eq!(cleared.len(), chunks.len() + 1);
        assert!(cleared.iter().all(|o| o.payload.is_empty() && o.retain));
    }
}
