//! Bound listening sockets and the accept loop.
//!
//! `run(listener, ctx, shutdown)` takes an already bound listener (tests bind port 0) and hands
//! every accepted connection to its own task; it returns when shutdown stops accepting.

use std::io;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use crate::addr::{AcceptedInfo, Address};
use crate::conn::Conn;
use crate::error::ProxyError;
use crate::migration::{self, ListenerCtx};
use crate::shutdown::Shutdown;

#[derive(Debug)]
pub enum BoundListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl BoundListener {
    pub async fn bind(addr: &Address) -> Result<BoundListener, ProxyError> {
        let context = || format!("binding {addr}");
        match addr {
            Address::Tcp { host, port } => TcpListener::bind(Address::host_port(host, *port))
                .await
                .map(BoundListener::Tcp)
                .map_err(|e| ProxyError::io(context(), e)),
            Address::Unix(path) => {
                // A socket file left by a previous run would make bind fail; anything else at
                // that path is not ours to delete.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                UnixListener::bind(path)
                    .map(BoundListener::Unix)
                    .map_err(|e| ProxyError::io(context(), e))
            }
        }
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_address(&self) -> Option<Address> {
        match self {
            BoundListener::Tcp(l) => l.local_addr().ok().map(Address::from_socket_addr),
            BoundListener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| Address::Unix(p.to_path_buf()))),
        }
    }

    pub async fn accept(&self) -> io::Result<(Conn, AcceptedInfo)> {
        match self {
            BoundListener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let info = AcceptedInfo {
                    peer: Some(peer),
                    local: stream.local_addr().ok(),
                    original_dst: None,
                };
                Ok((Conn::Tcp(stream), info))
            }
            BoundListener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((Conn::Unix(stream), AcceptedInfo::default()))
            }
        }
    }
}

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
                tokio::spawn(migration::handle_connection(conn, info, ctx));
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
