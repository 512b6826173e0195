//! Typed errors. Every variant names the file (and the episode, where one is involved) so a
//! corrupt or inconsistent dataset can be fixed from the message alone.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or checking a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: unreadable parquet (truncated or corrupt?): {message}", path.display())]
    Parquet { path: PathBuf, message: String },
    /// The files parse but disagree with each other or with the format.
    #[error("{}: {message}", path.display())]
    Inconsistent { path: PathBuf, message: String },
    /// A problem tied to one episode (its data rows, its video span, its metadata row).
    #[error("{}: episode {episode}: {message}", path.display())]
    Episode {
        path: PathBuf,
        episode: usize,
        message: String,
    },
    #[error("{}: unsupported codebase_version {version:?} (this reader handles v2.1 and v3.0)", path.display())]
    UnsupportedVersion { path: PathBuf, version: String },
    #[error("{what} {value} out of range ({bound})")]
    OutOfRange {
        what: &'static str,
        value: usize,
        bound: String,
    },
    #[error("{}: episode {episode}: video decode at {timestamp:.6}s failed: {message}", path.display())]
    Video {
        path: PathBuf,
        episode: usize,
        timestamp: f64,
        message: String,
    },
    #[error("{}: video encode failed: {message}", path.display())]
    Encode { path: PathBuf, message: String },
    /// ffmpeg/ffprobe could not be started (not installed, not on PATH).
    #[error("cannot run {program}: {source}")]
    Tool {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    /// Resolving a dataset on the Hugging Face Hub failed.
    #[error("hub: {0}")]
    Hub(String),
}

/// Crate-wide result alias.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DatasetError {
    let path = path.into();
    move |source| DatasetError::Io { path, source }
}

pub(crate) fn inconsistent(path: impl Into<PathBuf>, message: impl Into<String>) -> DatasetError {
    DatasetError::Inconsistent {
        path: path.into(),
        message: message.into(),
    }
}
