//! The crate's one error type, and how each error maps to the reason sent back in an ack.

use crate::message::RejectReason;

/// Everything that can go wrong decoding, validating or verifying protocol data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    Oversize {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("malformed CBOR message: {0}")]
    Cbor(String),
    #[error("protocol version {found} is not supported (expected {expected})")]
    WrongVersion { found: u16, expected: u16 },
    #[error("malformed safetensors: {0}")]
    Safetensors(String),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("unsupported codec {0:?}")]
    UnsupportedCodec(String),
    #[error("malformed delta: {0}")]
    MalformedDelta(String),
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("unexpected tensor {0:?}")]
    UnexpectedTensor(String),
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name:?} has dtype {found}, expected {expected}")]
    DtypeMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error("tensor {0:?} holds NaN or infinity")]
    NonFinite(String),
    #[error("SHA-256 mismatch: expected {expected}, got {actual}")]
    HashMismatch { expected: String, actual: String },
    #[error("not a hex SHA-256: {0:?}")]
    BadHash(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("bad key: {0}")]
    BadKey(String),
    #[error("chunk index {index} out of range (blob has {count} chunks)")]
    ChunkIndex { index: u32, count: u32 },
    #[error("chunk {index} has {len} bytes, expected {expected}")]
    ChunkLength {
        index: u32,
        len: usize,
        expected: usize,
    },
    #[error("chunk {index} differs from the copy received before")]
    ChunkConflict { index: u32 },
    #[error("blob incomplete: {missing} chunks missing")]
    Incomplete { missing: u32 },
    #[error("inconsistent chunk layout: {0}")]
    ChunkLayout(String),
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

impl ProtoError {
    /// The reason to put in an [`Ack`](crate::message::Ack) when this error rejects an update.
    pub fn reject_reason(&self) -> RejectReason {
        use ProtoError as E;
        match self {
            E::Oversize { .. } => RejectReason::Oversize,
            E::WrongVersion { .. } => RejectReason::WrongVersion,
            E::UnsupportedCodec(_) => RejectReason::UnsupportedCodec,
            E::MissingTensor(_)
            | E::UnexpectedTensor(_)
            | E::ShapeMismatch { .. }
            | E::DtypeMismatch { .. } => RejectReason::ShapeMismatch,
            E::NonFinite(_) => RejectReason::NonFinite,
            E::HashMismatch { .. } => RejectReason::HashMismatch,
            E::BadSignature | E::BadKey(_) => RejectReason::BadSignature,
            // Indices past the announced count are what a flooding client sends.
            E::ChunkIndex { .. } => RejectReason::ChunkFlood,
            E::Cbor(_)
            | E::Safetensors(_)
            | E::Zstd(_)
            | E::MalformedDelta(_)
            | E::BadHash(_)
            | E::ChunkLength { .. }
            | E::ChunkConflict { .. }
            | E::Incomplete { .. }
            | E::ChunkLayout(_)
            | E::InvalidName { .. } => RejectReason::MalformedMessage,
        }
    }
}
