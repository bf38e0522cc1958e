//! `migproxy healthcheck`: GET the health URL of a running daemon; exit 0 on 200, 1 otherwise.
//!
//! Container images without curl (distroless, scratch) use the binary itself as HEALTHCHECK.

use std::time::Duration;

use crate::cli::HealthcheckArgs;
use crate::error::{HttpFailure, ProxyError};
use crate::net::http_client;
use crate::net::tls::pinned_client;

pub fn main(args: &HealthcheckArgs) -> Result<(), ProxyError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ProxyError::io("starting the runtime", e))?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let trust = args.ca.as_deref().map(pinned_client).transpose()?;
    let (status, _) = runtime.block_on(http_client::get(
        &args.url,
        http_client::FetchBudget {
            timeout,
            max_body: http_client::DEFAULT_MAX_BODY_BYTES,
        },
        trust.as_ref(),
    ))?;
    if status == 200 {
        Ok(())
    } else {
        Err(ProxyError::Http {
            url: args.url.clone(),
            failure: HttpFailure::Status(status),
        })
    }
}
