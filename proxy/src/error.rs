//! `ProxyError`: every way a subcommand can fail, and the exit code it maps to.
//!
//! Exit codes (interface contract): 0 success; 1 runtime or input error; 2 usage or
//! configuration error (nothing was started); 3 refused by policy.

use migproxy_codec::DecodeError;
use migproxy_config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A malformed or unsupported migration stream.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Invalid configuration or profile: nothing was started.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Reading or writing a file or socket failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The command line was wrong in a way clap cannot express.
    #[error("{0}")]
    Usage(String),
    /// A `run` setting (flag, environment variable or configuration file) is invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An address is not in QEMU's syntax (`tcp:HOST:PORT`, `tcp:[IPV6]:PORT`, `unix:PATH`).
    #[error("invalid address {text:?}: {reason}")]
    Address { text: String, reason: String },
    /// The migration would lose guest state or cannot load.
    #[error("refused: {0}")]
    Refused(String),
    /// A migration could not be carried on, and every connection of it was closed.
    #[error("migration aborted: {0}")]
    Aborted(String),
    /// An HTTP exchange (health check, profile fetch) failed.
    #[error("http {url}: {reason}")]
    Http { url: String, reason: String },
    /// Anything else that went wrong at run time.
    #[error("{0}")]
    Runtime(String),
}

/// For `migproxy_codec::offline::decode_reader`, whose reads carry no context of their own.
impl From<std::io::Error> for ProxyError {
    fn from(source: std::io::Error) -> Self {
        ProxyError::io("reading the stream", source)
    }
}

impl ProxyError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ProxyError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn address(text: &str, reason: impl Into<String>) -> Self {
        ProxyError::Address {
            text: text.to_owned(),
            reason: reason.into(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            ProxyError::Decode(_)
            | ProxyError::Io { .. }
            | ProxyError::Runtime(_)
            | ProxyError::Aborted(_)
            | ProxyError::Http { .. } => 1,
            ProxyError::Config(_)
            | ProxyError::Usage(_)
            | ProxyError::InvalidConfig(_)
            | ProxyError::Address { .. } => 2,
            ProxyError::Refused(_) => 3,
        }
    }
}
