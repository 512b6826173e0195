//! Versioned CBOR payloads, one struct per topic (see [`crate::topic`]).
//!
//! Every message carries `v`; [`decode`] checks it against [`PROTOCOL_VERSION`] before parsing
//! the rest, so a peer on another version gets `WrongVersion` rather than a confusing parse error.
//! Every message is signed by its publisher over `signing_bytes()`: a domain tag per message
//! kind plus the message's CBOR with `signature` emptied. Field order is declaration order, so
//! the encoding is canonical for a given protocol version. The aggregator signs what steers
//! the fleet (round announcements, acks, its status, models); a client signs its status and its
//! updates. Signed content names the federation, and a round, a sequence number or a session,
//! so a message neither replays into another federation nor rolls a receiver back (see
//! [`Freshness`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::chunk::Reassembly;
use crate::hash::parse_sha256_hex;
use crate::sign::{KeyPair, PublicKey};
use crate::tensor::ModelSpec;
use crate::{ModelId, ProtoError, Sha256Hex};

/// Version of every payload defined here; bump on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 2;

/// Our messages nest a few levels at most; a low limit keeps hostile input far from the stack
/// limit even on small (tokio worker) stacks.
const CBOR_RECURSION_LIMIT: usize = 32;

/// Encodes a message as CBOR.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing plain structs into a Vec cannot fail.
    let _ = ciborium::into_writer(msg, &mut out);
    out
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u16,
}

/// Decodes a message: size cap first, then the `v` field, then the whole struct.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, ProtoError> {
    if bytes.len() > max_len {
        return Err(ProtoError::Oversize {
            what: "message",
            len: bytes.len() as u64,
            max: max_len as u64,
        });
    }
    let probe: VersionProbe = from_cbor(bytes)?;
    if probe.v != PROTOCOL_VERSION {
        return Err(ProtoError::WrongVersion {
            found: probe.v,
            expected: PROTOCOL_VERSION,
        });
    }
    from_cbor(bytes)
}

fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtoError> {
    ciborium::de::from_reader_with_recursion_limit(bytes, CBOR_RECURSION_LIMIT)
        .map_err(|e| ProtoError::Cbor(e.to_string()))
}

/// Default cap for control messages (manifests list every tensor, so allow some room).
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 4 << 20;

// ---------------------------------------------------------------------------------------------
// Messages

/// `server/status`, retained; also the aggregator's last will (with `online: false`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub v: u16,
    pub federation: String,
    /// The connection this status belongs to (see [`Freshness::status`]).
    pub session: u64,
    pub online: bool,
    pub round: u64,
    pub model_id: Option<ModelId>,
    /// The aggregator's public key fingerprint (or compact key), for agents to check their pin.
    pub aggregator_key: String,
    pub ts_ms: u64,
    #[serde(with = "cbor_bytes")]
    pub signature: Vec<u8>,
}

/// Hyper-parameters of one round's local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HyperParams {
    pub local_steps: u32,
    pub lr: f64,
    /// FedProx proximal weight.
    pub mu: f64,
    pub batch_size: u32,
    /// Per-client learning rates (zk0's LR boost for lagging clients); absent = `lr`.
    #[serde(default)]
    pub lr_overrides: BTreeMap<String, f64>,
}

impl HyperParams {
    pub fn lr_for(&self, client_id: &str) -> f64 {
        self.lr_overrides.get(client_id).copied().unwrap_or(self.lr)
    }
}

/// `round`, retained: what the current round is and how to take part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnouncement {
    pub v: u16,
    pub federation: String,
    /// The aggregator's sequence number, increasing across rounds and restarts: an agent never
    /// goes back to an announcement older than one it has acted on.
    pub seq: u64,
    pub round: u64,
    /// The global model clients train from (and their deltas are against).
    pub model_id: ModelId,
    /// Name of the pretrained base (e.g. `lerobot/smolvla_base`), for cold starts.
    pub base_model: String,
    pub hyper: HyperParams,
    pub deadline_unix_ms: u64,
    pub min_clients: u32,
    /// Client ids taking part; empty means every client.
    pub selected: Vec<String>,
    /// Codec strings (see [`crate::codec::Codec`]) the aggregator accepts.
    pub accepted_codecs: Vec<String>,
    pub chunk_size: u32,
    pub max_update_bytes: u64,
    #[serde(with = "cbor_bytes")]
    pub signature: Vec<u8>,
}

impl RoundAnnouncement {
    pub fn is_selected(&self, client_id: &str) -> bool {
        self.selected.is_empty() || self.selected.iter().any(|c| c == client_id)
    }
}

/// One tensor's name and shape, as listed in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

/// What a model blob is.
///
/// - `Full`: the model's canonical safetensors ([`crate::tensor::write_safetensors`] with no
///   metadata), so the blob's SHA-256 *is* the model id ([`crate::tensor::model_id`]).
/// - `DeltaFrom`: [`crate::codec::encode_delta`] output against the agent's cached
///   `base_model_id`, a few MB instead of the whole model.
///
/// For a receiver to land exactly on `model_id` (a hash of f32 bits) after applying a
/// `DeltaFrom`, the publisher must define the new global model as
/// `base + decode(encoded delta)` (via [`crate::codec::apply_delta`] with scale 1), not as the
/// unquantized aggregate: `a + (b - a)` is not always `b` in floating point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelBlobKind {
    Full,
    DeltaFrom { base_model_id: ModelId },
}

/// `model/<id>/manifest`, retained, signed by the aggregator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub v: u16,
    pub model_id: ModelId,
    pub round: u64,
    pub tensors: Vec<TensorInfo>,
    pub total_len: u64,
    pub chunk_count: u32,
    pub chunk_size: u32,
    /// Hex SHA-256 of the whole (compressed) blob.
    pub sha256: Sha256Hex,
    /// SHA-256 of each chunk, 32 bytes per chunk in index order, so a receiver drops a chunk
    /// someone else published on the model's topics and waits for the genuine one. Empty from
    /// an aggregator before this field (then only the whole blob is checked).
    #[serde(with = "cbor_bytes", default)]
    pub chunk_sha256: Vec<u8>,
    pub kind: ModelBlobKind,
    #[serde(with = "cbor_bytes")]
    pub signature: Vec<u8>,
}

/// `client/<cid>/status`, retained; also the agent's last will (with `online: false`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientStatus {
    pub v: u16,
    pub federation: String,
    /// The connection this status belongs to (see [`Freshness::status`]).
    pub session: u64,
    pub client_id: String,
    pub online: bool,
    pub dataset: String,
    pub examples: u64,
    pub hardware: HardwareInfo,
    pub version: String,
    /// The agent's public key, compact form or PEM ([`PublicKey::parse`] takes both).
    pub public_key: String,
    #[serde(with = "cbor_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardwareInfo {
    pub cpu: String,
    pub cores: u32,
    pub mem_bytes: u64,
    pub gpu: Option<String>,
}

/// Training metrics an agent reports with its update, as its worker wrote them
/// ([`crate::worker::WorkerMetrics`] carries them). A missing field reads as 0: the numbers
/// are informational (the aggregation weight is the manifest's `examples`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientMetrics {
    pub loss: f64,
    pub fedprox_loss: f64,
    pub grad_norm: f64,
    pub update_norm: f64,
    pub steps: u64,
    pub seconds: f64,
}

/// `client/<cid>/update/<round>/manifest`, signed by the agent, sent before the chunks: the
/// aggregator stores a chunk only if it matches its hash here, so chunks injected on the
/// client's topics by anyone else are discarded instead of spoiling the upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateManifest {
    pub v: u16,
    pub federation: String,
    pub client_id: String,
    pub round: u64,
    pub base_model_id: ModelId,
    pub codec: String,
    pub total_len: u64,
    pub chunk_count: u32,
    pub chunk_size: u32,
    /// Hex SHA-256 of the whole encoded delta.
    pub sha256: Sha256Hex,
    pub examples: u64,
    pub metrics: ClientMetrics,
    /// SHA-256 of each chunk, 32 bytes per chunk in index order.
    #[serde(with = "cbor_bytes")]
    pub chunk_sha256: Vec<u8>,
    #[serde(with = "cbor_bytes")]
    pub signature: Vec<u8>,
}

/// `client/<cid>/ack/<round>`: the aggregator's verdict on an update, or a request for chunks.
/// Signed, and bound to the update it answers by `update_sha256`: an agent acts only on an
/// ack for the blob it sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub v: u16,
    pub federation: String,
    /// The aggregator's sequence number when it answered.
    pub seq: u64,
    pub client_id: String,
    pub round: u64,
    /// Hex SHA-256 of the update blob (the manifest's `sha256`) this answers.
    pub update_sha256: Sha256Hex,
    pub accepted: bool,
    pub reason: Option<RejectReason>,
    pub detail: String,
    /// Not a verdict yet: the manifest was accepted and these chunks are still wanted (all of
    /// them at first; later those a broker dropped under backlog). The client sends them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<u32>,
    #[serde(with = "cbor_bytes")]
    pub signature: Vec<u8>,
}

impl Ack {
    pub fn accepted(client_id: &str, round: u64) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            federation: String::new(),
            seq: 0,
            client_id: client_id.to_owned(),
            round,
            update_sha256: Sha256Hex::default(),
            accepted: true,
            reason: None,
            detail: String::new(),
            missing: Vec::new(),
            signature: Vec::new(),
        }
    }

    /// A request to resend the `missing` chunks of an update (not a rejection).
    pub fn incomplete(client_id: &str, round: u64, missing: Vec<u32>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            federation: String::new(),
            seq: 0,
            client_id: client_id.to_owned(),
            round,
            update_sha256: Sha256Hex::default(),
            accepted: false,
            reason: None,
            detail: format!("{} chunk(s) missing", missing.len()),
            missing,
            signature: Vec::new(),
        }
    }

    /// True for a resend request rather than a verdict.
    pub fn is_incomplete(&self) -> bool {
        !self.accepted && !self.missing.is_empty()
    }

    pub fn rejected(
        client_id: &str,
        round: u64,
        reason: RejectReason,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            federation: String::new(),
            seq: 0,
            client_id: client_id.to_owned(),
            round,
            update_sha256: Sha256Hex::default(),
            accepted: false,
            reason: Some(reason),
            detail: detail.into(),
            missing: Vec::new(),
            signature: Vec::new(),
        }
    }

    /// A rejection carrying `err`'s reason and message.
    pub fn from_error(client_id: &str, round: u64, err: &ProtoError) -> Self {
        Self::rejected(client_id, round, err.reject_reason(), err.to_string())
    }

    /// Binds the ack to the federation and the update it answers, and signs it.
    pub fn seal(
        mut self,
        federation: &str,
        update_sha256: &Sha256Hex,
        seq: u64,
        key: &KeyPair,
    ) -> Self {
        federation.clone_into(&mut self.federation);
        self.update_sha256 = update_sha256.clone();
        self.seq = seq;
        self.sign_with(key);
        self
    }

    /// Whether this ack answers the update whose blob hash is `sha256` (compared as bytes).
    pub fn answers(&self, sha256: &str) -> bool {
        matches!(
            (parse_sha256_hex(&self.update_sha256), parse_sha256_hex(sha256)),
            (Ok(a), Ok(b)) if a == b
        )
    }
}

/// Why an update (or message) was rejected; `as_str` is stable, for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    MalformedMessage,
    WrongVersion,
    HashMismatch,
    BadSignature,
    UnknownKey,
    ShapeMismatch,
    NonFinite,
    Oversize,
    NormBound,
    LateOrOldRound,
    WrongBaseModel,
    DuplicateUpdate,
    ChunkFlood,
    UnsupportedCodec,
    NotSelected,
    Internal,
    /// `examples` (the aggregation weight) over the aggregator's `max_examples` or the dataset
    /// size the client reported.
    WeightBound,
}

impl RejectReason {
    /// Every reason, so metrics can register all label values up front.
    pub const ALL: [RejectReason; 17] = [
        Self::MalformedMessage,
        Self::WrongVersion,
        Self::HashMismatch,
        Self::BadSignature,
        Self::UnknownKey,
        Self::ShapeMismatch,
        Self::NonFinite,
        Self::Oversize,
        Self::NormBound,
        Self::LateOrOldRound,
        Self::WrongBaseModel,
        Self::DuplicateUpdate,
        Self::ChunkFlood,
        Self::UnsupportedCodec,
        Self::NotSelected,
        Self::Internal,
        Self::WeightBound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedMessage => "malformed_message",
            Self::WrongVersion => "wrong_version",
            Self::HashMismatch => "hash_mismatch",
            Self::BadSignature => "bad_signature",
            Self::UnknownKey => "unknown_key",
            Self::ShapeMismatch => "shape_mismatch",
            Self::NonFinite => "non_finite",
            Self::Oversize => "oversize",
            Self::NormBound => "norm_bound",
            Self::LateOrOldRound => "late_or_old_round",
            Self::WrongBaseModel => "wrong_base_model",
            Self::DuplicateUpdate => "duplicate_update",
            Self::ChunkFlood => "chunk_flood",
            Self::UnsupportedCodec => "unsupported_codec",
            Self::NotSelected => "not_selected",
            Self::Internal => "internal",
            Self::WeightBound => "weight_bound",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Signing, freshness and blob helpers

/// Domain tags keep a signature over one kind of message from verifying as another.
const MODEL_MANIFEST_TAG: &[u8] = b"zk0/v2/model-manifest\0";
const UPDATE_MANIFEST_TAG: &[u8] = b"zk0/v2/update-manifest\0";
const ROUND_TAG: &[u8] = b"zk0/v2/round\0";
const ACK_TAG: &[u8] = b"zk0/v2/ack\0";
const SERVER_STATUS_TAG: &[u8] = b"zk0/v2/server-status\0";
const CLIENT_STATUS_TAG: &[u8] = b"zk0/v2/client-status\0";

macro_rules! signed_message {
    ($ty:ty, $tag:expr) => {
        impl $ty {
            /// What the signature covers: a domain tag + this message's CBOR with `signature`
            /// emptied.
            pub fn signing_bytes(&self) -> Vec<u8> {
                let mut unsigned = self.clone();
                unsigned.signature = Vec::new();
                let mut out = $tag.to_vec();
                out.extend_from_slice(&encode(&unsigned));
                out
            }

            /// Fills `signature`.
            pub fn sign_with(&mut self, key: &KeyPair) {
                self.signature = key.sign(&self.signing_bytes()).to_vec();
            }

            /// This message, signed.
            pub fn signed(mut self, key: &KeyPair) -> Self {
                self.sign_with(key);
                self
            }

            pub fn verify_with(&self, key: &PublicKey) -> Result<(), ProtoError> {
                key.verify(&self.signing_bytes(), &self.signature)
            }
        }
    };
}

signed_message!(ModelManifest, MODEL_MANIFEST_TAG);
signed_message!(UpdateManifest, UPDATE_MANIFEST_TAG);
signed_message!(RoundAnnouncement, ROUND_TAG);
signed_message!(Ack, ACK_TAG);
signed_message!(ServerStatus, SERVER_STATUS_TAG);
signed_message!(ClientStatus, CLIENT_STATUS_TAG);

macro_rules! blob_manifest {
    ($ty:ty) => {
        impl $ty {
            /// The blob's SHA-256 as bytes.
            pub fn sha256_bytes(&self) -> Result<[u8; 32], ProtoError> {
                parse_sha256_hex(&self.sha256)
            }

            /// A reassembly buffer for the blob this manifest describes, refusing blobs over
            /// `max_len` and manifests whose length, count and chunk size disagree.
            pub fn reassembly(&self, max_len: u64) -> Result<Reassembly, ProtoError> {
                Reassembly::new(
                    self.total_len,
                    self.chunk_count,
                    self.chunk_size,
                    self.sha256_bytes()?,
                    max_len,
                )
            }

            /// Describes `blob` cut into `chunk_size` chunks: length, count, hash and chunk
            /// hashes.
            pub fn describe_blob(&mut self, blob: &[u8], chunk_size: u32) {
                self.total_len = blob.len() as u64;
                self.chunk_size = chunk_size;
                self.chunk_count =
                    crate::chunk::chunk_count(blob.len(), chunk_size.max(1) as usize);
                self.sha256 = Sha256Hex::of(blob);
                self.chunk_sha256 = crate::chunk::split(blob, chunk_size.max(1) as usize)
                    .flat_map(crate::hash::sha256)
                    .collect();
            }

            /// The signed SHA-256 of chunk `index`, if the manifest lists one.
            pub fn chunk_hash(&self, index: u32) -> Option<&[u8]> {
                let start = usize::try_from(index).ok()?.checked_mul(32)?;
                self.chunk_sha256.get(start..start.checked_add(32)?)
            }

            /// Whether the chunk hash list has one entry per chunk.
            pub fn chunk_hashes_complete(&self) -> bool {
                self.chunk_sha256.len() as u64 == u64::from(self.chunk_count) * 32
            }
        }
    };
}

blob_manifest!(ModelManifest);
blob_manifest!(UpdateManifest);

/// The newest signed message a receiver has acted on, per publisher, so that an older one
/// (a replay, or a rollback to an earlier round's announcement) is refused.
///
/// Announcements are ordered by the aggregator's `seq`. Statuses are ordered by
/// `(session, offline)`: each connection of a publisher gets a larger session number, its
/// online status and its last will carry that number, and within one session the offline
/// status (the will, or the goodbye) supersedes the online one. So a will published by the
/// broker after a drop is fresh, and replaying an old online status after it is not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Freshness(pub u64, pub bool);

impl Freshness {
    pub fn announcement(ann: &RoundAnnouncement) -> Self {
        Freshness(ann.seq, false)
    }

    pub fn status(session: u64, online: bool) -> Self {
        Freshness(session, !online)
    }

    /// `next` is at least as new as `self` (an equal one is the same message delivered again).
    pub fn admits(self, next: Freshness) -> bool {
        next >= self
    }
}

impl ModelManifest {
    /// The names and shapes the model (or delta) blob must decode to.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            tensors: self
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
        }
    }

    /// The tensor list of a spec, in name order.
    pub fn tensor_infos(spec: &ModelSpec) -> Vec<TensorInfo> {
        spec.tensors
            .iter()
            .map(|(name, shape)| TensorInfo {
                name: name.clone(),
                shape: shape.clone(),
            })
            .collect()
    }
}

/// `Vec<u8>` as a CBOR byte string (serde's default would be an array of integers, ~2× larger).
mod cbor_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            // Also accept an array of small integers, as other CBOR encoders may write.
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn update_manifest() -> UpdateManifest {
        UpdateManifest {
            v: PROTOCOL_VERSION,
            federation: "lab".into(),
            client_id: "robot-1".into(),
            round: 3,
            base_model_id: "ab".repeat(32).into(),
            codec: "topk:0.01".into(),
            total_len: 2_500_000,
            chunk_count: 3,
            chunk_size: 1 << 20,
            sha256: "cd".repeat(32).into(),
            examples: 1200,
            metrics: ClientMetrics {
                loss: 0.5,
                fedprox_loss: 0.51,
                grad_norm: 2.0,
                update_norm: 0.1,
                steps: 100,
                seconds: 12.5,
            },
            chunk_sha256: vec![9; 96],
            signature: Vec::new(),
        }
    }

    pub(crate) fn model_manifest() -> ModelManifest {
        ModelManifest {
            v: PROTOCOL_VERSION,
            model_id: "ef".repeat(32).into(),
            round: 4,
            tensors: vec![
                TensorInfo {
                    name: "w".into(),
                    shape: vec![2, 3],
                },
                TensorInfo {
                    name: "b".into(),
                    shape: vec![3],
                },
            ],
            total_len: 100,
            chunk_count: 1,
            chunk_size: 1 << 20,
            sha256: "01".repeat(32).into(),
            chunk_sha256: vec![5; 32],
            kind: ModelBlobKind::DeltaFrom {
                base_model_id: "23".repeat(32).into(),
            },
            signature: Vec::new(),
        }
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(msg: &T) {
        let bytes = encode(msg);
        assert_eq!(&decode::<T>(&bytes, DEFAULT_MAX_MESSAGE_LEN).unwrap(), msg);
        // Every strict prefix is an error, never a panic or a different message.
        for cut in 0..bytes.len() {
            assert!(decode::<T>(&bytes[..cut], DEFAULT_MAX_MESSAGE_LEN).is_err());
        }
    }

    #[test]
    fn all_messages_round_trip() {
        let key = KeyPair::generate();
        round_trip(&server_status().signed(&key));
        round_trip(&announcement().signed(&key));
        let mut m = model_manifest();
        m.sign_with(&key);
        round_trip(&m);
        round_trip(&ModelManifest {
            chunk_sha256: Vec::new(),
            kind: ModelBlobKind::Full,
            ..model_manifest()
        });
        round_trip(&client_status().signed(&key));
        round_trip(&update_manifest().signed(&key));
        for reason in RejectReason::ALL.iter().copied().map(Some).chain([None]) {
            let ack = match reason {
                Some(r) => Ack::rejected("robot-1", 3, r, "because"),
                None => Ack::accepted("robot-1", 3),
            };
            round_trip(&ack.seal("lab", &("cd".repeat(32)).into(), 5, &key));
        }
        round_trip(&Ack::incomplete("robot-1", 3, vec![0, 7, 41]));
        assert!(Ack::incomplete("r", 1, vec![2]).is_incomplete());
        assert!(!Ack::accepted("r", 1).is_incomplete());
    }

    fn server_status() -> ServerStatus {
        ServerStatus {
            v: PROTOCOL_VERSION,
            federation: "lab".into(),
            session: 1_700_000_000_000,
            online: true,
            round: 7,
            model_id: Some("ab".repeat(32).into()),
            aggregator_key: "SHA256:xyz".into(),
            ts_ms: 1_700_000_000_000,
            signature: Vec::new(),
        }
    }

    fn client_status() -> ClientStatus {
        ClientStatus {
            v: PROTOCOL_VERSION,
            federation: "lab".into(),
            session: 1_700_000_000_001,
            client_id: "robot-1".into(),
            online: false,
            dataset: "lerobot/svla_so100_pickplace".into(),
            examples: 19631,
            hardware: HardwareInfo {
                cpu: "Cortex-A78AE".into(),
                cores: 12,
                mem_bytes: 64 << 30,
                gpu: Some("Orin".into()),
            },
            version: "0.1.0".into(),
            public_key: KeyPair::generate().public().to_compact(),
            signature: Vec::new(),
        }
    }

    fn announcement() -> RoundAnnouncement {
        let mut lr_overrides = BTreeMap::new();
        lr_overrides.insert("robot-2".to_string(), 1.15e-4);
        RoundAnnouncement {
            v: PROTOCOL_VERSION,
            federation: "lab".into(),
            seq: 1_700_000_000_002,
            round: 7,
            model_id: "ab".repeat(32).into(),
            base_model: "lerobot/smolvla_base".into(),
            hyper: HyperParams {
                local_steps: 50,
                lr: 1e-4,
                mu: 0.01,
                batch_size: 8,
                lr_overrides,
            },
            deadline_unix_ms: 1_700_000_600_000,
            min_clients: 2,
            selected: vec!["robot-1".into(), "robot-2".into()],
            accepted_codecs: vec!["int8".into(), "topk:0.01".into()],
            chunk_size: 1 << 20,
            max_update_bytes: 1 << 30,
            signature: Vec::new(),
        }
    }

    #[test]
    fn reject_reason_labels_are_stable_snake_case() {
        let labels: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        let unique: std::collections::BTreeSet<_> = labels.iter().collect();
        assert_eq!(unique.len(), labels.len());
        for r in RejectReason::ALL {
            // serde's name and as_str agree, so JSON/CBOR and metrics use the same label.
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(RejectReason::LateOrOldRound.as_str(), "late_or_old_round");
    }

    #[test]
    fn version_mismatch_and_oversize_are_rejected() {
        let mut m = update_manifest();
        m.v = 1;
        let bytes = encode(&m);
        assert!(matches!(
            decode::<UpdateManifest>(&bytes, DEFAULT_MAX_MESSAGE_LEN),
            Err(ProtoError::WrongVersion {
                found: 1,
                expected: 2
            })
        ));
        // A future version with a different shape still reports the version, not a parse error.
        #[derive(Serialize)]
        struct Future {
            v: u16,
            everything: Vec<u8>,
        }
        let bytes = encode(&Future {
            v: 9,
            everything: vec![1, 2],
        });
        assert!(matches!(
            decode::<Ack>(&bytes, 1000),
            Err(ProtoError::WrongVersion { found: 9, .. })
        ));
        let bytes = encode(&update_manifest());
        assert!(matches!(
            decode::<UpdateManifest>(&bytes, bytes.len() - 1),
            Err(ProtoError::Oversize { .. })
        ));
        assert!(matches!(
            decode::<UpdateManifest>(&[0xff, 0x00, 0x13], 100),
            Err(ProtoError::Cbor(_))
        ));
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        // 100k nested arrays, then 100k nested maps / tags: must be a clean error.
        for opener in [0x81u8, 0xa1, 0xc6] {
            let bytes = vec![opener; 100_000];
            assert!(decode::<Ack>(&bytes, 1 << 20).is_err());
        }
        // A map with `v` first and a deep value after it.
        let mut bytes = vec![0xa2, 0x61, b'v', 0x01, 0x61, b'x'];
        bytes.extend(std::iter::repeat_n(0x81u8, 100_000));
        bytes.push(0x00);
        assert!(decode::<Ack>(&bytes, 1 << 20).is_err());
    }

    #[test]
    fn signature_binds_every_field() {
        let key = KeyPair::generate();
        let mut m = update_manifest();
        m.sign_with(&key);
        assert_eq!(m.signature.len(), 64);
        assert!(m.verify_with(&key.public()).is_ok());
        assert!(m.verify_with(&KeyPair::generate().public()).is_err());

        let mutations: Vec<fn(&mut UpdateManifest)> = vec![
            |m| m.v += 1,
            |m| m.federation.push('x'),
            |m| m.client_id.push('x'),
            |m| m.round += 1,
            |m| m.base_model_id = "00".repeat(32).into(),
            |m| m.codec = "int8".into(),
            |m| m.total_len += 1,
            |m| m.chunk_count += 1,
            |m| m.chunk_size -= 1,
            |m| m.sha256 = "ce".repeat(32).into(),
            |m| m.examples += 1,
            |m| m.metrics.loss += 1e-9,
            |m| m.metrics.fedprox_loss = 0.0,
            |m| m.metrics.grad_norm = 3.0,
            |m| m.metrics.update_norm = 0.2,
            |m| m.metrics.steps += 1,
            |m| m.metrics.seconds = 1.0,
            |m| m.chunk_sha256[40] ^= 1,
            |m| m.signature[0] ^= 1,
        ];
        for (i, mutate) in mutations.iter().enumerate() {
            let mut changed = m.clone();
            mutate(&mut changed);
            assert!(
                changed.verify_with(&key.public()).is_err(),
                "mutation {i} still verifies"
            );
        }

        let mut mm = model_manifest();
        mm.sign_with(&key);
        assert!(mm.verify_with(&key.public()).is_ok());
        let model_mutations: Vec<fn(&mut ModelManifest)> = vec![
            |m| m.model_id = "00".repeat(32).into(),
            |m| m.round += 1,
            |m| m.tensors[0].shape = vec![3, 2],
            |m| m.tensors[1].name = "c".into(),
            |m| m.tensors.pop().map(drop).unwrap_or(()),
            |m| m.total_len += 1,
            |m| m.chunk_count += 1,
            |m| m.chunk_size += 1,
            |m| m.sha256 = "02".repeat(32).into(),
            |m| m.chunk_sha256[7] ^= 1,
            |m| m.kind = ModelBlobKind::Full,
        ];
        for (i, mutate) in model_mutations.iter().enumerate() {
            let mut changed = mm.clone();
            mutate(&mut changed);
            assert!(
                changed.verify_with(&key.public()).is_err(),
                "model mutation {i} still verifies"
            );
        }
    }

    #[test]
    fn control_messages_are_signed_over_federation_and_sequence() {
        let key = KeyPair::generate();
        let other = KeyPair::generate().public();
        let ann = announcement().signed(&key);
        assert!(ann.verify_with(&key.public()).is_ok());
        assert!(ann.verify_with(&other).is_err());
        let ann_mutations: Vec<fn(&mut RoundAnnouncement)> = vec![
            |a| a.federation.push('x'),
            |a| a.seq -= 1,
            |a| a.round += 1,
            |a| a.model_id = "00".repeat(32).into(),
            |a| a.hyper.lr *= 2.0,
            |a| a.hyper.local_steps += 1,
            |a| a.chunk_size = 1,
            |a| a.selected.clear(),
            |a| a.deadline_unix_ms += 1,
        ];
        for (i, mutate) in ann_mutations.iter().enumerate() {
            let mut changed = ann.clone();
            mutate(&mut changed);
            assert!(
                changed.verify_with(&key.public()).is_err(),
                "announcement mutation {i}"
            );
        }
        let ack = Ack::accepted("robot-1", 3).seal("lab", &("cd".repeat(32)).into(), 9, &key);
        assert!(ack.verify_with(&key.public()).is_ok());
        assert!(ack.answers(&"CD".repeat(32)) && !ack.answers(&"ce".repeat(32)));
        let ack_mutations: Vec<fn(&mut Ack)> = vec![
            |a| a.federation.push('x'),
            |a| a.seq += 1,
            |a| a.client_id.push('x'),
            |a| a.round += 1,
            |a| a.update_sha256 = "ce".repeat(32).into(),
            |a| a.accepted = false,
            |a| a.missing = vec![1],
        ];
        for (i, mutate) in ack_mutations.iter().enumerate() {
            let mut changed = ack.clone();
            mutate(&mut changed);
            assert!(
                changed.verify_with(&key.public()).is_err(),
                "ack mutation {i}"
            );
        }
        let st = server_status().signed(&key);
        let mut offline = st.clone();
        offline.online = false;
        assert!(st.verify_with(&key.public()).is_ok());
        assert!(offline.verify_with(&key.public()).is_err());
        let cs = client_status().signed(&key);
        let mut moved = cs.clone();
        moved.session += 1;
        assert!(cs.verify_with(&key.public()).is_ok());
        assert!(moved.verify_with(&key.public()).is_err());
        // Same key, other kind: tags keep an ack's signature off an announcement.
        let mut a2 = announcement();
        a2.signature = ack.signature.clone();
        assert!(a2.verify_with(&key.public()).is_err());
    }

    #[test]
    fn freshness_orders_announcements_and_statuses() {
        let a = |seq| {
            Freshness::announcement(&RoundAnnouncement {
                seq,
                ..announcement()
            })
        };
        assert!(a(5).admits(a(5)) && a(5).admits(a(6)) && !a(6).admits(a(5)));
        let online = Freshness::status(10, true);
        let will = Freshness::status(10, false);
        let next = Freshness::status(11, true);
        assert!(
            online.admits(will),
            "the will of a session supersedes its online status"
        );
        assert!(
            !will.admits(online),
            "an online status replayed after the will is stale"
        );
        assert!(will.admits(next) && !next.admits(will));
    }

    #[test]
    fn chunk_hashes_describe_the_blob() {
        let blob: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        let mut m = update_manifest();
        m.describe_blob(&blob, 100);
        assert_eq!((m.total_len, m.chunk_count, m.chunk_size), (250, 3, 100));
        assert!(m.chunk_hashes_complete());
        assert_eq!(m.chunk_hash(2).unwrap(), crate::hash::sha256(&blob[200..]));
        assert!(m.chunk_hash(3).is_none() && m.chunk_hash(u32::MAX).is_none());
        assert_eq!(m.sha256, crate::hash::sha256_hex(&blob));
    }

    #[test]
    fn signatures_do_not_transfer_between_manifest_kinds() {
        let key = KeyPair::generate();
        let mut u = update_manifest();
        u.sign_with(&key);
        let m = model_manifest();
        // Same key, but the tag differs: a signature over one manifest kind never verifies the other.
        let forged = ModelManifest {
            signature: u.signature.clone(),
            ..m
        };
        assert!(forged.verify_with(&key.public()).is_err());
        assert!(u.signing_bytes().starts_with(UPDATE_MANIFEST_TAG));
    }

    #[test]
    fn manifest_helpers() {
        let m = model_manifest();
        let spec = m.spec();
        assert_eq!(spec.tensors["w"], vec![2, 3]);
        assert_eq!(ModelManifest::tensor_infos(&spec).len(), 2);
        assert_eq!(m.sha256_bytes().unwrap(), [1u8; 32]);
        assert!(m.reassembly(1000).is_ok());
        assert!(matches!(m.reassembly(99), Err(ProtoError::Oversize { .. })));
        let bad = ModelManifest {
            chunk_count: 2,
            ..model_manifest()
        };
        assert!(bad.reassembly(1000).is_err());

        let hp = HyperParams {
            local_steps: 1,
            lr: 0.1,
            mu: 0.0,
            batch_size: 1,
            lr_overrides: [("a".to_string(), 0.2)].into(),
        };
        assert_eq!(hp.lr_for("a"), 0.2);
        assert_eq!(hp.lr_for("b"), 0.1);
    }

    #[test]
    fn signature_is_a_cbor_byte_string() {
        let mut m = update_manifest();
        m.signature = vec![7; 64];
        let bytes = encode(&m);
        // 0x58 0x40 = byte string of 64 bytes.
        assert!(bytes.windows(2).any(|w| w == [0x58, 0x40]));
    }

    #[test]
    fn ack_constructors() {
        let a = Ack::accepted("r1", 2);
        assert!(a.accepted && a.reason.is_none() && a.v == PROTOCOL_VERSION);
        let err = ProtoError::NonFinite("w".into());
        let r = Ack::from_error("r1", 2, &err);
        assert!(!r.accepted);
        assert_eq!(r.reason, Some(RejectReason::NonFinite));
        assert!(r.detail.contains("\"w\""));
    }

    #[test]
    fn errors_map_to_their_reasons() {
        use crate::ProtoError as E;
        let cases = [
            (
                E::Oversize {
                    what: "blob",
                    len: 2,
                    max: 1,
                },
                RejectReason::Oversize,
            ),
            (E::Cbor("x".into()), RejectReason::MalformedMessage),
            (
                E::WrongVersion {
                    found: 2,
                    expected: 1,
                },
                RejectReason::WrongVersion,
            ),
            (
                E::UnsupportedCodec("int4".into()),
                RejectReason::UnsupportedCodec,
            ),
            (
                E::ShapeMismatch {
                    name: "w".into(),
                    expected: vec![1],
                    found: vec![2],
                },
                RejectReason::ShapeMismatch,
            ),
            (E::MissingTensor("w".into()), RejectReason::ShapeMismatch),
            (E::NonFinite("w".into()), RejectReason::NonFinite),
            (
                E::HashMismatch {
                    expected: "a".into(),
                    actual: "b".into(),
                },
                RejectReason::HashMismatch,
            ),
            (E::BadSignature, RejectReason::BadSignature),
            (
                E::ChunkIndex { index: 9, count: 2 },
                RejectReason::ChunkFlood,
            ),
            (
                E::ChunkConflict { index: 1 },
                RejectReason::MalformedMessage,
            ),
        ];
        for (err, reason) in cases {
            assert_eq!(err.reject_reason(), reason, "{err}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn update_manifests_round_trip(
                client_id in "\\PC{0,20}",
                round in any::<u64>(),
                codec in "\\PC{0,12}",
                total_len in any::<u64>(),
                examples in any::<u64>(),
                loss in -1e300f64..1e300,
                signature in prop::collection::vec(any::<u8>(), 0..80),
            ) {
                let metrics = ClientMetrics { loss, ..update_manifest().metrics };
                let m = UpdateManifest { client_id, round, codec, total_len, examples, signature, metrics, ..update_manifest() };
                prop_assert_eq!(decode::<UpdateManifest>(&encode(&m), DEFAULT_MAX_MESSAGE_LEN).unwrap(), m);
            }

            #[test]
            fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = decode::<ServerStatus>(&bytes, 1 << 20);
                let _ = decode::<ClientStatus>(&bytes, 1 << 20);
                let _ = decode::<Ack>(&bytes, 1 << 20);
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode::<RoundAnnouncement>(&bytes, 1 << 20);
            let _ = decode::<ModelManifest>(&bytes, 1 << 20);
            let _ = decode::<UpdateManifest>(&bytes, 1 << 20);
        }
    }
}
