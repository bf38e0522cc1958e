//! Placeholder until this subcommand lands.

use crate::cli::InspectArgs;
use crate::error::ProxyError;

pub fn main(_args: &InspectArgs) -> Result<(), ProxyError> {
    Err(ProxyError::Runtime("not implemented yet".into()))
}
