//! Typed errors of the smolvla crate.

use std::path::{Path, PathBuf};

/// Everything that can go wrong building, loading or running SmolVLA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid config: {0}")]
    Config(String),
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
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn json(path: &Path, source: serde_json::Error) -> Self {
        Error::Json {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
