#![forbid(unsafe_code)]
//! Register profiles, rewrite policies and configuration files (placeholder: lands with issue 3).

mod error;

pub use error::ConfigError;
