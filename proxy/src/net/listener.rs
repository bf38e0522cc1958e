//! Bound listening sockets of either family, optionally transparent (nftables `tproxy`).

use std::io;

use tokio::net::{TcpListener, UnixListener};

use crate::error::ProxyError;
use crate::net::addr::{AcceptedInfo, Address};
use crate::net::conn::Conn;

#[derive(Debug)]
pub enum BoundListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl BoundListener {
    pub async fn bind(addr: &Address) -> Result<BoundListener, ProxyError> {
        BoundListener::bind_with(addr, false).await
    }

    /// `transparent`: IP_TRANSPARENT, so nftables `tproxy` can deliver connections addressed to
    /// other hosts to this socket (needs CAP_NET_ADMIN).
    pub async fn bind_with(addr: &Address, transparent: bool) -> Result<BoundListener, ProxyError> {
        let context = || format!("binding {addr}");
        match addr {
            Address::Tcp { host, port } if transparent => {
                let resolved = tokio::net::lookup_host(Address::host_port(host, *port))
                    .await
                    .map_err(|e| ProxyError::io(context(), e))?
                    .next()
                    .ok_or_else(|| ProxyError::io(context(), io::ErrorKind::NotFound.into()))?;
                bind_transparent(resolved)
                    .map(BoundListener::Tcp)
                    .map_err(|e| ProxyError::io(context(), e))
            }
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

fn bind_transparent(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
