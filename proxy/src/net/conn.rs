//! A connected socket of either family (TCP or unix), split into independent halves, and dialing.
//!
//! Each direction of a connection is pumped by its own task (the return path must flow while the
//! forward direction is blocked: DESIGN.md, "Everything else streams"), so connections are split
//! into owned halves. Socket options follow the data: TCP_NODELAY because the return path carries
//! small latency-critical messages (PONG, page requests), and 1 MiB-class buffers because RAM
//! moves in bulk.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{tcp, unix, TcpStream, UnixStream};

use crate::error::ProxyError;
use crate::net::addr::Address;

/// Kernel socket buffer size asked for on every migration socket.
pub const SOCKET_BUFFER_BYTES: usize = 1 << 20;

/// Receive buffer of a source-facing socket when the source runs on this host and the destination
/// does not (migproxy on the source host, behind a redirect). That leg has no round trip to cover,
/// and every byte it holds when the guest stops must still cross the link before the destination
/// can resume: with the 1 MiB buffers, 4 multifd channels at 2.5 Gbit/s paused the guest 40-50 ms
/// longer than a direct migration. 64 KiB cut that to about 11 ms but doubled to quintupled the
/// relay's CPU (many small reads and splices); 256 KiB cost a third of that CPU and held 0.26 MB
/// per channel on average; 128 KiB holds 0.16 MB at the same CPU (docs/bench-source-side.md).
pub const LOCAL_SOURCE_RECEIVE_BYTES: usize = 128 << 10;

/// Unsent bytes a socket towards a remote destination may hold in that placement
/// (TCP_NOTSENT_LOWAT): what is in flight is still bounded only by the send buffer, so the link
/// stays full, but what waits behind it stays small (0.08 MB per channel on average at 64 KiB,
/// 0.14 MB at 128 KiB, the same CPU).
pub const LINK_UNSENT_BYTES: u32 = 64 << 10;

/// Any byte stream a connection can become (a TLS session over a socket).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A TLS session (either leg).
    Tls(Box<dyn Stream>),
}

pub enum ConnRead {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Tls(ReadHalf<Box<dyn Stream>>),
}

pub enum ConnWrite {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Tls(WriteHalf<Box<dyn Stream>>),
}

impl Conn {
    /// Apply the migration socket options (TCP only; unix sockets have none that matter).
    pub fn tune(&self) {
        self.tune_buffers(true);
    }

    /// `pin_send_buffer`: ask for [`SOCKET_BUFFER_BYTES`] of send buffer (which turns the kernel's
    /// autotuning off for it) or leave it to the kernel.
    fn tune_buffers(&self, pin_send_buffer: bool) {
        if let Conn::Tcp(stream) = self {
            // Failures only cost throughput or latency; the connection still works.
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%err, "TCP_NODELAY not set");
            }
            let sock = socket2::SockRef::from(stream);
            if pin_send_buffer {
                if let Err(err) = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
                    tracing::debug!(%err, "SO_SNDBUF not set");
                }
            }
            if let Err(err) = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
                tracing::debug!(%err, "SO_RCVBUF not set");
            }
        }
    }

    /// A source-facing socket of a migration whose source runs on this host and whose destination
    /// does not: a small receive buffer ([`LOCAL_SOURCE_RECEIVE_BYTES`]).
    pub fn tune_as_local_source(&self) {
        if let Conn::Tcp(stream) = self {
            let sock = socket2::SockRef::from(stream);
            if let Err(err) = sock.set_recv_buffer_size(LOCAL_SOURCE_RECEIVE_BYTES) {
                tracing::debug!(%err, "SO_RCVBUF not set");
            }
        }
    }

    /// A destination-facing socket of such a migration, in place of [`Conn::tune`]: the kernel
    /// sizes the send buffer to the link's round trip (a pinned 2 MiB let the shaped link's queue
    /// fill behind it), and unsent data stays bounded ([`LINK_UNSENT_BYTES`]).
    pub fn tune_as_link_towards_destination(&self) {
        self.tune_buffers(false);
        if let Conn::Tcp(stream) = self {
            let sock = socket2::SockRef::from(stream);
            if let Err(err) = sock.set_tcp_notsent_lowat(LINK_UNSENT_BYTES) {
                tracing::debug!(%err, "TCP_NOTSENT_LOWAT not set");
            }
        }
    }

    /// The destination the client dialed before an nftables `redirect` (SO_ORIGINAL_DST).
    pub fn original_dst(&self) -> Option<SocketAddr> {
        let Conn::Tcp(stream) = self else {
            return None;
        };
        let sock = socket2::SockRef::from(stream);
        let local_is_v6 = stream.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        let found = if local_is_v6 {
            sock.original_dst_v6()
        } else {
            sock.original_dst_v4()
        };
        found.ok().and_then(|addr| addr.as_socket())
    }

    pub fn into_split(self) -> (ConnRead, ConnWrite) {
        match self {
            Conn::Tcp(stream) => {
                let (r, w) = stream.into_split();
                (ConnRead::Tcp(r), ConnWrite::Tcp(w))
            }
            Conn::Unix(stream) => {
                let (r, w) = stream.into_split();
                (ConnRead::Unix(r), ConnWrite::Unix(w))
            }
            Conn::Tls(stream) => {
                let (r, w) = tokio::io::split(stream);
                (ConnRead::Tls(r), ConnWrite::Tls(w))
            }
        }
    }
}

/// Connect to an upstream address and tune the socket (as the link towards the destination when
/// `towards_link`: migproxy on the source host).
pub async fn dial(addr: &Address, towards_link: bool) -> Result<Conn, ProxyError> {
    let conn = match addr {
        Address::Tcp { host, port } => TcpStream::connect(Address::host_port(host, *port))
            .await
            .map(Conn::Tcp),
        Address::Unix(path) => UnixStream::connect(path).await.map(Conn::Unix),
    }
    .map_err(|err| ProxyError::io(format!("connecting to {addr}"), err))?;
    if towards_link {
        conn.tune_as_link_towards_destination();
    } else {
        conn.tune();
    }
    Ok(conn)
}

impl AsyncRead for ConnRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnRead::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ConnRead::Unix(r) => Pin::new(r).poll_read(cx, buf),
            ConnRead::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            ConnWrite::Unix(w) => Pin::new(w).poll_write(cx, buf),
            ConnWrite::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            ConnWrite::Unix(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            ConnWrite::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ConnWrite::Tcp(w) => w.is_write_vectored(),
            ConnWrite::Unix(w) => w.is_write_vectored(),
            ConnWrite::Tls(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Tcp(w) => Pin::new(w).poll_flush(cx),
            ConnWrite::Unix(w) => Pin::new(w).poll_flush(cx),
            ConnWrite::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    /// Half-close: the peer reads EOF in this direction, the other direction stays open.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            ConnWrite::Unix(w) => Pin::new(w).poll_shutdown(cx),
            ConnWrite::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

// The whole connection is also a byte stream (the admin endpoint serves HTTP over it).
impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connected_pair() -> std::io::Result<(TcpStream, TcpStream)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let dialed = TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        Ok((dialed, accepted))
    }

    #[tokio::test]
    async fn the_source_host_placement_shrinks_the_source_leg_and_bounds_unsent_data(
    ) -> std::io::Result<()> {
        let (dialed, accepted) = connected_pair().await?;
        let source = Conn::Tcp(accepted);
        let destination = Conn::Tcp(dialed);
        source.tune();
        destination.tune();
        let received = |conn: &Conn| match conn {
            Conn::Tcp(s) => socket2::SockRef::from(s).recv_buffer_size(),
            _ => Ok(0),
        };
        let unsent = |conn: &Conn| match conn {
            Conn::Tcp(s) => socket2::SockRef::from(s).tcp_notsent_lowat(),
            _ => Ok(0),
        };
        // Linux reports twice what was asked (its bookkeeping share).
        assert!(received(&source)? >= SOCKET_BUFFER_BYTES);
        let lowat_before = unsent(&destination)?;
        assert_ne!(lowat_before, LINK_UNSENT_BYTES);
        source.tune_as_local_source();
        destination.tune_as_link_towards_destination();
        let small = received(&source)?;
        assert!(
            (LOCAL_SOURCE_RECEIVE_BYTES..=2 * LOCAL_SOURCE_RECEIVE_BYTES).contains(&small),
            "SO_RCVBUF {small}"
        );
        assert_eq!(unsent(&destination)?, LINK_UNSENT_BYTES);
        Ok(())
    }
}
