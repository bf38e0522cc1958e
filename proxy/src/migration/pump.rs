//! The main channel pump: source -> `StreamDecoder` -> (rewrite the `cpu` sections) -> destination,
//! with the return path relayed raw the other way at the same time.
//!
//! ```text
//! source ──read ≤1 MiB──▶ StreamDecoder ──Verbatim/Payload (Bytes)──▶ WriteQueue ──▶ destination
//!                               └──DeviceState──▶ rewrite cpus ──encode──▶┘  (vectored writes)
//! source ◀──────────────────── raw relay (return path, at once) ◀──────────────────── destination
//! ```
//!
//! The pump owns its read loop: decode every frame the buffer holds, write them, then read again
//! (compare mini-redis `Connection::read_frame`). Page payloads are `Bytes` cut from the read
//! buffer and written as they are (vectored, no copy into an encoder buffer); consecutive page
//! records, headers and payloads, come as one such slice (`set_coalesce_ram_records`: each header
//! still parsed and checked), so bulk RAM is a few buffers per read, not two per page; only the held
//! device-state phase is re-encoded. A write waits for the destination, and nothing is read
//! meanwhile: a slow destination slows the source down instead of growing memory (backpressure).
//!
//! There is no idle timeout: with multifd the main channel may sit silent for the whole RAM phase.
//! The only clock is the description deadline (DESIGN.md, "No description means no exact
//! delimiting"): while the decoder holds the device phase it waits for the description, and a
//! source with `suppress-vmdesc=on` and a return path would wait for the destination forever, so
//! the phase has a deadline and its end refuses the migration. The clock measures the whole phase
//! from its first read, not silence: a source trickling one byte at a time (or guest bytes that
//! keep the decoder looking for the end) cannot keep both QEMUs stopped past the deadline. It is
//! configurable (`--description-timeout`) for device states of many MB over slow links.
//!
//! The pump reports to a [`MigrationState`] (counters, flags, rewrite summary), not to the whole
//! migration, so it runs over any byte streams: sockets in the daemon, in-memory pipes in tests.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use migproxy_codec::{
    DescriptionCache, Frame, Limits, MigCommand, PackageDeviceState, PackageEnding, RecordKind,
    StreamDecoder,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_util::codec::Decoder;

use crate::cli::UnreferencedDevicePhase;
use crate::error::{ProxyError, Refusal};
use crate::migration::destination_end::{DestinationEnd, Progress};
use crate::migration::postcopy::{self, SwitchRecovery, UnrecoverablePostcopy};
use crate::migration::profile_source::RewriteSetup;
use crate::migration::read_buffers::ReadBuffers;
use crate::migration::rewrite::{
    fix_subsections, report_removed_subsections, report_rewrites, rewrite_cpus, Rewritten,
};
use crate::migration::state::MigrationState;
use crate::migration::write_queue::WriteQueue;
use crate::net::relay;

/// Read buffer of the main channel.
pub const READ_BUFFER_BYTES: usize = 1 << 20;
/// Queued output is written once it reaches this size (or before the next read).
const FLUSH_BYTES: usize = 1 << 20;

/// Main-channel settings shared by every migration of a listener.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub limits: Limits,
    /// How long the held device phase may last, from its first read to its verified end.
    pub description_timeout: Duration,
    /// Rewriting proxies only: postcopy from a source that could not take its guest back.
    pub unrecoverable_postcopy: UnrecoverablePostcopy,
    /// How long a write to either peer may make no progress (`net::stall`).
    pub write_stall_timeout: Duration,
    /// How long connecting to the destination (and its TLS handshake) may take.
    pub dial_timeout: Duration,
    /// Rewriting proxies without a source reference: refused before the destination is dialed
    /// (`connection.rs`), or allowed to end the phase at a candidate.
    pub unreferenced_device_phase: UnreferencedDevicePhase,
    /// The listener's last accepted description, parsed: a migration whose description is
    /// byte-for-byte the same does not parse it again (seeded with the source reference's).
    pub description_cache: DescriptionCache,
    /// The listener's read buffers, kept across its migrations (`read_buffers.rs`).
    pub read_buffers: ReadBuffers,
}

/// Pump one main channel until both directions have ended: `source` and `destination` are the
/// read and write halves of each side.
pub async fn run<SR, SW, DR, DW>(
    (source_read, source_write): (SR, SW),
    (dest_read, dest_write): (DR, DW),
    rewrite: Option<&RewriteSetup>,
    state: &MigrationState,
    settings: &ChannelSettings,
) -> Result<(), ProxyError>
where
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
    DR: AsyncRead + Unpin,
    DW: AsyncWrite + Unpin,
{
    // How the destination ends its side decides whether the migration completed
    // (`destination_end.rs`); the bytes themselves go through untouched.
    let destination_end = DestinationEnd::default();
    let forward = Forward::new(
        source_read,
        destination_end.watch_writes(dest_write),
        rewrite,
        state,
        settings,
    )
    .run();
    // The source blocks on SHUT, PONG and page requests: relay them the moment they arrive.
    let return_path = async {
        let relayed = relay::pump(
            destination_end.watch(dest_read),
            source_write,
            &state.to_source(),
            "return path",
            settings.write_stall_timeout,
        )
        .await;
        destination_end.relay_ended(
            relayed,
            Progress {
                forwarded: state.stream_forwarded(),
                stream_complete: state.stream_complete(),
                tls: state.destination_tls(),
            },
        )
    };
    let carried = destination_end.both_directions(forward, return_path).await;
    destination_end.verdict(carried, state.has_return_path())
}

/// What one read from the source brought.
enum Read {
    Bytes,
    Eof,
    /// A TLS source that closes without close_notify, or resets, once its stream is complete:
    /// nothing more could have followed.
    ClosedAfterEnd,
}

/// The source -> destination direction.
struct Forward<'a, R, W> {
    source: R,
    buffer: BytesMut,
    decoder: StreamDecoder,
    out: WriteQueue<'a, W>,
    rewrite: Option<&'a RewriteSetup>,
    state: &'a MigrationState,
    description_timeout: Duration,
    unrecoverable_postcopy: UnrecoverablePostcopy,
    /// The decoder's limits, for the walk of a postcopy package.
    limits: Limits,
    /// When the held device phase must have ended: set at the phase's first read.
    description_deadline: Option<tokio::time::Instant>,
    flagged_no_return_path: bool,
    /// Where `buffer` goes back when the channel has ended.
    read_buffers: ReadBuffers,
}

impl<'a, R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Forward<'a, R, W> {
    fn new(
        source: R,
        destination: W,
        rewrite: Option<&'a RewriteSetup>,
        state: &'a MigrationState,
        settings: &ChannelSettings,
    ) -> Self {
        let mut decoder = StreamDecoder::new(settings.limits.clone());
        // RAM goes through as it came: runs of page records are one slice each, not a frame
        // per header and per payload.
        decoder.set_coalesce_ram_records(true);
        decoder.set_description_cache(settings.description_cache.clone());
        // Where the device phase ends (DESIGN.md, "How the end of the phase is recognised"):
        // without a rewrite nothing depends on it, so a guest-forged ending must not stop the
        // migration; a rewrite needs it exact, which the source's reference description makes
        // it. A rewrite without one ends at the first verified candidate, which only
        // `--unreferenced-device-phase allow` lets through (`connection.rs` refuses otherwise).
        match rewrite {
            None => decoder.set_checking_relay(true),
            Some(setup) => {
                if let Some(reference) = &setup.source_reference {
                    decoder.set_reference_description(reference.layout.clone());
                }
            }
        }
        Forward {
            source,
            buffer: settings.read_buffers.take(READ_BUFFER_BYTES),
            decoder,
            out: WriteQueue::new(
                destination,
                state.to_destination(),
                settings.write_stall_timeout,
            ),
            rewrite,
            state,
            description_timeout: settings.description_timeout,
            unrecoverable_postcopy: settings.unrecoverable_postcopy,
            limits: settings.limits.clone(),
            description_deadline: None,
            flagged_no_return_path: false,
            read_buffers: settings.read_buffers.clone(),
        }
    }

    async fn run(mut self) -> Result<(), ProxyError> {
        loop {
            while let Some(frame) = self.decoder.decode(&mut self.buffer)? {
                match frame {
                    // Page records (runs of them, or a payload still arriving) are most frames,
                    // and nothing is noted or rewritten for them: queued here, without building
                    // the `forward` future for each.
                    Frame::Payload { bytes, .. }
                    | Frame::Verbatim {
                        kind: RecordKind::RamRecord { .. } | RecordKind::RamRecords { .. },
                        bytes,
                        ..
                    } => {
                        self.out.push(bytes);
                        if self.out.queued() >= FLUSH_BYTES {
                            self.out.flush().await?;
                        }
                    }
                    frame => {
                        // Before the frame's bytes can reach the destination: a destination that
                        // closes after reading the last of them must find the stream complete.
                        self.state.note_stream_complete(self.decoder.is_done());
                        self.forward(frame).await?
                    }
                }
            }
            match self.read().await? {
                Read::Bytes => {}
                Read::Eof => {
                    while let Some(frame) = self.decoder.decode_eof(&mut self.buffer)? {
                        self.forward(frame).await?;
                    }
                    break;
                }
                Read::ClosedAfterEnd => break,
            }
        }
        self.out.flush().await?;
        // Before the half-close: from here on, a main channel from the same source is its next
        // migration, even while this one waits for the destination to close.
        self.state.note_stream_forwarded();
        // Half-close: the destination sees EOF; its SHUT still comes back on the return path.
        self.out.shutdown().await;
        tracing::debug!(
            bytes = self.decoder.offset(),
            "main channel: source finished"
        );
        // Every frame has been written: the buffer's memory serves the listener's next
        // migration (the decoder goes first, it may still refer to the held device phase).
        let Forward {
            buffer,
            decoder,
            read_buffers,
            ..
        } = self;
        drop(decoder);
        read_buffers.give_back(buffer, READ_BUFFER_BYTES);
        Ok(())
    }

    /// Write what is queued, then wait for the source's next bytes (with the description deadline
    /// while the device phase is held).
    async fn read(&mut self) -> Result<Read, ProxyError> {
        self.out.flush().await?;
        make_room(&mut self.buffer);
        let read = self.source.read_buf(&mut self.buffer);
        let result = if self.decoder.awaiting_description() {
            // The clock starts with the phase and is never reset: a source (or a guest steering
            // what it sends) that trickles bytes cannot hold both QEMUs stopped for longer.
            let deadline = *self
                .description_deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + self.description_timeout);
            match tokio::time::timeout_at(deadline, read).await {
                Ok(result) => result,
                Err(_) => {
                    return Err(ProxyError::Refused(Refusal::NoDescription {
                        offset: self.decoder.offset(),
                        waited: self.description_timeout,
                        last_candidate: self.decoder.description_error().map(|e| e.to_string()),
                    }))
                }
            }
        } else {
            read.await
        };
        match result {
            Ok(0) => Ok(Read::Eof),
            Ok(_) => Ok(Read::Bytes),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) && self.decoder.is_done() =>
            {
                Ok(Read::ClosedAfterEnd)
            }
            Err(err) => Err(ProxyError::io("main channel: read from source", err)),
        }
    }

    /// Queue one decoded frame for the destination (rewritten, if it is the device state).
    async fn forward(&mut self, frame: Frame) -> Result<(), ProxyError> {
        match frame {
            Frame::Verbatim { kind, bytes, .. } => {
                self.note(&kind)?;
                match (&kind, self.rewrite) {
                    (RecordKind::Command(MigCommand::Packaged { .. }), Some(setup)) => {
                        self.forward_package(&bytes, setup).await?;
                    }
                    (RecordKind::Command(MigCommand::Packaged { .. }), None) => {
                        // A checking relay forwards the package opaque; the log still says
                        // the switch went through and how the source ended the package.
                        let (len, ending) = (bytes.len(), package_ending_word(&bytes));
                        self.out.push(bytes);
                        self.out.flush().await?;
                        tracing::info!(bytes = len, ending, "postcopy package relayed as received");
                    }
                    _ => self.out.push(bytes),
                }
            }
            Frame::Payload { bytes, .. } => self.out.push(bytes),
            Frame::DeviceState(mut device) => {
                let (rewritten, removed) = match self.rewrite {
                    Some(setup) => (
                        rewrite_cpus(&mut device, setup)?,
                        fix_subsections(&mut device, setup)?,
                    ),
                    None => (Rewritten::default(), Vec::new()),
                };
                self.out.push(device.to_bytes());
                // Both QEMUs are stopped until the destination has the device state: release
                // it before anything else (logging, metrics) runs.
                self.out.flush().await?;
                // Whether the listener's cached description was reused (the same text as the
                // last accepted one, or the source reference's): see `description_cache.rs`.
                let description = if device.description_reused() {
                    "reused"
                } else {
                    "parsed"
                };
                tracing::info!(
                    bytes = device.wire_len(),
                    description,
                    ending = if device.is_confirmed() {
                        "exact: the source reference's layout"
                    } else if self.rewrite.is_none() {
                        "candidate: checking relay, more bytes would continue the phase"
                    } else {
                        "candidate: no source reference (--unreferenced-device-phase allow)"
                    },
                    "device state forwarded"
                );
                report_rewrites(&rewritten, self.state);
                report_removed_subsections(&removed, self.state);
                // Nobody waits on us now: ready the walk plan for the listener's next migration.
                self.decoder.prepare_description_cache();
            }
        }
        if self.out.queued() >= FLUSH_BYTES {
            self.out.flush().await?;
        }
        Ok(())
    }

    /// What a record announces about the migration.
    fn note(&mut self, kind: &RecordKind) -> Result<(), ProxyError> {
        match kind {
            RecordKind::Command(MigCommand::OpenReturnPath) => self.state.note_return_path(),
            RecordKind::Command(MigCommand::PostcopyAdvise { .. }) => self.postcopy_advised()?,
            RecordKind::SectionStart { .. } if !self.flagged_no_return_path => {
                self.flagged_no_return_path = true;
                if !self.state.has_return_path() {
                    tracing::warn!(
                        "migration without a return path: if it is refused later, the source leaves the guest paused instead of resuming it (enable the return-path capability)"
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl<R, W> Forward<'_, R, W> {
    /// `POSTCOPY_ADVISE`: decide now, while the source still owns the guest, whether a refusal
    /// after a switch could be undone (DESIGN.md, "Postcopy"). A checking relay forwards the
    /// package as it is, so only a rewriting proxy has anything to decide.
    fn postcopy_advised(&mut self) -> Result<(), ProxyError> {
        self.state.note_postcopy_advised();
        let Some(setup) = self.rewrite else {
            self.state.note_postcopy_outlook("relayed");
            return Ok(());
        };
        let outlook =
            SwitchRecovery::at_advise(setup.source.as_deref(), self.state.has_return_path());
        self.state.note_postcopy_outlook(outlook.summary_word());
        match (&outlook, self.unrecoverable_postcopy) {
            (SwitchRecovery::SourceResumes, _) => {
                tracing::info!(%outlook, "postcopy advised");
                Ok(())
            }
            (SwitchRecovery::GuestLost(_), UnrecoverablePostcopy::Allow) => {
                if setup.source_reference.is_none() {
                    tracing::warn!(
                        %outlook,
                        "postcopy advised and allowed (--unrecoverable-postcopy allow): the migration is rewritten if it finishes in precopy; without --source-reference a switch to postcopy will be refused and loses the guest"
                    );
                    return Ok(());
                }
                // The package will be rewritten: what the profiles alone refuse is refused now.
                if let Some(refusal) = postcopy::profile_refusal(setup) {
                    return Err(ProxyError::Refused(Refusal::PostcopyUnrecoverable {
                        offset: self.decoder.offset(),
                        outlook: format!("{outlook}, and the profiles refuse: {refusal}"),
                    }));
                }
                tracing::warn!(
                    %outlook,
                    "postcopy advised and allowed (--unrecoverable-postcopy allow): a switch rewrites the package; the profiles refuse nothing, but a refusal that depends on guest values after the switch could no longer be undone"
                );
                Ok(())
            }
            (SwitchRecovery::GuestLost(_), UnrecoverablePostcopy::Refuse) => {
                Err(ProxyError::Refused(Refusal::PostcopyUnrecoverable {
                    offset: self.decoder.offset(),
                    outlook: outlook.to_string(),
                }))
            }
        }
    }

    /// A refusal of the package `record`: `why`, and what the source does now. Closing at once
    /// is what lets a source that waits for the destination's confirmation resume its guest;
    /// keeping the connections open would keep the guest stopped.
    fn package_refused(&self, record: &[u8], why: String) -> ProxyError {
        let outcome = if self.state.postcopy_outlook() == "recoverable"
            && postcopy::package_waits_for_destination(record)
        {
            "the source waits for the destination's confirmation (PING 0x42) and resumes its guest"
        } else {
            "the source cannot take its guest back after this switch (decided and logged at ADVISE)"
        };
        ProxyError::Refused(Refusal::PostcopyPackage {
            offset: self.record_offset(record),
            why,
            outcome: outcome.to_owned(),
        })
    }

    /// Where `record`, just decoded, started in the stream.
    fn record_offset(&self, record: &[u8]) -> u64 {
        self.decoder
            .offset()
            .saturating_sub(u64::try_from(record.len()).unwrap_or(u64::MAX))
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Forward<'_, R, W> {
    /// The source switched to postcopy through a rewriting proxy: rewrite the package's `cpu`
    /// sections, walked with the source's reference description, and release it at once (both
    /// QEMUs wait for it); anything that does not verify refuses it.
    async fn forward_package(
        &mut self,
        record: &Bytes,
        setup: &RewriteSetup,
    ) -> Result<(), ProxyError> {
        let Some(reference) = setup
            .source_reference
            .as_deref()
            .map(|r| &r.description[..])
        else {
            return Err(self.package_refused(
                record,
                "its device state has no description and no --source-reference gives its layout"
                    .into(),
            ));
        };
        let offset = self.record_offset(record);
        let mut package = PackageDeviceState::walk(record, offset, reference, &self.limits)
            .map_err(|err| {
                self.package_refused(
                    record,
                    format!("it does not walk with the source reference description: {err}"),
                )
            })?;
        let rewritten = rewrite_cpus(package.device_state(), setup)
            .and_then(|rewritten| {
                fix_subsections(package.device_state(), setup).map(|removed| (rewritten, removed))
            })
            .and_then(|done| {
                package
                    .to_record()
                    .map(|bytes| (done, bytes))
                    .map_err(ProxyError::Decode)
            });
        let ((rewritten, removed), bytes) = match rewritten {
            Ok(done) => done,
            Err(err) => return Err(self.package_refused(record, err.to_string())),
        };
        self.out.push(bytes);
        self.out.flush().await?;
        tracing::info!(
            bytes = record.len(),
            ending = %package.ending(),
            "postcopy package rewritten with the source reference description"
        );
        report_rewrites(&rewritten, self.state);
        report_removed_subsections(&removed, self.state);
        Ok(())
    }
}

/// How a PACKAGED `record` ends (`PING 3, RUN`, `RUN`, ...), for the log.
fn package_ending_word(record: &[u8]) -> String {
    PackageEnding::of_record(record).map_or_else(
        || "not RUN (the destination decides)".to_owned(),
        |ending| ending.to_string(),
    )
}

/// Give the next read up to 1 MiB of room. Once page payloads have been cut from the buffer it
/// would regrow in small steps; after a flush no frame refers to it any more, so this reclaims
/// the same allocation instead of growing memory.
fn make_room(buffer: &mut BytesMut) {
    let spare = buffer.capacity().saturating_sub(buffer.len());
    if spare < READ_BUFFER_BYTES / 2 {
        let wanted = READ_BUFFER_BYTES
            .saturating_sub(buffer.len())
            .max(READ_BUFFER_BYTES / 2);
        buffer.reserve(wanted);
    }
}

/// The pump over in-memory pipes: no socket, no registry, no runtime beyond the test's.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use migproxy_codec::testing::{RamRecord, StreamBuilder};
    use migproxy_codec::wire::{MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_POSTCOPY_ADVISE};
    use migproxy_config::{Accel, Policy, Profile};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::Notify;

    use super::*;
    use crate::migration::metrics::Metrics;
    use crate::migration::source_reference::SourceReference;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const SCTLR_EL1: u64 = 0x6030_0000_0013_c080;
    const TTBR0_EL1: u64 = 0x6030_0000_0013_c100;
    const TCR_EL1: u64 = 0x6030_0000_0013_c102;
    const CONTEXTIDR_EL1: u64 = 0x6030_0000_0013_c681;
    /// Generous: the machine running the tests may be busy; no test measures time.
    const DEADLINE: Duration = Duration::from_secs(30);

    fn settings(description_timeout: Duration) -> ChannelSettings {
        ChannelSettings {
            limits: Limits::default(),
            description_timeout,
            unrecoverable_postcopy: UnrecoverablePostcopy::Refuse,
            write_stall_timeout: DEADLINE,
            dial_timeout: DEADLINE,
            unreferenced_device_phase: UnreferencedDevicePhase::Allow,
            description_cache: DescriptionCache::new(),
            read_buffers: ReadBuffers::default(),
        }
    }

    fn reference_of(description: Vec<u8>) -> Result<Arc<SourceReference>, ProxyError> {
        SourceReference::parse(Bytes::from(description), "test").map(Arc::new)
    }

    fn state() -> MigrationState {
        MigrationState::new(Arc::new(Metrics::default()), Arc::new(Notify::new()))
    }

    /// Header and RAM (pages a guest could fill with anything): what precedes the device phase.
    fn before_devices() -> StreamBuilder {
        let mut builder = StreamBuilder::new("virt-7.2");
        builder.ram_start(1 << 20);
        builder.ram_section(
            false,
            &[RamRecord::Page(b"QEVM\x07cpu".to_vec()), RamRecord::Zero],
        );
        builder.ram_section(true, &[RamRecord::Page(vec![0x5a; 4096])]);
        builder
    }

    /// Where the device phase starts in every stream these tests build.
    fn device_phase_start() -> usize {
        before_devices().into_bytes().len()
    }

    /// The stream with one vCPU holding these registers.
    fn stream(registers: &[(u64, u64)]) -> StreamBuilder {
        let mut builder = before_devices();
        builder.cpu(0, registers, 0x11);
        builder
    }

    fn profile(registers: &[(u64, u64)]) -> Result<Profile, Box<dyn std::error::Error>> {
        Ok(Profile::from_vcpus(Accel::Tcg, &[(0, registers.to_vec())])?)
    }

    struct Ends {
        /// The source QEMU's socket.
        source: DuplexStream,
        /// The destination QEMU's socket.
        destination: DuplexStream,
        pump: tokio::task::JoinHandle<(Result<(), ProxyError>, MigrationState)>,
    }

    /// Start a pump between two pipes of `capacity` bytes each.
    fn start(capacity: usize, rewrite: Option<RewriteSetup>, settings: ChannelSettings) -> Ends {
        let (source, source_side) = tokio::io::duplex(capacity);
        let (destination, destination_side) = tokio::io::duplex(capacity);
        let pump = tokio::spawn(async move {
            let state = state();
            let result = run(
                tokio::io::split(source_side),
                tokio::io::split(destination_side),
                rewrite.as_ref(),
                &state,
                &settings,
            )
            .await;
            (result, state)
        });
        Ends {
            source,
            destination,
            pump,
        }
    }

    async fn finish(
        pump: tokio::task::JoinHandle<(Result<(), ProxyError>, MigrationState)>,
    ) -> Result<(Result<(), ProxyError>, MigrationState), Box<dyn std::error::Error>> {
        Ok(tokio::time::timeout(DEADLINE, pump).await??)
    }

    /// The return path's `SHUT 0`: what a destination QEMU says after a load that worked.
    const SHUT_0: [u8; 8] = [0, 1, 0, 4, 0, 0, 0, 0];

    /// Everything the destination receives until the pump closes its side; then it says `SHUT 0`
    /// and closes, as a destination QEMU does.
    fn receive_all(
        mut destination: DuplexStream,
        chunk: usize,
    ) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; chunk];
            while let Ok(n) = destination.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(buf.get(..n).unwrap_or_default());
                tokio::task::yield_now().await;
            }
            let _ = destination.write_all(&SHUT_0).await;
            got
        })
    }

    #[tokio::test]
    async fn forwards_a_stream_split_at_odd_offsets_byte_for_byte() -> TestResult {
        let bytes = stream(&[(SCTLR_EL1, 0x30d0_0980), (TTBR0_EL1, 0x4000_0000)]).finish();
        let Ends {
            mut source,
            mut destination,
            pump,
        } = start(1 << 16, None, settings(DEADLINE));
        // The return path: the destination answers, the source hears it while still sending.
        destination.write_all(&SHUT_0).await?;
        destination.shutdown().await?;
        let received = receive_all(destination, 1 << 16);
        for piece in bytes.chunks(7) {
            source.write_all(piece).await?;
            tokio::task::yield_now().await;
        }
        source.shutdown().await?;
        let mut back = Vec::new();
        source.read_to_end(&mut back).await?;
        assert_eq!(back, SHUT_0);
        let (result, state) = finish(pump).await?;
        result?;
        assert_eq!(received.await?, bytes);
        assert_eq!(state.bytes_to_destination(), u64::try_from(bytes.len())?);
        assert_eq!(state.bytes_to_source(), 8);
        assert_eq!(state.rewrite_summary().cpus_rewritten, 0);
        Ok(())
    }

    #[tokio::test]
    async fn a_slow_destination_gets_every_byte_and_the_rewritten_registers() -> TestResult {
        let source_registers = [
            (SCTLR_EL1, 0x30d0_0980),
            (TTBR0_EL1, 0x4000_0000),
            (CONTEXTIDR_EL1, 0),
        ];
        let dest_registers = [(SCTLR_EL1, 0x30d0_0980), (TTBR0_EL1, 0), (TCR_EL1, 0)];
        let original = stream(&source_registers).finish();
        // What the destination must receive: the same stream with its register list.
        let expected_cpu = [
            (SCTLR_EL1, 0x30d0_0980),
            (TTBR0_EL1, 0x4000_0000),
            (TCR_EL1, 0),
        ];
        let expected = stream(&expected_cpu).finish();
        let setup = dest_only_setup(&dest_registers)?;
        // A 64-byte pipe read 16 bytes at a time: every write the pump makes is partial.
        let Ends {
            mut source,
            destination,
            pump,
        } = start(64, Some(setup), settings(DEADLINE));
        let received = receive_all(destination, 16);
        let sending = tokio::spawn(async move {
            source.write_all(&original).await?;
            source.shutdown().await?;
            // Keep the source's end open until the pump has finished reading.
            let mut back = Vec::new();
            source.read_to_end(&mut back).await.map(|_| back)
        });
        let (result, state) = finish(pump).await?;
        result?;
        assert_eq!(received.await?, expected);
        // The destination's SHUT, relayed.
        assert_eq!(sending.await??, SHUT_0);
        let summary = state.rewrite_summary();
        assert_eq!(summary.cpus_rewritten, 1);
        assert_eq!(summary.dropped.names(), ["CONTEXTIDR_EL1"]);
        assert_eq!(summary.filled.names(), ["TCR_EL1"]);
        Ok(())
    }

    #[tokio::test]
    async fn a_refusal_names_the_register_and_holds_back_the_device_state() -> TestResult {
        let bytes = stream(&[(SCTLR_EL1, 0x30d0_0980), (CONTEXTIDR_EL1, 0x42)]).finish();
        let setup = dest_only_setup(&[(SCTLR_EL1, 0x30d0_0980)])?;
        let Ends {
            mut source,
            destination,
            pump,
        } = start(1 << 16, Some(setup), settings(DEADLINE));
        let received = receive_all(destination, 1 << 16);
        source.write_all(&bytes).await?;
        let (result, _) = finish(pump).await?;
        match result {
            Err(ProxyError::Refused(Refusal::Registers(summaries))) => {
                assert_eq!(summaries.len(), 1);
                assert!(summaries[0].contains("CONTEXTIDR_EL1"), "{summaries:?}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // At most what precedes the device phase went through (what was still queued when the
        // refusal came is dropped with the connection); nothing of the device phase did.
        let received = received.await?;
        assert!(received.len() <= device_phase_start(), "{}", received.len());
        assert_eq!(received, bytes[..received.len()]);
        Ok(())
    }

    #[tokio::test]
    async fn a_missing_description_refuses_once_the_source_goes_silent() -> TestResult {
        let bytes = stream(&[(SCTLR_EL1, 0x30d0_0980)]).finish_without_description();
        let Ends {
            mut source,
            destination,
            pump,
        } = start(1 << 16, None, settings(Duration::from_millis(50)));
        let received = receive_all(destination, 1 << 16);
        // suppress-vmdesc with a return path: the source sends EOF, then waits, socket open.
        source.write_all(&bytes).await?;
        let (result, _) = finish(pump).await?;
        match result {
            Err(ProxyError::Refused(Refusal::NoDescription { offset, .. })) => {
                assert_eq!(offset, u64::try_from(device_phase_start())?)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let received = received.await?;
        assert_eq!(received, bytes[..device_phase_start()]);
        drop(source);
        Ok(())
    }

    /// A source reference of another configuration (two vCPUs, the stream has one): the real
    /// ending does not have its layout, so nothing ends the phase; the source (with a return
    /// path it waits after EOF) is refused at the deadline with the mismatch named, and nothing
    /// of the device phase reached the destination.
    #[tokio::test]
    async fn a_reference_of_another_configuration_refuses_naming_the_mismatch() -> TestResult {
        let bytes = stream(&[(SCTLR_EL1, 0x30d0_0980)]).finish();
        let mut two = StreamBuilder::new("virt-7.2");
        two.cpu(0, &[(SCTLR_EL1, 0x30d0_0980)], 1);
        two.cpu(1, &[(SCTLR_EL1, 0x30d0_0980)], 1);
        let mut setup = RewriteSetup {
            dest: Arc::new(Profile::from_vcpus(
                Accel::Tcg,
                &[(0, vec![(SCTLR_EL1, 0)])],
            )?),
            source: None,
            source_reference: None,
            policy: Policy::default(),
        };
        setup.source_reference = Some(reference_of(two.description().into_bytes())?);
        let Ends {
            mut source,
            destination,
            pump,
        } = start(1 << 16, Some(setup), settings(Duration::from_millis(300)));
        let received = receive_all(destination, 1 << 16);
        source.write_all(&bytes).await?;
        let (result, _) = finish(pump).await?;
        match result {
            Err(ProxyError::Refused(refusal @ Refusal::NoDescription { .. })) => {
                let text = refusal.to_string();
                assert!(
                    text.contains("layout of the reference description"),
                    "{text}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(received.await?, bytes[..device_phase_start()]);
        drop(source);
        Ok(())
    }

    /// Finding: the description wait used to be reset by any byte, so a source trickling its
    /// device phase kept both QEMUs stopped for as long as it liked. The deadline counts from
    /// the phase's first read.
    #[tokio::test]
    async fn a_device_phase_trickled_byte_by_byte_is_refused_at_its_deadline() -> TestResult {
        let bytes = stream(&[(SCTLR_EL1, 0x30d0_0980), (TTBR0_EL1, 0x4000_0000)]).finish();
        let phase = device_phase_start();
        let Ends {
            mut source,
            destination,
            pump,
        } = start(1 << 16, None, settings(Duration::from_millis(300)));
        let received = receive_all(destination, 1 << 16);
        source.write_all(&bytes[..phase]).await?;
        // One byte every 100 ms: never silent for the 300 ms deadline, and the whole phase
        // would take far longer than the test's own deadline.
        let tail = bytes[phase..].to_vec();
        let trickle = tokio::spawn(async move {
            for byte in tail {
                if source.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            source
        });
        let (result, _) = finish(pump).await?;
        match result {
            Err(ProxyError::Refused(Refusal::NoDescription { offset, waited, .. })) => {
                assert_eq!(offset, u64::try_from(phase)?);
                assert_eq!(waited, Duration::from_millis(300));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(received.await?, bytes[..phase]);
        trickle.abort();
        Ok(())
    }

    /// `POSTCOPY_ADVISE` as QEMU sends it: the page-size summary, then the target page size.
    fn advise_payload() -> Vec<u8> {
        let mut payload = 4096u64.to_be_bytes().to_vec();
        payload.extend_from_slice(&4096u64.to_be_bytes());
        payload
    }

    /// A postcopy-capable stream (return path, ADVISE) that finishes in precopy with one vCPU.
    fn postcopy_capable_stream(registers: &[(u64, u64)]) -> StreamBuilder {
        let mut builder = StreamBuilder::new("virt-7.2");
        builder.command(MIG_CMD_OPEN_RETURN_PATH, &[]);
        builder.command(MIG_CMD_POSTCOPY_ADVISE, &advise_payload());
        builder.ram_start(1 << 20);
        builder.ram_section(true, &[RamRecord::Page(vec![0x5a; 4096])]);
        builder.cpu(0, registers, 0x11);
        builder
    }

    /// The source's registers and the destination's: CONTEXTIDR_EL1 (0) is dropped.
    const SOURCE_REGISTERS: [(u64, u64); 2] = [(SCTLR_EL1, 0x30d0_0980), (CONTEXTIDR_EL1, 0)];
    const DEST_REGISTERS: [(u64, u64); 1] = [(SCTLR_EL1, 0x30d0_0980)];

    /// Rewriting towards `dest` alone: no source profile, no reference, the default policy.
    fn dest_only_setup(dest: &[(u64, u64)]) -> Result<RewriteSetup, Box<dyn std::error::Error>> {
        Ok(RewriteSetup {
            dest: Arc::new(profile(dest)?),
            source: None,
            source_reference: None,
            policy: Policy::default(),
        })
    }

    fn setup_with_source_version(
        version: &str,
    ) -> Result<RewriteSetup, Box<dyn std::error::Error>> {
        let mut source = profile(&SOURCE_REGISTERS)?;
        source.qemu_version = Some(version.to_owned());
        Ok(RewriteSetup {
            dest: Arc::new(profile(&DEST_REGISTERS)?),
            source: Some(Arc::new(source)),
            source_reference: None,
            policy: Policy::default(),
        })
    }

    /// Feed `bytes`, keep the source open, and return the pump's result and what arrived.
    async fn pump_stream(
        bytes: Vec<u8>,
        setup: RewriteSetup,
        settings: ChannelSettings,
    ) -> Result<(Result<(), ProxyError>, MigrationState, Vec<u8>), Box<dyn std::error::Error>> {
        let Ends {
            mut source,
            destination,
            pump,
        } = start(1 << 16, Some(setup), settings);
        let received = receive_all(destination, 1 << 16);
        let sending = tokio::spawn(async move {
            source.write_all(&bytes).await?;
            source.shutdown().await?;
            let mut back = Vec::new();
            source.read_to_end(&mut back).await.map(|_| back)
        });
        let (result, state) = finish(pump).await?;
        let received = received.await?;
        // The source's side sees its connection end either way.
        let _ = tokio::time::timeout(DEADLINE, sending).await?;
        Ok((result, state, received))
    }

    #[tokio::test]
    async fn a_postcopy_capable_migration_finishing_in_precopy_goes_through() -> TestResult {
        let bytes = postcopy_capable_stream(&SOURCE_REGISTERS).finish();
        let expected = postcopy_capable_stream(&DEST_REGISTERS).finish();
        let setup = setup_with_source_version("11.1.0")?;
        let (result, state, received) = pump_stream(bytes, setup, settings(DEADLINE)).await?;
        result?;
        assert_eq!(received, expected);
        assert_eq!(state.rewrite_summary().dropped.names(), ["CONTEXTIDR_EL1"]);
        assert!(state.postcopy_advised());
        assert_eq!(state.postcopy_outlook(), "recoverable");
        assert_eq!(state.rewrite_summary().cpus_rewritten, 1);
        Ok(())
    }

    #[tokio::test]
    async fn an_older_source_is_refused_at_advise_unless_allowed() -> TestResult {
        let bytes = postcopy_capable_stream(&SOURCE_REGISTERS).finish();
        let expected = postcopy_capable_stream(&DEST_REGISTERS).finish();
        let setup = setup_with_source_version("10.0.7")?;
        let (result, state, received) =
            pump_stream(bytes.clone(), setup.clone(), settings(DEADLINE)).await?;
        match result {
            Err(ProxyError::Refused(Refusal::PostcopyUnrecoverable { offset, outlook })) => {
                assert!(outlook.contains("10.0.7"), "{outlook}");
                // Refused at the ADVISE record: no RAM went through.
                assert!(
                    received.len() <= usize::try_from(offset)?,
                    "{}",
                    received.len()
                );
            }
            other => panic!("expected a refusal at ADVISE, got {other:?}"),
        }
        assert_eq!(state.postcopy_outlook(), "unrecoverable");

        let mut allowing = settings(DEADLINE);
        allowing.unrecoverable_postcopy = UnrecoverablePostcopy::Allow;
        let (result, state, received) = pump_stream(bytes, setup, allowing).await?;
        result?;
        assert_eq!(received, expected);
        assert_eq!(state.postcopy_outlook(), "unrecoverable");
        assert_eq!(state.rewrite_summary().cpus_rewritten, 1);
        Ok(())
    }

    /// A switched stream: return path, ADVISE, some RAM, then the package of one vCPU with
    /// `registers` (LISTEN, sections, PING 3, PING 0x42, RUN), PING 4 and EOF. Also the reference description a
    /// fresh VM of that configuration sends, and where the package starts.
    fn switched_stream(registers: &[(u64, u64)]) -> (Vec<u8>, Vec<u8>, usize) {
        let mut builder = StreamBuilder::new("virt-7.2");
        builder.command(MIG_CMD_OPEN_RETURN_PATH, &[]);
        builder.command(MIG_CMD_POSTCOPY_ADVISE, &advise_payload());
        builder.ram_start(1 << 20);
        builder.ram_section(false, &[RamRecord::Page(vec![0x5a; 4096])]);
        let mut bytes = builder.into_bytes();
        let package_start = bytes.len();
        let header_len = StreamBuilder::new("virt-7.2").into_bytes().len();
        let mut devices = StreamBuilder::new("virt-7.2");
        devices.cpu(0, registers, 0x11);
        let reference = devices.description().into_bytes();
        let sections = devices.into_bytes().split_off(header_len);
        let blob: Vec<u8> = [
            &[0x08, 0x00, 0x04, 0x00, 0x00][..],
            &sections,
            &[0x08, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x03],
            &[0x08, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x42],
            &[0x08, 0x00, 0x05, 0x00, 0x00],
        ]
        .concat();
        bytes.extend_from_slice(&[0x08, 0x00, 0x07, 0x00, 0x04]);
        bytes.extend_from_slice(&u32::try_from(blob.len()).unwrap_or(u32::MAX).to_be_bytes());
        bytes.extend_from_slice(&blob);
        // PING 4, then (after the postcopy RAM) EOF without a description.
        bytes.extend_from_slice(&[0x08, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x04, 0x00]);
        (bytes, reference, package_start)
    }

    #[tokio::test]
    async fn a_package_is_rewritten_with_the_source_reference() -> TestResult {
        let (bytes, reference, _) = switched_stream(&SOURCE_REGISTERS);
        let (expected, _, _) = switched_stream(&DEST_REGISTERS);
        let mut setup = setup_with_source_version("10.0.7")?;
        setup.source_reference = Some(reference_of(reference)?);
        let mut allowing = settings(DEADLINE);
        allowing.unrecoverable_postcopy = UnrecoverablePostcopy::Allow;
        let (result, state, received) = pump_stream(bytes, setup, allowing).await?;
        result?;
        assert_eq!(received, expected);
        assert_eq!(state.postcopy_outlook(), "unrecoverable");
        assert_eq!(state.rewrite_summary().dropped.names(), ["CONTEXTIDR_EL1"]);
        Ok(())
    }

    #[tokio::test]
    async fn a_package_of_another_layout_is_refused() -> TestResult {
        let (bytes, _, package_start) = switched_stream(&SOURCE_REGISTERS);
        // The reference of a two-vCPU configuration: the walk cannot end at the PING/RUN.
        let mut two = StreamBuilder::new("virt-7.2");
        two.cpu(0, &SOURCE_REGISTERS, 0x11);
        two.cpu(1, &SOURCE_REGISTERS, 0x11);
        let mut setup = setup_with_source_version("11.1.0")?;
        setup.source_reference = Some(reference_of(two.description().into_bytes())?);
        let (result, _, received) = pump_stream(bytes.clone(), setup, settings(DEADLINE)).await?;
        match result {
            Err(ProxyError::Refused(Refusal::PostcopyPackage {
                offset,
                why,
                outcome,
            })) => {
                assert_eq!(offset, u64::try_from(package_start)?);
                assert!(why.contains("reference description"), "{why}");
                assert!(outcome.contains("resumes its guest"), "{outcome}");
            }
            other => panic!("expected the package refused, got {other:?}"),
        }
        assert!(received.len() <= package_start, "{}", received.len());
        Ok(())
    }

    #[tokio::test]
    async fn what_the_profiles_refuse_is_refused_at_advise_when_packages_are_rewritten(
    ) -> TestResult {
        let (bytes, reference, _) = switched_stream(&SOURCE_REGISTERS);
        let mut setup = setup_with_source_version("10.0.7")?;
        setup.source_reference = Some(reference_of(reference)?);
        setup.policy.on_extra = migproxy_config::OnExtra::Refuse;
        let mut allowing = settings(DEADLINE);
        allowing.unrecoverable_postcopy = UnrecoverablePostcopy::Allow;
        let (result, _, received) = pump_stream(bytes, setup, allowing).await?;
        match result {
            Err(ProxyError::Refused(Refusal::PostcopyUnrecoverable { offset, outlook })) => {
                assert!(outlook.contains("CONTEXTIDR_EL1"), "{outlook}");
                assert!(received.len() <= usize::try_from(offset)?);
            }
            other => panic!("expected a refusal at ADVISE, got {other:?}"),
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_switch_through_a_rewriting_proxy_is_refused_at_the_package() -> TestResult {
        let mut builder = StreamBuilder::new("virt-7.2");
        builder.command(MIG_CMD_OPEN_RETURN_PATH, &[]);
        builder.command(MIG_CMD_POSTCOPY_ADVISE, &advise_payload());
        builder.ram_start(1 << 20);
        builder.ram_section(false, &[RamRecord::Page(vec![0x5a; 4096])]);
        let before_package = builder.into_bytes();
        // LISTEN, (device sections), PING 3, PING 0x42, RUN: what an 11.1 source packages.
        let blob: Vec<u8> = [
            &[0x08, 0x00, 0x04, 0x00, 0x00][..],
            &[0x08, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x03],
            &[0x08, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x42],
            &[0x08, 0x00, 0x05, 0x00, 0x00],
        ]
        .concat();
        let mut bytes = before_package.clone();
        bytes.extend_from_slice(&[0x08, 0x00, 0x07, 0x00, 0x04]);
        bytes.extend_from_slice(&u32::try_from(blob.len())?.to_be_bytes());
        bytes.extend_from_slice(&blob);
        let setup = setup_with_source_version("11.1.0")?;
        let (result, _, received) = pump_stream(bytes, setup, settings(DEADLINE)).await?;
        match result {
            Err(ProxyError::Refused(Refusal::PostcopyPackage {
                offset, outcome, ..
            })) => {
                assert_eq!(offset, u64::try_from(before_package.len())?);
                assert!(outcome.contains("resumes its guest"), "{outcome}");
            }
            other => panic!("expected the package refused, got {other:?}"),
        }
        // Nothing of the package reached the destination.
        assert!(received.len() <= before_package.len(), "{}", received.len());
        assert_eq!(received, before_package[..received.len()]);
        Ok(())
    }

    /// A stream at the codec's vCPU budget, each vCPU with `per_vcpu` registers the destination
    /// lacks, all holding `value`.
    fn many_vcpus(per_vcpu: u64, value: u64) -> Vec<u8> {
        let mut builder = before_devices();
        let registers: Vec<(u64, u64)> = (0..per_vcpu)
            .map(|n| (0x6030_0000_0013_0000 | n, value))
            .collect();
        for vcpu in 0..512 {
            builder.cpu(vcpu, &registers, 0x11);
        }
        builder.finish()
    }

    async fn pump_many_vcpus(
        bytes: Vec<u8>,
    ) -> Result<(Result<(), ProxyError>, MigrationState), Box<dyn std::error::Error>> {
        let setup = dest_only_setup(&[(SCTLR_EL1, 0x30d0_0980)])?;
        let Ends {
            mut source,
            destination,
            pump,
        } = start(1 << 16, Some(setup), settings(DEADLINE));
        let received = receive_all(destination, 1 << 16);
        let sending = tokio::spawn(async move {
            source.write_all(&bytes).await?;
            source.shutdown().await?;
            let mut back = Vec::new();
            source.read_to_end(&mut back).await.map(|_| back)
        });
        let finished = finish(pump).await?;
        received.await?;
        // The source's end may see the pump close it early (refused): either is fine here.
        let _ = sending.await?;
        Ok(finished)
    }

    #[tokio::test]
    async fn refusing_512_vcpus_names_them_in_one_bounded_line() -> TestResult {
        let (result, _) = pump_many_vcpus(many_vcpus(64, 0x42)).await?;
        match result {
            Err(ProxyError::Refused(Refusal::Registers(summaries))) => {
                assert_eq!(summaries.len(), 1, "{summaries:?}");
                assert!(
                    summaries[0].starts_with("vcpu 0-511 (512 vcpus): "),
                    "{}",
                    summaries[0]
                );
                assert!(
                    summaries[0].ends_with("and 56 more refused registers"),
                    "{}",
                    summaries[0]
                );
                assert!(summaries[0].len() < 2048, "{}", summaries[0].len());
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        Ok(())
    }

    #[tokio::test]
    async fn rewriting_512_vcpus_keeps_a_bounded_summary() -> TestResult {
        // Zero: unused since reset, dropped on every vCPU.
        let (result, state) = pump_many_vcpus(many_vcpus(100, 0)).await?;
        result?;
        let summary = state.rewrite_summary();
        assert_eq!(summary.cpus_rewritten, 512);
        assert_eq!(summary.dropped.count(), 100);
        assert_eq!(summary.dropped.names().len(), 64);
        assert!(
            summary.dropped.to_string().ends_with(" and 36 more"),
            "{}",
            summary.dropped
        );
        Ok(())
    }

    /// A connected pair of real TCP sockets on loopback.
    async fn tcp_pair() -> Result<(tokio::net::TcpStream, tokio::net::TcpStream), std::io::Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (connected, accepted) = tokio::join!(
            tokio::net::TcpStream::connect(listener.local_addr()?),
            listener.accept()
        );
        Ok((connected?, accepted?.0))
    }

    /// The race a failed load ends with: the destination sends `SHUT 1` and exits, and the pump,
    /// with stream bytes to write, meets its reset on a write before the return-path relay has
    /// read the `SHUT`. Real sockets, set up so that the pump's first poll finds both already
    /// there (which direction it polls first is its own choice): the verdict is the
    /// destination's failed load, with the write's error as context when the write came first,
    /// and the source hears the `SHUT`. (Before the write's failure waited for the return path,
    /// this ended with the write's error alone, and the source heard nothing.)
    #[tokio::test]
    async fn a_failed_load_is_the_verdict_when_a_write_meets_the_destinations_reset_first(
    ) -> TestResult {
        const SHUT_1: [u8; 8] = [0, 1, 0, 4, 0, 0, 0, 1];
        let (mut source, proxy_source) = tcp_pair().await?;
        let (proxy_destination, mut destination) = tcp_pair().await?;
        source.write_all(&before_devices().into_bytes()).await?;
        destination.write_all(&SHUT_1).await?;
        // The SHUT is in migproxy's socket before the reset, as TCP delivers them.
        let mut peeked = [0u8; 8];
        tokio::time::timeout(DEADLINE, async {
            while proxy_destination.peek(&mut peeked).await? < SHUT_1.len() {
                tokio::task::yield_now().await;
            }
            Ok::<(), std::io::Error>(())
        })
        .await??;
        // Closed with SO_LINGER 0: a reset, as from a QEMU that exits with the stream unread.
        socket2::SockRef::from(&destination).set_linger(Some(Duration::ZERO))?;
        drop(destination);
        // Loopback delivers the reset within the close; the wait only makes sure of it.
        tokio::time::sleep(Duration::from_millis(100)).await;

        let state = state();
        let settings = settings(DEADLINE);
        let ended = tokio::time::timeout(
            DEADLINE,
            run(
                proxy_source.into_split(),
                proxy_destination.into_split(),
                None,
                &state,
                &settings,
            ),
        )
        .await?;
        let reason = ended.err().map(|e| e.to_string()).unwrap_or_default();
        let verdict = "destination reported a failed load (return path SHUT 1)";
        assert!(
            reason == verdict
                || reason.starts_with(&format!(
                    "{verdict} (meanwhile main channel: write to destination: "
                )),
            "{reason}"
        );
        let mut heard = [0u8; 8];
        tokio::time::timeout(DEADLINE, source.read_exact(&mut heard)).await??;
        assert_eq!(
            heard, SHUT_1,
            "the source did not hear the destination's SHUT"
        );
        Ok(())
    }
}
