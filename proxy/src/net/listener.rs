//! Bound listening sockets of either family, with the socket options their interception needs
//! (nftables `tproxy` or `redirect`).

use std::io;

use tokio::net::{TcpListener, UnixListener};

use crate::error::ProxyError;
use crate::net::addr::{AcceptedInfo, Address};
use crate::net::conn::Conn;

/// The MSS a listener that takes nftables `redirect`ed connections advertises: an Ethernet link's
/// (1500-byte MTU). Those connections come from this host's own QEMU over loopback, whose MSS
/// would be 65483, and a sender sizes its send buffer by its peer's MSS (per segment, rounded up to
/// a power of two: 128 KiB for loopback's). So QEMU's socket grew to the 4 MiB maximum at once and
/// held about 3 MB per channel, which must cross the link after the guest stops (more than its
/// socket towards the destination holds in a direct migration, with 4 multifd channels 12.5 MB
/// against 8-11). With a link's MSS its buffer grows with its congestion window instead: 1.8 MB for
/// one channel, 6.6 MB for four (docs/bench-source-side.md). Loopback does not segment, so the
/// smaller MSS costs no packets there.
pub const REDIRECTED_SOURCE_MSS: u32 = 1460;

/// How connections reach a listener, which decides the options its socket is bound with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interception {
    /// Connections dialed to the listener's own address.
    None,
    /// nftables `tproxy` delivers connections addressed to other hosts: IP_TRANSPARENT (needs
    /// CAP_NET_ADMIN).
    Tproxy,
    /// nftables `redirect` on the source host: this host's QEMU, over loopback
    /// ([`REDIRECTED_SOURCE_MSS`]).
    Redirect,
}

#[derive(Debug)]
pub enum BoundListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl BoundListener {
    pub async fn bind(addr: &Address) -> Result<BoundListener, ProxyError> {
        BoundListener::bind_with(addr, Interception::None).await
    }

    pub async fn bind_with(
        addr: &Address,
        interception: Interception,
    ) -> Result<BoundListener, ProxyError> {
        let context = || format!("binding {addr}");
        match addr {
            Address::Tcp { host, port } if interception == Interception::Tproxy => {
                let resolved = tokio::net::lookup_host(Address::host_port(host, *port))
                    .await
                    .map_err(|e| ProxyError::io(context(), e))?
                    .next()
                    .ok_or_else(|| ProxyError::io(context(), io::ErrorKind::NotFound.into()))?;
                bind_transparent(resolved)
                    .map(BoundListener::Tcp)
                    .map_err(|e| ProxyError::io(context(), e))
            }
            Address::Tcp { host, port } => {
                let listener = TcpListener::bind(Address::host_port(host, *port))
                    .await
                    .map_err(|e| ProxyError::io(context(), e))?;
                if interception == Interception::Redirect {
                    // Read from the listener when a SYN-ACK is built, so setting it after
                    // listen() covers every connection.
                    socket2::SockRef::from(&listener)
                        .set_tcp_mss(REDIRECTED_SOURCE_MSS)
                        .map_err(|e| ProxyError::io(format!("{}: TCP_MAXSEG", context()), e))?;
                }
                Ok(BoundListener::Tcp(listener))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The MSS a loopback client settles on after connecting to a listener bound for
    /// `interception` (its TCP_MAXSEG: what it will put in a segment, from the MSS it was told).
    async fn client_mss(interception: Interception) -> Result<u32, Box<dyn std::error::Error>> {
        let addr: Address = "tcp:127.0.0.1:0".parse()?;
        let listener = BoundListener::bind_with(&addr, interception).await?;
        let Some(Address::Tcp { host, port }) = listener.local_address() else {
            return Err("no local address".into());
        };
        let client = tokio::net::TcpStream::connect(Address::host_port(&host, port)).await?;
        let _accepted = listener.accept().await?;
        Ok(socket2::SockRef::from(&client).tcp_mss()?)
    }

    #[tokio::test]
    async fn a_redirect_listener_tells_local_sources_a_link_mss(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let redirected = client_mss(Interception::Redirect).await?;
        let direct = client_mss(Interception::None).await?;
        // Timestamps take 12 bytes of the advertised MSS.
        assert!(
            (REDIRECTED_SOURCE_MSS - 40..=REDIRECTED_SOURCE_MSS).contains(&redirected),
            "a redirected source uses an MSS of {redirected}"
        );
        // Without it, loopback's (65483 less options): the case the clamp exists for.
        assert!(
            direct > 16 << 10,
            "a direct loopback client uses an MSS of {direct}"
        );
        Ok(())
    }
}
