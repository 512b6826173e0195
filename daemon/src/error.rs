//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong in the daemons' plumbing. Every variant names what it was working on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("broker URL {url:?}: {why}")]
    BrokerUrl { url: String, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS, {path}: {why}")]
    Tls { path: PathBuf, why: String },
    #[error("key file {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: shared_proto::ProtoError,
    },
    #[error("installing the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}
