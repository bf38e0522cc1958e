//! The one error type of the benchmark crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Proc { path: PathBuf, reason: String },
    #[error("stream {path}: {reason}")]
    Stream { path: PathBuf, reason: String },
    #[error("relay {name}: {reason}")]
    Relay { name: String, reason: String },
    #[error("transfer through {relay}: {reason}")]
    Transfer { relay: String, reason: String },
    #[error("usage: {0}")]
    Usage(String),
    #[error("writing results: {0}")]
    Json(#[from] serde_json::Error),
}

impl BenchError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}
