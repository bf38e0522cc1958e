//! The raw relay for plain TCP on both sides: socket -> pipe -> socket with `splice(2)`, so the
//! bytes of multifd, preempt and return-path channels never pass through user space.
//!
//! Same contract as the copying relay in `relay.rs`: the identifying prefix goes out first, every
//! relayed byte is added to the counters, EOF is propagated per direction with a half-close,
//! errors name the direction (`multifd source->destination: read: ...`), and a destination or
//! source that takes nothing for `--write-stall-timeout` ends it (`net::stall`). Memory stays bounded the same way: one pipe
//! per direction (kernel pages, at most `PIPE_BYTES`) takes the place of the 1 MiB buffer, and the
//! pipe is drained completely before the next read, so a destination that stops reading stops
//! our reads, which fills the kernel socket buffers, which stops the sender.
//!
//! Readiness comes from tokio (`readable()`/`writable()`, `try_io`): a splice that would block
//! clears the socket's readiness and waits for the next edge. Because a read only happens into
//! an empty pipe and a write only happens from a non-empty one, EAGAIN always means the socket,
//! never the pipe. TLS and unix connections keep the copying relay (`RawRelay`).
//!
//! The syscalls come from `rustix` (safe wrappers; this crate forbids unsafe code). A splice
//! into a socket whose peer is gone returns EPIPE: Rust programs ignore SIGPIPE from startup.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use rustix::pipe::{
    fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags,
};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::net::relay::add_bytes;
use crate::net::stall;

/// Pipe size asked for per direction (the copying relay's buffer size). The kernel may refuse it
/// (fs.pipe-max-size, or the user's pipe page budget): the pipe then keeps its default size,
/// which only costs more syscalls.
pub const PIPE_BYTES: usize = 1 << 20;

const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

/// One direction's pipe: what was spliced in from one socket waits here to be spliced out.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

/// The pipe size for relaying from `from`: [`PIPE_BYTES`], but never more than `from`'s receive
/// buffer holds. A pipe larger than the socket it drains only adds bytes in flight; where the
/// source's buffer was made small (migproxy on the source host, `Conn::tune_as_local_source`),
/// the pipe must not hold back what the buffer no longer does.
fn pipe_bytes_for(from: &TcpStream) -> usize {
    socket2::SockRef::from(from)
        .recv_buffer_size()
        .map_or(PIPE_BYTES, |held| held.min(PIPE_BYTES))
}

impl Pipe {
    fn new(bytes: usize) -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        if let Err(err) = fcntl_setpipe_size(&write, bytes) {
            tracing::debug!(%err, "F_SETPIPE_SZ refused: the pipe keeps its default size");
        }
        let capacity = fcntl_getpipe_size(&write)?;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Splice what `from` has into the empty pipe: wait until it is readable, then take what is
    /// there (0 at EOF). One splice takes everything the socket has queued, up to the pipe's
    /// room: a second one at once was mostly a wasted EAGAIN (dropping it took a sixth of the
    /// splices off a 4-channel multifd run). What arrives meanwhile, or did not fit because the
    /// pipe ran out of slots before it ran out of bytes, is taken by the next `fill`: the
    /// socket's readiness stays set until a splice into the then empty pipe says EAGAIN, which
    /// can only mean the socket. A read error is reported by that next splice (into an empty
    /// pipe, so nothing already read is lost).
    async fn fill(&self, from: &TcpStream) -> io::Result<usize> {
        loop {
            from.readable().await?;
            let spliced = from.try_io(Interest::READABLE, || self.splice_in(from, self.capacity));
            match spliced {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn splice_in(&self, from: &TcpStream, len: usize) -> io::Result<usize> {
        splice(from, None, &self.write, None, len, FLAGS).map_err(io::Error::from)
    }

    /// Splice all `len` bytes in the pipe out into `to`; every wait for room in `to` must end
    /// within `stall` (`net::stall`: a peer that takes nothing for that long is given up on).
    async fn drain(
        &self,
        to: &TcpStream,
        mut len: usize,
        stall: Duration,
        what: &str,
    ) -> Result<(), ProxyError> {
        while len > 0 {
            stall::progress(stall, what, to.writable()).await?;
            let spliced = to.try_io(Interest::WRITABLE, || {
                splice(&self.read, None, to, None, len, FLAGS).map_err(io::Error::from)
            });
            match spliced {
                Ok(0) => return Err(ProxyError::io(what, io::ErrorKind::WriteZero.into())),
                Ok(n) => len = len.saturating_sub(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(ProxyError::io(what, err)),
            }
        }
        Ok(())
    }
}

/// Relay `from` to `to` until EOF, then half-close `to`. Returns the bytes relayed.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    counters: &[&AtomicU64],
    what: &str,
    stall: Duration,
) -> Result<u64, ProxyError> {
    let pipe =
        Pipe::new(pipe_bytes_for(from)).map_err(|e| ProxyError::io(format!("{what}: pipe"), e))?;
    let mut total = 0u64;
    loop {
        let filled = pipe
            .fill(from)
            .await
            .map_err(|e| ProxyError::io(format!("{what}: read"), e))?;
        if filled == 0 {
            break;
        }
        pipe.drain(to, filled, stall, &format!("{what}: write"))
            .await?;
        total = add_bytes(total, filled, counters);
    }
    // The peer may already be gone after a complete exchange; the data went out.
    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    Ok(total)
}

/// Relay a whole non-main channel both ways until both directions reached EOF; `prefix` (the
/// source's identifying bytes, already read) goes to the destination first.
pub async fn splice_channel(
    source: TcpStream,
    prefix: Bytes,
    mut destination: TcpStream,
    to_destination: &[&AtomicU64],
    to_source: &[&AtomicU64],
    kind: &str,
    stall: Duration,
) -> Result<(), ProxyError> {
    let forward_what = format!("{kind} source->destination");
    let backward_what = format!("{kind} destination->source");
    stall::write_all(
        &mut destination,
        &prefix,
        stall,
        &format!("{forward_what}: write"),
    )
    .await?;
    let prefix_bytes = add_bytes(0, prefix.len(), to_destination);
    let forward = pump(&source, &destination, to_destination, &forward_what, stall);
    let backward = pump(&destination, &source, to_source, &backward_what, stall);
    let (f, b) = tokio::try_join!(forward, backward)?;
    tracing::debug!(
        to_destination = f.saturating_add(prefix_bytes),
        to_source = b,
        relay = "splice",
        "channel finished"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    const DEADLINE: Duration = Duration::from_secs(60);

    /// Two connected loopback sockets: (the peer's end, our end).
    async fn pair() -> io::Result<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let peer = TcpStream::connect(listener.local_addr()?).await?;
        let (ours, _) = listener.accept().await?;
        Ok((peer, ours))
    }

    struct Rig {
        source: TcpStream,
        destination: TcpStream,
        counters: Arc<(AtomicU64, AtomicU64)>,
        relay: JoinHandle<Result<(), ProxyError>>,
    }

    async fn rig(prefix: &'static [u8]) -> io::Result<Rig> {
        let (source, source_side) = pair().await?;
        let (destination, destination_side) = pair().await?;
        let counters = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let task_counters = Arc::clone(&counters);
        let relay = tokio::spawn(async move {
            splice_channel(
                source_side,
                Bytes::from_static(prefix),
                destination_side,
                &[&task_counters.0],
                &[&task_counters.1],
                "multifd",
                DEADLINE,
            )
            .await
        });
        Ok(Rig {
            source,
            destination,
            counters,
            relay,
        })
    }

    /// Deterministic pseudo-random bytes (xorshift64).
    fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Write `data` then half-close, while reading everything from the same socket.
    async fn exchange(stream: TcpStream, data: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut read, mut write) = stream.into_split();
        let writer = async move {
            write.write_all(&data).await?;
            write.shutdown().await?;
            Ok::<_, io::Error>(write)
        };
        let reader = async move {
            let mut got = Vec::new();
            read.read_to_end(&mut got).await?;
            Ok::<_, io::Error>(got)
        };
        let (_write, got) = tokio::try_join!(writer, reader)?;
        Ok(got)
    }

    async fn relay_both_ways(forward: Vec<u8>, backward: Vec<u8>) -> io::Result<()> {
        let rig = rig(b"").await?;
        let both = async {
            tokio::try_join!(
                exchange(rig.source, forward.clone()),
                exchange(rig.destination, backward.clone())
            )
        };
        let (at_source, at_destination) = tokio::time::timeout(DEADLINE, both).await??;
        assert!(
            at_destination == forward,
            "{} bytes forward differ",
            forward.len()
        );
        assert!(
            at_source == backward,
            "{} bytes backward differ",
            backward.len()
        );
        rig.relay.await?.map_err(io::Error::other)?;
        let counted = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(counted(&rig.counters.0), forward.len() as u64);
        assert_eq!(counted(&rig.counters.1), backward.len() as u64);
        Ok(())
    }

    #[tokio::test]
    async fn the_pipe_never_holds_more_than_the_socket_it_drains() -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let small = TcpStream::connect(listener.local_addr()?).await?;
        let (large, _) = listener.accept().await?;
        socket2::SockRef::from(&small).set_recv_buffer_size(64 << 10)?;
        socket2::SockRef::from(&large).set_recv_buffer_size(PIPE_BYTES)?;
        let from_small = Pipe::new(pipe_bytes_for(&small))?.capacity;
        let from_large = Pipe::new(pipe_bytes_for(&large))?.capacity;
        // The kernel reports twice the asked receive buffer and rounds pipes up to pages.
        assert!(from_small <= 128 << 10, "pipe of {from_small} bytes");
        assert_eq!(pipe_bytes_for(&large), PIPE_BYTES);
        assert!(from_large > from_small, "{from_large} vs {from_small}");
        Ok(())
    }

    #[tokio::test]
    async fn relays_equal_bytes_both_ways_around_the_pipe_size() -> io::Result<()> {
        let pipe = Pipe::new(PIPE_BYTES)?.capacity;
        assert!(pipe >= 4096, "pipe of {pipe} bytes");
        for (i, len) in [0, 1, pipe - 1, pipe, pipe + 1].into_iter().enumerate() {
            let seed = u64::try_from(i).unwrap_or(0) + 1;
            relay_both_ways(random_bytes(len, seed), random_bytes(len, seed + 100)).await?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn relays_64_mib_of_random_bytes_both_ways() -> io::Result<()> {
        relay_both_ways(random_bytes(64 << 20, 7), random_bytes(64 << 20, 8)).await
    }

    #[tokio::test]
    async fn the_prefix_goes_first_and_the_return_path_flows_after_eof() -> io::Result<()> {
        let mut rig = rig(b"\x11\x22\x33\x44").await?;
        rig.source.write_all(b"pages").await?;
        rig.source.shutdown().await?;
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, rig.destination.read_to_end(&mut got)).await??;
        assert_eq!(got, b"\x11\x22\x33\x44pages");
        // The forward direction ended; the source still waits for the destination's answer.
        rig.destination.write_all(b"SHUT").await?;
        let mut answer = [0u8; 4];
        tokio::time::timeout(DEADLINE, rig.source.read_exact(&mut answer)).await??;
        assert_eq!(&answer, b"SHUT");
        assert!(
            !rig.relay.is_finished(),
            "the relay ended with one direction open"
        );
        rig.destination.shutdown().await?;
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, rig.source.read_to_end(&mut rest)).await??;
        assert!(rest.is_empty());
        rig.relay.await?.map_err(io::Error::other)?;
        assert_eq!(rig.counters.0.load(Ordering::Relaxed), 9);
        assert_eq!(rig.counters.1.load(Ordering::Relaxed), 4);
        Ok(())
    }

    #[tokio::test]
    async fn every_small_message_arrives_while_the_channel_stays_open() -> io::Result<()> {
        // Request and answer, as QEMU's return path and multifd sync do: each message must be
        // relayed on its own, without more bytes or an EOF behind it to push it through (a lost
        // readiness, or a low-water mark such as SO_RCVLOWAT, would hold it here).
        let mut rig = rig(b"").await?;
        let exchange = async {
            for round in 0u16..200 {
                let request = random_bytes(1 + usize::from(round) * 37 % 3000, u64::from(round));
                rig.source.write_all(&request).await?;
                let mut got = vec![0u8; request.len()];
                rig.destination.read_exact(&mut got).await?;
                assert!(got == request, "round {round}: request differs");
                let answer = round.to_le_bytes();
                rig.destination.write_all(&answer).await?;
                let mut back = [0u8; 2];
                rig.source.read_exact(&mut back).await?;
                assert_eq!(back, answer, "round {round}: answer differs");
            }
            Ok::<_, io::Error>(())
        };
        tokio::time::timeout(DEADLINE, exchange)
            .await
            .map_err(|_| io::Error::other("a message stayed in the relay"))??;
        assert!(
            !rig.relay.is_finished(),
            "the relay ended on an open channel"
        );
        rig.source.shutdown().await?;
        rig.destination.shutdown().await?;
        rig.relay.await?.map_err(io::Error::other)?;
        Ok(())
    }

    #[tokio::test]
    async fn a_destination_that_stops_reading_stops_our_reads() -> io::Result<()> {
        let rig = rig(b"").await?;
        let total = 256usize << 20;
        let accepted = Arc::new(AtomicU64::new(0));
        let writer = {
            let accepted = Arc::clone(&accepted);
            let mut source = rig.source;
            tokio::spawn(async move {
                let chunk = random_bytes(1 << 20, 3);
                for _ in 0..(total >> 20) {
                    source.write_all(&chunk).await?;
                    accepted.fetch_add(1 << 20, Ordering::Relaxed);
                }
                source.shutdown().await?;
                Ok::<_, io::Error>(source)
            })
        };
        // Wait until nothing moves any more for half a second.
        let mut last = u64::MAX;
        let stalled = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = rig.counters.0.load(Ordering::Relaxed);
                if now == last {
                    return now;
                }
                last = now;
            }
        };
        let relayed = tokio::time::timeout(DEADLINE, stalled)
            .await
            .map_err(|_| io::Error::other("the relay never stalled"))?;
        let offered = accepted.load(Ordering::Relaxed);
        // Socket buffers (a few MiB each way, autotuned) plus one pipe, far from the 256 MiB.
        assert!(
            relayed < 32 << 20,
            "{relayed} bytes relayed to a destination reading nothing"
        );
        assert!(offered < 64 << 20, "the source could write {offered} bytes");
        assert!(!writer.is_finished(), "the source was not blocked");
        // Reading again lets everything through, in order.
        let mut destination = rig.destination;
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, destination.read_to_end(&mut got)).await??;
        assert_eq!(got.len(), total);
        let chunk = random_bytes(1 << 20, 3);
        assert!(got.chunks(1 << 20).all(|c| c == chunk.as_slice()));
        drop(writer.await??);
        destination.shutdown().await?;
        rig.relay.await?.map_err(io::Error::other)?;
        assert_eq!(rig.counters.0.load(Ordering::Relaxed), total as u64);
        Ok(())
    }

    #[tokio::test]
    async fn a_source_reset_mid_transfer_is_a_named_read_error() -> io::Result<()> {
        let mut rig = rig(b"").await?;
        rig.source.write_all(&random_bytes(1 << 20, 5)).await?;
        // Let some of it through, then reset (RST, not FIN: SO_LINGER 0).
        let mut some = vec![0u8; 4096];
        rig.destination.read_exact(&mut some).await?;
        socket2::SockRef::from(&rig.source).set_linger(Some(Duration::ZERO))?;
        drop(rig.source);
        let outcome = tokio::time::timeout(DEADLINE, rig.relay)
            .await
            .map_err(|_| io::Error::other("the relay did not notice the reset"))??;
        let Err(err) = outcome else {
            panic!("a reset source ended the relay without an error");
        };
        let text = err.to_string();
        assert!(
            text.contains("multifd source->destination: read"),
            "unexpected error: {text}"
        );
        Ok(())
    }
}
