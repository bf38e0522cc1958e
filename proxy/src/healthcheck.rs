//! Placeholder until this subcommand lands.

use crate::cli::HealthcheckArgs;
use crate::error::ProxyError;

pub fn main(_args: &HealthcheckArgs) -> Result<(), ProxyError> {
    Err(ProxyError::Runtime("not implemented yet".into()))
}
