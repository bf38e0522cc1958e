//! Placeholder until this subcommand lands.

use crate::cli::PlanArgs;
use crate::error::ProxyError;

pub fn main(_args: &PlanArgs) -> Result<(), ProxyError> {
    Err(ProxyError::Runtime("not implemented yet".into()))
}
