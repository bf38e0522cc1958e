//! Placeholder until this subcommand lands.

use crate::cli::RewriteArgs;
use crate::error::ProxyError;

pub fn main(_args: &RewriteArgs) -> Result<(), ProxyError> {
    Err(ProxyError::Runtime("not implemented yet".into()))
}
