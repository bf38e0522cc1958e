//! The main channel pump: source -> `StreamDecoder` -> (rewrite the `cpu` sections) -> destination,
//! with the return path relayed raw the other way at the same time.
//!
//! ```text
//! source ──read 1 MiB──▶ FramedRead<StreamDecoder> ──Verbatim/Payload (Bytes)──▶ write queue ──▶ destination
//!                                   └──DeviceState──▶ rewrite cpus ──encode──▶┘   (vectored writes)
//! source ◀──────────────────── raw relay (return path, at once) ◀─────────────────────── destination
//! ```
//!
//! Page payloads are `Bytes` cut from the read buffer and written as they are (vectored, no copy
//! into an encoder buffer); only the held device-state phase is re-encoded. A write waits for the
//! destination, and nothing is read meanwhile: a slow destination slows the source down instead of
//! growing memory (backpressure). There is no idle timeout: with multifd the main channel may sit
//! silent for the whole RAM phase. The only clock is the description deadline (DESIGN.md,
//! "No description means no exact delimiting"): once the decoder has read the EOF of a held device phase it waits for the description,
//! and a source with `suppress-vmdesc=on` and a return path would wait for the destination
//! forever, so the wait is bounded and its end fails the migration closed.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use migproxy_codec::{
    DecodeError, DeviceState, Frame, Limits, MigCommand, RecordKind, StreamDecoder,
};
use migproxy_config::{RewriteReport, SubsectionReport};
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio_util::codec::{Decoder, FramedRead};

use crate::conn::{Conn, ConnRead, ConnWrite};
use crate::error::ProxyError;
use crate::migration::Migration;
use crate::profile_source::RewriteSetup;
use crate::relay;
use crate::subsection_rules;

/// Read buffer of the main channel.
pub const READ_BUFFER_BYTES: usize = 1 << 20;
/// Queued output is written once it reaches this size (or when the source has nothing more).
const FLUSH_BYTES: usize = 1 << 20;
/// At most this many buffers per vectored write: Linux's IOV_MAX, so a 1 MiB flush of 4 KiB
/// pages (a header and a payload each) is one writev.
const MAX_IOVECS: usize = 1024;

/// Main-channel settings shared by every migration of a listener.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub limits: Limits,
    /// How long to wait for the description after the EOF of a held device phase.
    pub description_timeout: Duration,
}

/// Pump one main channel until both directions have ended.
pub async fn run(
    source_read: ConnRead,
    prefix: &[u8],
    source_write: ConnWrite,
    destination: Conn,
    rewrite: Option<&RewriteSetup>,
    migration: &Migration,
    settings: &ChannelSettings,
) -> Result<(), ProxyError> {
    let (dest_read, dest_write) = destination.into_split();
    let to_source = [
        &migration.bytes_to_source,
        &migration.metrics.bytes_to_source,
    ];
    let forwarded = AtomicBool::new(false);
    let forward = async {
        forward(
            source_read,
            prefix,
            dest_write,
            rewrite,
            migration,
            settings,
        )
        .await?;
        forwarded.store(true, Ordering::Release);
        Ok::<(), ProxyError>(())
    };
    // The source blocks on SHUT, PONG and page requests: relay them the moment they arrive.
    let return_path = async {
        match relay::pump(dest_read, source_write, &[], &to_source, "return path").await {
            // QEMU may reset the main connection once the migration is over (TLS included): after
            // the whole stream went through, that is a normal end.
            Err(ProxyError::Io { source, .. })
                if forwarded.load(Ordering::Acquire)
                    && matches!(
                        source.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
            {
                Ok(0)
            }
            other => other,
        }
    };
    tokio::try_join!(forward, return_path)?;
    Ok(())
}

async fn forward(
    source: ConnRead,
    prefix: &[u8],
    destination: ConnWrite,
    rewrite: Option<&RewriteSetup>,
    migration: &Migration,
    settings: &ChannelSettings,
) -> Result<(), ProxyError> {
    let awaiting = Arc::new(AtomicBool::new(false));
    let decoder = WatchedDecoder {
        inner: StreamDecoder::new(settings.limits.clone()),
        awaiting_description: Arc::clone(&awaiting),
    };
    let reader = DescriptionDeadline {
        inner: source,
        awaiting_description: awaiting,
        timeout: settings.description_timeout,
        sleep: None,
    };
    let mut frames = FramedRead::with_capacity(reader, decoder, READ_BUFFER_BYTES);
    // The classifier already consumed the magic.
    frames.read_buffer_mut().extend_from_slice(prefix);
    let mut out = WriteQueue {
        writer: destination,
        chunks: VecDeque::new(),
        queued: 0,
        counters: [
            &migration.bytes_to_destination,
            &migration.metrics.bytes_to_destination,
        ],
    };
    let mut flagged_no_return_path = false;
    loop {
        // Batch what is already decoded; write before waiting for the source again.
        let next = match frames.next().now_or_never() {
            Some(next) => next,
            None => {
                out.flush().await?;
                make_room(frames.read_buffer_mut());
                frames.next().await
            }
        };
        let frame = match next {
            None => break,
            Some(Ok(frame)) => frame,
            // A TLS source that closes without close_notify, or resets, once its stream is
            // complete: nothing more could have followed.
            Some(Err(DecodeError::Io(err)))
                if matches!(
                    err.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) && frames.decoder().inner.is_done() =>
            {
                break
            }
            Some(Err(err)) => {
                return Err(decode_failure(err, frames.decoder(), settings));
            }
        };
        match frame {
            Frame::Verbatim { kind, bytes, .. } => {
                match &kind {
                    RecordKind::Command(MigCommand::OpenReturnPath) => migration.note_return_path(),
                    RecordKind::Command(MigCommand::PostcopyAdvise { .. }) => {
                        migration.note_postcopy_advised();
                        if rewrite.is_some() {
                            // DESIGN.md: device state would travel in a PACKAGED blob
                            // without description; refusing after the switch would strand the
                            // guest, refusing now leaves it running at the source.
                            return Err(ProxyError::Refused(format!(
                                "postcopy advised at byte {}: a rewriting proxy cannot delimit the device state of a postcopy package; migrate without postcopy, or run a checking relay (no profile)",
                                frames.decoder().inner.offset()
                            )));
                        }
                    }
                    RecordKind::SectionStart { .. } if !flagged_no_return_path => {
                        flagged_no_return_path = true;
                        if !migration.has_return_path() {
                            tracing::warn!(
                                "migration without a return path: if it is refused later, the source leaves the guest paused instead of resuming it (enable the return-path capability)"
                            );
                        }
                    }
                    _ => {}
                }
                out.push(bytes);
            }
            Frame::Payload { bytes, .. } => out.push(bytes),
            Frame::DeviceState(mut state) => {
                let (rewritten, removed) = match rewrite {
                    Some(setup) => (
                        rewrite_cpus(&mut state, setup)?,
                        subsection_rules::apply(&mut state, &setup.dest)?,
                    ),
                    None => (Vec::new(), Vec::new()),
                };
                out.push(state.to_bytes());
                // Both QEMUs are stopped until the destination has the device state: release
                // it before anything else (logging, metrics) runs.
                out.flush().await?;
                report_rewrites(&rewritten, migration);
                report_removed_subsections(&removed, migration);
            }
        }
        if out.queued >= FLUSH_BYTES {
            out.flush().await?;
        }
    }
    out.flush().await?;
    // Half-close: the destination sees EOF; its SHUT still comes back on the return path.
    let _ = out.writer.shutdown().await;
    tracing::debug!(
        bytes = frames.decoder().inner.offset(),
        "main channel: source finished"
    );
    Ok(())
}

/// Give the next read up to 1 MiB of room. FramedRead alone regrows its buffer in 8-64 KiB steps
/// once page payloads have been cut from it; after a flush no frame refers to the buffer any more,
/// so this reclaims the same allocation instead of growing memory.
fn make_room(buffer: &mut BytesMut) {
    let spare = buffer.capacity().saturating_sub(buffer.len());
    if spare < READ_BUFFER_BYTES / 2 {
        let wanted = READ_BUFFER_BYTES
            .saturating_sub(buffer.len())
            .max(READ_BUFFER_BYTES / 2);
        buffer.reserve(wanted);
    }
}

/// One vCPU whose cpreg arrays were replaced, for the log and the metrics.
struct RewrittenCpu {
    report: RewriteReport,
    registers: usize,
}

/// Replace every vCPU's cpreg arrays with the destination's list (DESIGN.md, "Rewriting is a pure function"), then the `cpu` subsections
/// (`subsection_rules`).
///
/// Runs while both QEMUs are stopped, so it only computes and applies; what was done is logged
/// by [`report_rewrites`] once the device state has been written.
fn rewrite_cpus(
    state: &mut DeviceState,
    setup: &RewriteSetup,
) -> Result<Vec<RewrittenCpu>, ProxyError> {
    let mut rewritten = Vec::new();
    for cpu in state.cpus() {
        let result = migproxy_config::rewrite(
            cpu.instance,
            &cpu.registers,
            &setup.dest,
            setup.source.as_deref(),
            &setup.policy,
        );
        let report = result.report;
        if report.is_refused() {
            for warning in &report.warnings {
                tracing::warn!(vcpu = cpu.instance, "{warning}");
            }
            // The summary already names the vCPU.
            return Err(ProxyError::Refused(report.refusal_summary()));
        }
        if !report.is_unchanged() {
            state
                .set_cpregs(cpu.instance, &result.registers)
                .map_err(ProxyError::Decode)?;
        }
        if !report.is_unchanged() || !report.warnings.is_empty() {
            rewritten.push(RewrittenCpu {
                report,
                registers: result.registers.len(),
            });
        }
    }
    Ok(rewritten)
}

/// Log and count what [`rewrite_cpus`] did, after the device state has been released.
fn report_rewrites(rewritten: &[RewrittenCpu], migration: &Migration) {
    for RewrittenCpu { report, registers } in rewritten {
        for warning in &report.warnings {
            tracing::warn!(vcpu = report.vcpu, "{warning}");
        }
        if report.is_unchanged() {
            continue;
        }
        tracing::info!(
            vcpu = report.vcpu,
            dropped = report.dropped.len(),
            filled = report.filled.len(),
            registers,
            "cpu registers rewritten"
        );
        let metrics = &migration.metrics;
        metrics.cpus_rewritten.fetch_add(1, Ordering::Relaxed);
        metrics
            .registers_dropped
            .fetch_add(count(report.dropped.len()), Ordering::Relaxed);
        metrics
            .registers_filled
            .fetch_add(count(report.filled.len()), Ordering::Relaxed);
        if let Ok(mut summary) = migration.rewrite_summary.lock() {
            summary.cpus_rewritten = summary.cpus_rewritten.saturating_add(1);
            for dropped in &report.dropped {
                let name = dropped.id.to_string();
                if !summary.dropped.contains(&name) {
                    summary.dropped.push(name);
                }
            }
            for filled in &report.filled {
                let name = filled.id.to_string();
                if !summary.filled.contains(&name) {
                    summary.filled.push(name);
                }
            }
        }
    }
}

/// Log the subsections [`subsection_rules::apply`] removed, after the device state was released.
fn report_removed_subsections(reports: &[SubsectionReport], migration: &Migration) {
    for report in reports {
        for removed in &report.removed {
            tracing::info!(
                vcpu = report.vcpu,
                subsection = %removed.name,
                reason = %removed.reason,
                "cpu subsection removed"
            );
            if let Ok(mut summary) = migration.rewrite_summary.lock() {
                if !summary.subsections_removed.contains(&removed.name) {
                    summary.subsections_removed.push(removed.name.clone());
                }
            }
        }
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A decode error, or our description deadline surfacing through the reader.
fn decode_failure(
    err: DecodeError,
    decoder: &WatchedDecoder,
    settings: &ChannelSettings,
) -> ProxyError {
    match err {
        DecodeError::Io(io) if io.kind() == io::ErrorKind::TimedOut => ProxyError::Refused(format!(
            "at byte {}: the source sent no description and went silent for {} ms in the device-state phase (suppress-vmdesc?); device sections cannot be delimited",
            decoder.inner.offset(),
            settings.description_timeout.as_millis()
        )),
        DecodeError::Io(io) => ProxyError::io("main channel: read from source", io),
        other => ProxyError::Decode(other),
    }
}

/// The decoder, publishing whether it waits for the description (the reader owns the clock).
struct WatchedDecoder {
    inner: StreamDecoder,
    awaiting_description: Arc<AtomicBool>,
}

impl Decoder for WatchedDecoder {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let frame = self.inner.decode(src);
        self.awaiting_description
            .store(self.inner.awaiting_description(), Ordering::Release);
        frame
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        self.inner.decode_eof(src)
    }
}

/// The source's read half, failing with `TimedOut` once the source has been silent for the
/// description timeout while the decoder waits for the description.
struct DescriptionDeadline {
    inner: ConnRead,
    awaiting_description: Arc<AtomicBool>,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for DescriptionDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.awaiting_description.load(Ordering::Acquire) {
            let timeout = this.timeout;
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "description overdue",
                )));
            }
        }
        let filled_before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        // The clock measures silence, not the length of the device phase: the decoder waits
        // from the first device section on (the EOF's position is known only once the
        // description verifies), and several MB of device state over a slow link must not
        // time out while bytes are still arriving.
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > filled_before {
            this.sleep = None;
        }
        polled
    }
}

/// Output waiting for the destination: the frames' own `Bytes`, written with vectored writes.
struct WriteQueue<'a> {
    writer: ConnWrite,
    chunks: VecDeque<Bytes>,
    queued: usize,
    counters: [&'a AtomicU64; 2],
}

impl WriteQueue<'_> {
    fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued = self.queued.saturating_add(bytes.len());
            self.chunks.push_back(bytes);
        }
    }

    async fn flush(&mut self) -> Result<(), ProxyError> {
        while !self.chunks.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .chunks
                .iter()
                .take(MAX_IOVECS)
                .map(|chunk| IoSlice::new(chunk))
                .collect();
            let written = self
                .writer
                .write_vectored(&slices)
                .await
                .map_err(|e| ProxyError::io("main channel: write to destination", e))?;
            drop(slices);
            if written == 0 {
                return Err(ProxyError::io(
                    "main channel: write to destination",
                    io::ErrorKind::WriteZero.into(),
                ));
            }
            self.advance(written);
        }
        Ok(())
    }

    fn advance(&mut self, mut written: usize) {
        self.queued = self.queued.saturating_sub(written);
        for counter in self.counters {
            counter.fetch_add(count(written), Ordering::Relaxed);
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
