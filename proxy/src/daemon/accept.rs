//! The accept loop of one migration listener.
//!
//! `run(listener, ctx, shutdown)` takes an already bound listener (tests bind port 0) and hands
//! every accepted connection to its own task; it returns when shutdown stops accepting. A
//! connection over the connection budgets is closed at once, before any byte is read.

use std::sync::Arc;

use crate::daemon::shutdown::Shutdown;
use crate::migration::admission::Exceeded;
use crate::migration::connection::{self, ListenerCtx};
use crate::migration::metrics::TurnedAway;
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
                // Budgets first: a refused connection costs one accept and one close.
                let slot = match ctx.admission.connection(info.peer.map(|p| p.ip())) {
                    Ok(slot) => slot,
                    Err(exceeded) => {
                        let reason = match exceeded {
                            Exceeded::Connections => TurnedAway::MaxConnections,
                            Exceeded::ConnectionsPerSource => TurnedAway::MaxConnectionsPerSource,
                            Exceeded::Migrations => TurnedAway::MaxMigrations,
                        };
                        ctx.metrics.turned_away(reason);
                        let peer = info
                            .peer
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "unix".to_owned());
                        if ctx.log_turned_away() {
                            tracing::warn!(%peer, listen = %ctx.listen, reason = reason.as_str(), "connection refused: budget exceeded (--{}): closed, destination not contacted", reason.as_str().replace('_', "-"));
                        }
                        continue;
                    }
                };
                if ctx.upstream.needs_original_dst() {
                    info.original_dst = conn.original_dst();
                }
                let ctx = Arc::clone(&ctx);
                tokio::spawn(connection::handle_connection(conn, info, ctx, slot));
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
