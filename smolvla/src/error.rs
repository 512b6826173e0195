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

/// The config crate's errors keep their meaning: file, JSON, invalid config.
impl From<smolvla_config::Error> for Error {
    fn from(e: smolvla_config::Error) -> Self {
        match e {
            smolvla_config::Error::Io { path, source } => Error::Io { path, source },
            smolvla_config::Error::Json { path, source } => Error::Json { path, source },
            smolvla_config::Error::Invalid(m) => Error::Config(m),
        }
    }
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        smolvla_config::Error::io(path, source).into()
    }
    pub(crate) fn json(path: &Path, source: serde_json::Error) -> Self {
        smolvla_config::Error::json(path, source).into()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
