//! The errors of zk0-infer.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("onnxruntime: {0}")]
    Ort(String),
    /// The onnxruntime library itself: not found, not loadable.
    #[error("onnxruntime library: {0}")]
    Runtime(String),
    #[error("loading {0}: {1}")]
    Load(PathBuf, String),
    #[error("execution provider: {0}")]
    Provider(String),
    #[error("{0}")]
    Config(String),
    #[error("missing {0}")]
    Missing(String),
    #[error("input {name}: {got} values, expected shape {expected:?}")]
    Input {
        name: String,
        expected: Vec<i64>,
        got: usize,
    },
    #[error("non-finite {0}")]
    NonFinite(String),
}

impl Error {
    pub(crate) fn ort(e: ort::Error) -> Self {
        Self::Ort(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
