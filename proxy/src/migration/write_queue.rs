//! Output of the main channel waiting for the destination: the frames' own `Bytes`, written with
//! vectored writes, so page payloads cut from the read buffer are never copied.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use std::time::Duration;

use crate::error::ProxyError;
use crate::net::stall;

/// At most this many buffers per vectored write: Linux's IOV_MAX, so a 1 MiB flush of 4 KiB
/// pages (a header and a payload each) is one writev.
const MAX_IOVECS: usize = 1024;

pub struct WriteQueue<'a, W> {
    writer: W,
    chunks: VecDeque<Bytes>,
    queued: usize,
    counters: [&'a AtomicU64; 2],
    /// How long one write may take nothing (`net::stall`, `--write-stall-timeout`).
    stall: Duration,
}

impl<'a, W: AsyncWrite + Unpin> WriteQueue<'a, W> {
    /// `counters` are advanced by every byte the destination accepted; a destination that takes
    /// nothing for `stall` fails the flush.
    pub fn new(writer: W, counters: [&'a AtomicU64; 2], stall: Duration) -> WriteQueue<'a, W> {
        WriteQueue {
            writer,
            chunks: VecDeque::new(),
            queued: 0,
            counters,
            stall,
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued = self.queued.saturating_add(bytes.len());
            self.chunks.push_back(bytes);
        }
    }

    /// Write everything queued; returns once the destination has taken it (backpressure: a slow
    /// destination keeps the caller here, and the caller reads nothing meanwhile).
    pub async fn flush(&mut self) -> Result<(), ProxyError> {
        while !self.chunks.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .chunks
                .iter()
                .take(MAX_IOVECS)
                .map(|chunk| IoSlice::new(chunk))
                .collect();
            let written = stall::progress(
                self.stall,
                "main channel: write to destination",
                self.writer.write_vectored(&slices),
            )
            .await?;
            drop(slices);
            if written == 0 {
                return Err(ProxyError::io(
                    "main channel: write to destination",
                    io::ErrorKind::WriteZero.into(),
                ));
            }
            self.advance(written);
        }
        // A TLS writer may hold encrypted records it could not send yet (the socket was full)
        // until flushed; the last bytes of a migration would wait there while both QEMUs wait
        // for each other. A no-op for plain sockets.
        stall::progress(
            self.stall,
            "main channel: flush to destination",
            self.writer.flush(),
        )
        .await
    }

    /// Half-close: the destination sees EOF. The peer may already be gone after a complete
    /// exchange; the data went out.
    pub async fn shutdown(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    fn advance(&mut self, mut written: usize) {
        self.queued = self.queued.saturating_sub(written);
        let added = u64::try_from(written).unwrap_or(u64::MAX);
        for counter in self.counters {
            counter.fetch_add(added, Ordering::Relaxed);
        }
        while written > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if written >= front.len() {
                written = written.saturating_sub(front.len());
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(written);
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn partial_writes_resume_where_they_stopped() -> Result<(), Box<dyn std::error::Error>> {
        // An 8-byte pipe takes every vectored write only in part.
        let (writer, mut reader) = tokio::io::duplex(8);
        let counter = AtomicU64::new(0);
        let other = AtomicU64::new(0);
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.map(|_| got)
        });
        let mut queue = WriteQueue::new(writer, [&counter, &other], Duration::from_secs(30));
        queue.push(Bytes::from_static(b"header"));
        queue.push(Bytes::new());
        queue.push(Bytes::from_static(b"0123456789abcdef"));
        assert_eq!(queue.queued(), 22);
        queue.flush().await?;
        assert_eq!(queue.queued(), 0);
        queue.shutdown().await;
        drop(queue);
        assert_eq!(reading.await??, b"header0123456789abcdef");
        assert_eq!(counter.load(Ordering::Relaxed), 22);
        assert_eq!(other.load(Ordering::Relaxed), 22);
        Ok(())
    }

    #[tokio::test]
    async fn flush_pushes_through_a_buffering_writer() -> Result<(), Box<dyn std::error::Error>> {
        // A TLS writer keeps encrypted records it could not send yet until it is flushed; a
        // BufWriter buffers the same way. Without the flush the last bytes of a migration would
        // wait there while both QEMUs wait for each other.
        let (writer, mut reader) = tokio::io::duplex(1 << 16);
        let counter = AtomicU64::new(0);
        let other = AtomicU64::new(0);
        let mut queue = WriteQueue::new(
            tokio::io::BufWriter::new(writer),
            [&counter, &other],
            Duration::from_secs(30),
        );
        queue.push(Bytes::from_static(b"QEVM-end"));
        queue.flush().await?;
        let mut got = [0u8; 8];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            reader.read_exact(&mut got),
        )
        .await??;
        assert_eq!(&got, b"QEVM-end");
        Ok(())
    }
}
