//! `ConfigError`: invalid profiles, policies and configuration files.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}
