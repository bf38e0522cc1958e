//! Graceful shutdown: on SIGTERM (or SIGINT) stop accepting, let live migrations finish up to the
//! drain deadline, then close what is left and exit 0.
//!
//! Closing a migration early is safe (the source keeps the guest), but it wastes the copy made so
//! far, so a container stop first gives migrations their chance to finish.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::error::ProxyError;
use crate::migration::metrics::Metrics;

/// The two phases of shutdown, as tokens every task can watch.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Listeners stop accepting; /readyz turns 503.
    pub stop_accepting: CancellationToken,
    /// Every remaining connection is closed (parent of every migration's token).
    pub close_all: CancellationToken,
}

impl Shutdown {
    pub fn is_draining(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Stop accepting, wait for active migrations to end (at most `deadline`), then close the rest.
    pub async fn drain(&self, metrics: &Arc<Metrics>, deadline: Duration) {
        self.stop_accepting.cancel();
        let active = metrics.active();
        if active > 0 {
            tracing::info!(
                active,
                deadline_secs = deadline.as_secs(),
                "draining: waiting for live migrations to finish"
            );
        }
        let finished = tokio::time::timeout(deadline, async {
            loop {
                // Enabled before the check, so a decrement in between is not missed.
                let changed = metrics.active_changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if metrics.active() <= 0 {
                    return;
                }
                changed.await;
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                active = metrics.active(),
                "drain deadline reached: closing the remaining migrations"
            );
        }
        self.close_all.cancel();
    }
}

/// SIGTERM and SIGINT handlers, installed at once (a signal during startup must drain, not kill).
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals, ProxyError> {
        Ok(Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| ProxyError::io("installing the SIGTERM handler", e))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| ProxyError::io("installing the SIGINT handler", e))?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
