//! Raw byte relays: multifd and preempt channels both ways, and every return path.
//!
//! These carry nothing migproxy rewrites (DESIGN.md, "Everything else streams"). Plain TCP on both
//! sides goes through `splice.rs` (no copy through user space) unless `--raw-relay copy` says
//! otherwise; everything else (TLS, unix sockets) is copied here as it comes, through one 1 MiB
//! buffer per direction (memory stays bounded: a slow
//! reader blocks our write, which stops our read, which fills the kernel buffers, which stops the
//! sender). EOF is propagated per direction with a half-close, because the source still waits for
//! the destination's SHUT on the return path after writing its last byte. Nothing here knows what
//! a migration is: the caller names the direction for errors and passes the counters to add to.

use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::ProxyError;
use crate::net::conn::Conn;
use crate::net::prefixed::PrefixedIo;
use crate::net::splice;
use crate::net::stall;

/// How raw channels are relayed (`--raw-relay`, `raw_relay` in the file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RawRelay {
    /// `splice(2)` through a pipe per direction where both sides are plain TCP; the copying
    /// relay for everything else.
    #[default]
    Splice,
    /// Always through a user-space buffer (the fallback, and the baseline to measure against).
    Copy,
}

impl RawRelay {
    pub fn as_str(self) -> &'static str {
        match self {
            RawRelay::Splice => "splice",
            RawRelay::Copy => "copy",
        }
    }
}

/// Relay a non-main channel both ways with the relay `mode` asks for where it applies.
pub async fn relay_raw(
    mode: RawRelay,
    source: PrefixedIo<Conn>,
    destination: Conn,
    to_destination: &[&AtomicU64],
    to_source: &[&AtomicU64],
    kind: &str,
    stall: Duration,
) -> Result<(), ProxyError> {
    match (mode, source.into_parts(), destination) {
        (RawRelay::Splice, (prefix, Conn::Tcp(source)), Conn::Tcp(destination)) => {
            tracing::info!(relay = RawRelay::Splice.as_str(), "raw relay");
            splice::splice_channel(
                source,
                prefix,
                destination,
                to_destination,
                to_source,
                kind,
                stall,
            )
            .await
        }
        (_, (prefix, source), destination) => {
            tracing::info!(relay = RawRelay::Copy.as_str(), "raw relay");
            relay_channel(
                PrefixedIo::new(prefix, source).into_split(),
                destination.into_split(),
                to_destination,
                to_source,
                kind,
                stall,
            )
            .await
        }
    }
}

/// Relay buffer per direction, at most.
pub const RELAY_BUFFER_BYTES: usize = 1 << 20;

/// A relay buffer's first size; it grows towards [`RELAY_BUFFER_BYTES`] while reads fill it.
const RELAY_BUFFER_START_BYTES: usize = 4 << 10;

/// Copy `reader` to `writer` until EOF, then half-close `writer`. Returns the bytes written.
/// A `writer` that takes nothing for `stall` ends it (`net::stall`).
pub async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    counters: &[&AtomicU64],
    what: &str,
    stall: Duration,
) -> Result<u64, ProxyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    // Small at first: the return path carries a few bytes per migration outside postcopy, so a
    // zeroed MiB per migration would be wasted. A read that fills the buffer doubles it.
    let mut buf = vec![0u8; RELAY_BUFFER_START_BYTES];
    // Named once: every read of a multifd channel in copy mode passes through here.
    let (write_what, flush_what) = (format!("{what}: write"), format!("{what}: flush"));
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closes without close_notify (QEMU's multifd channels do);
            // plain sockets never report this on read.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(ProxyError::io(format!("{what}: read"), e)),
        };
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        stall::write_all(&mut writer, chunk, stall, &write_what).await?;
        // A TLS writer may keep records it could not send yet until flushed: a return-path
        // message would then wait there until the next one. A no-op for plain sockets.
        stall::progress(stall, &flush_what, writer.flush()).await?;
        total = add_bytes(total, n, counters);
        if n == buf.len() && buf.len() < RELAY_BUFFER_BYTES {
            buf.resize(buf.len().saturating_mul(2).min(RELAY_BUFFER_BYTES), 0);
        }
    }
    // The peer may already be gone after a complete exchange; the data went out.
    let _ = writer.shutdown().await;
    Ok(total)
}

pub(crate) fn add_bytes(total: u64, n: usize, counters: &[&AtomicU64]) -> u64 {
    let n = u64::try_from(n).unwrap_or(u64::MAX);
    for counter in counters {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    total.saturating_add(n)
}

/// Relay a whole non-main channel both ways until both directions reached EOF.
pub async fn relay_channel<SR, SW, DR, DW>(
    source: (SR, SW),
    destination: (DR, DW),
    to_destination: &[&AtomicU64],
    to_source: &[&AtomicU64],
    kind: &str,
    stall: Duration,
) -> Result<(), ProxyError>
where
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
    DR: AsyncRead + Unpin,
    DW: AsyncWrite + Unpin,
{
    let (src_read, src_write) = source;
    let (dst_read, dst_write) = destination;
    let forward_what = format!("{kind} source->destination");
    let backward_what = format!("{kind} destination->source");
    let forward = pump(src_read, dst_write, to_destination, &forward_what, stall);
    let backward = pump(dst_read, src_write, to_source, &backward_what, stall);
    let (f, b) = tokio::try_join!(forward, backward)?;
    tracing::debug!(to_destination = f, to_source = b, "channel finished");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> std::io::Result<(TcpStream, Conn)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        Ok((client, Conn::Tcp(server)))
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() -> std::io::Result<()> {
        let (mut source, source_side) = pair().await?;
        let (mut destination, destination_side) = pair().await?;
        let counters = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let task_counters = Arc::clone(&counters);
        let task = tokio::spawn(async move {
            relay_channel(
                PrefixedIo::new(&b"PRE"[..], source_side).into_split(),
                destination_side.into_split(),
                &[&task_counters.0],
                &[&task_counters.1],
                "multifd",
                std::time::Duration::from_secs(30),
            )
            .await
        });
        source.write_all(b"fix").await?;
        source.shutdown().await?;
        let mut got = Vec::new();
        destination.read_to_end(&mut got).await?;
        assert_eq!(got, b"PREfix");
        // The reverse direction still works after the forward one ended.
        destination.write_all(b"SHUT").await?;
        destination.shutdown().await?;
        let mut back = Vec::new();
        source.read_to_end(&mut back).await?;
        assert_eq!(back, b"SHUT");
        task.await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        assert_eq!(counters.0.load(Ordering::Relaxed), 6);
        assert_eq!(counters.1.load(Ordering::Relaxed), 4);
        Ok(())
    }

    #[tokio::test]
    async fn delivers_each_chunk_through_a_buffering_writer() -> std::io::Result<()> {
        // A TLS writer keeps records it could not send yet until flushed (a BufWriter does the
        // same): a return-path message must reach the source while the channel stays open.
        let (mut destination, destination_read) = tokio::io::duplex(1 << 16);
        let (source_write, mut source) = tokio::io::duplex(1 << 16);
        let counter = AtomicU64::new(0);
        let counters = [&counter];
        let relay = pump(
            destination_read,
            tokio::io::BufWriter::new(source_write),
            &counters,
            "return path",
            std::time::Duration::from_secs(30),
        );
        let exchange = async {
            destination.write_all(b"SHUT").await?;
            let mut got = [0u8; 4];
            source.read_exact(&mut got).await?;
            assert_eq!(&got, b"SHUT");
            destination.shutdown().await
        };
        let both = async { tokio::join!(relay, exchange) };
        let (relayed, exchanged) = tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .map_err(|_| {
                std::io::Error::other("the relayed bytes stayed in the writer's buffer")
            })?;
        exchanged?;
        assert_eq!(relayed.map_err(std::io::Error::other)?, 4);
        Ok(())
    }
}
