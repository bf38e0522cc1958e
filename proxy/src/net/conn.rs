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
        if let Conn::Tcp(stream) = self {
            // Failures only cost throughput or latency; the connection still works.
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%err, "TCP_NODELAY not set");
            }
            let sock = socket2::SockRef::from(stream);
            if let Err(err) = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
                tracing::debug!(%err, "SO_SNDBUF not set");
            }
            if let Err(err) = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
                tracing::debug!(%err, "SO_RCVBUF not set");
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

/// Connect to an upstream address and tune the socket.
pub async fn dial(addr: &Address) -> Result<Conn, ProxyError> {
    let conn = match addr {
        Address::Tcp { host, port } => TcpStream::connect(Address::host_port(host, *port))
            .await
            .map(Conn::Tcp),
        Address::Unix(path) => UnixStream::connect(path).await.map(Conn::Unix),
    }
    .map_err(|err| ProxyError::io(format!("connecting to {addr}"), err))?;
    conn.tune();
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
