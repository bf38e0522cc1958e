//! A connection whose first bytes were read to identify it, and are read again first.
//!
//! Identification consumes the first bytes from the socket; whatever carries the connection
//! afterwards (the main-channel pump, a raw relay) must still forward them. Rather than handing
//! those bytes beside the connection through every signature, the connection carries them: reads
//! return the prefix before anything else from the socket (compare linkerd2-proxy's `PrefixedIo`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net::conn::{Conn, ConnRead, ConnWrite};

/// `io`, with `prefix` read before anything `io` itself delivers.
#[derive(Debug)]
pub struct PrefixedIo<T> {
    prefix: Bytes,
    io: T,
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: impl Into<Bytes>, io: T) -> PrefixedIo<T> {
        PrefixedIo {
            prefix: prefix.into(),
            io,
        }
    }

    /// The bytes not yet read again, and the connection (for relays that take the socket itself).
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.io)
    }

    /// The bytes not yet read again.
    #[cfg(test)]
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }
}

impl PrefixedIo<Conn> {
    /// Independent halves; the prefix stays with the read half.
    pub fn into_split(self) -> (PrefixedIo<ConnRead>, ConnWrite) {
        let (read, write) = self.io.into_split();
        (PrefixedIo::new(self.prefix, read), write)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        if let Some(head) = this.prefix.get(..n) {
            buf.put_slice(head);
        }
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_the_prefix_first_even_into_small_buffers() -> io::Result<()> {
        let (mut peer, io) = tokio::io::duplex(64);
        let mut prefixed = PrefixedIo::new(&b"QEVM"[..], io);
        peer.write_all(b"rest").await?;
        drop(peer);
        let mut first = [0u8; 3];
        prefixed.read_exact(&mut first).await?;
        assert_eq!(&first, b"QEV");
        assert_eq!(prefixed.prefix(), b"M");
        let mut all = Vec::new();
        prefixed.read_to_end(&mut all).await?;
        assert_eq!(all, b"Mrest");
        Ok(())
    }

    #[tokio::test]
    async fn writes_pass_through() -> io::Result<()> {
        let (mut peer, io) = tokio::io::duplex(64);
        let mut prefixed = PrefixedIo::new(Bytes::new(), io);
        prefixed.write_all(b"SHUT").await?;
        prefixed.shutdown().await?;
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await?;
        assert_eq!(got, b"SHUT");
        Ok(())
    }
}
