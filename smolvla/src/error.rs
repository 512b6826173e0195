//! Typed errors of the smolvla crate.

use std::path::{Path, PathBuf};

/// Everything that can go wrong building, loading or running SmolVLA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file (config, JSON) that cannot be read, parsed or written, or a config the model
    /// cannot be built from.
    #[error(transparent)]
    Config(#[from] smolvla_config::Error),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("checkpoint {path}: missing keys {missing:?}, unexpected keys {unexpected:?}")]
    Keys {
        path: PathBuf,
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("checkpoint {path}: {name} has shape {found:?}, the model expects {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("batch: {0}")]
    Batch(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("hub: {0}")]
    Hub(String),
    #[error("onnx export: {0}")]
    Export(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        smolvla_config::Error::io(path, source).into()
    }
    pub(crate) fn json(path: &Path, source: serde_json::Error) -> Self {
        smolvla_config::Error::json(path, source).into()
    }
    pub(crate) fn invalid(msg: String) -> Self {
        smolvla_config::Error::Invalid(msg).into()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
