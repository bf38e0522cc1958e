//! Placeholder until this subcommand lands.

use crate::cli::RunArgs;
use crate::error::ProxyError;

pub fn main(_args: RunArgs) -> Result<(), ProxyError> {
    Err(ProxyError::Runtime("not implemented yet".into()))
}
