//! The accept loop of one migration listener.
//!
//! `run(listener, ctx, shutdown)` takes an already bound listener (tests bind port 0) and hands
//! every accepted connection to its own task; it returns when shutdown stops accepting.

use std::sync::Arc;

use crate::daemon::shutdown::Shutdown;
use crate::migration::connection::{self, ListenerCtx};
use crate::net::listener::BoundListener;

/// Accept migration connections until shutdown stops accepting.
pub async fn run(listener: BoundListener, ctx: Arc<ListenerCtx>, shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.stop_accepting.cancelled() => break,
        };
        match accepted {
            Ok((conn, mut info)) => {
                if ctx.upstream.needs_original_dst() {
                    info.original_dst = conn.original_dst();
                }
                let ctx = Arc::clone(&ctx);
                tokio::spawn(connection::handle_connection(conn, info, ctx));
            }
            Err(err) => {
                // EMFILE and friends: keep serving the connections we have, retry shortly.
                tracing::warn!(listen = %ctx.listen, %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    tracing::info!(listen = %ctx.listen, "stopped accepting");
}
