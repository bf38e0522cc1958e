//! Placeholder until this subcommand lands.

use crate::cli::CaptureArgs;
use crate::error::ProxyError;

pub fn capture(_args: &CaptureArgs) -> Result<(), ProxyError> {
    Err(ProxyError::Runtime("not implemented yet".into()))
}
