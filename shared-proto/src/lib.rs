//! The zk0 wire protocol, shared by `zk0-agent` and `zk0-aggregator`.
//!
//! Pure functions only: no async runtime, no libtorch, no I/O beyond byte slices, so every
//! decoder here can be fuzzed and property-tested in isolation. (Key *files* are read and
//! written by `zk0_daemon::keys`; [`sign`] only parses and prints PEM.)
//!
//! Map of the crate, in the order a round uses it:
//!
//! - [`topic`]: MQTT topic names under `zk0/v1/<federation>/`, builders and a parser.
//! - [`message`]: versioned CBOR payloads (status, round, manifests, acks) and reject reasons.
//! - [`tensor`]: f32 tensors, model specs, safetensors reading/writing, model ids.
//! - [`codec`]: the delta codec (`f32`, `bf16`, `int8`, `topk:<f>`) + zstd, with error feedback.
//! - [`chunk`]: splitting blobs into chunks and reassembling them, verified by SHA-256.
//! - [`sign`]: ed25519 keys, fingerprints and key files.
//! - [`hash`]: SHA-256 helpers; [`ids`]: the hex digests as types ([`ModelId`], [`Sha256Hex`]).
//! - [`error`]: [`ProtoError`], and its mapping to the [`RejectReason`] sent in acks.
//!
//! Every decoder takes a size cap and returns an error on bad input; none panics.
//!
//! An update's trip, in short (see `tests/round_trip.rs` for the whole thing):
//!
//! ```
//! use shared_proto::{chunk, codec, hash, ModelSpec, Tensor, TensorSet};
//!
//! let mut delta = TensorSet::new();
//! delta.insert("w".into(), Tensor::new(vec![2, 2], vec![0.5, -1.0, 0.0, 2.0])?);
//! let spec = ModelSpec::from_tensors(&delta);
//!
//! // Agent: encode (int8 + zstd), then send in chunks with the blob's SHA-256 in the manifest.
//! let blob = codec::encode_delta(&delta, &codec::EncodeOptions::default(), None)?;
//! let n = chunk::chunk_count(blob.len(), 16);
//!
//! // Aggregator: reassemble in any order, verify the hash, decode against the model's spec.
//! let mut r = chunk::Reassembly::new(blob.len() as u64, n, 16, hash::sha256(&blob), 1 << 20)?;
//! for (i, c) in chunk::split(&blob, 16).enumerate().rev() {
//!     r.insert(i as u32, c)?;
//! }
//! let decoded = codec::decode_delta(&r.finish()?, &spec, 1 << 20)?;
//! assert!((decoded["w"].data[3] - 2.0).abs() < 2.0 / 127.0);
//! # Ok::<(), shared_proto::ProtoError>(())
//! ```

pub mod chunk;
pub mod codec;
pub mod error;
pub mod hash;
pub mod ids;
pub mod message;
pub mod sign;
pub mod tensor;
pub mod topic;
pub mod worker;

pub use error::ProtoError;
pub use ids::{ModelId, Sha256Hex};
pub use message::{RejectReason, PROTOCOL_VERSION};
pub use tensor::{ModelSpec, Tensor, TensorSet};
