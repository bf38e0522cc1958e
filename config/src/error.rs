//! `ConfigError`: invalid profiles, policies, register names and configuration files.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Free-form invalid configuration (used by the TOML configuration file).
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The profile is not well-formed JSON or does not have the profile's shape.
    #[error("{origin}: invalid profile json: {source}")]
    Json {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    /// One field of a profile has an invalid value; `field` is a path such as `registers[3].value`.
    #[error("{origin}: {field}: {message}")]
    Field {
        origin: String,
        field: String,
        message: String,
    },
    /// A register given by name or id could not be understood.
    #[error("unknown register {0:?}: expected an architectural name (TCR2_EL1), a generic name (S3_0_C2_C0_3) or a hex id (0x603000000013c103)")]
    UnknownRegister(String),
}
