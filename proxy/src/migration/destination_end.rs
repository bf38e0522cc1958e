//! How the destination ended the main channel, and what that says about its load.
//!
//! The forward direction finishing is not the migration succeeding: the destination may still
//! refuse what it read (a device's post_load fails at the end of the device state) or die after
//! migproxy's last write went into the kernel's buffers. What the destination sends back decides
//! the `outcome` of the summary (DESIGN.md, "Failing closed"):
//!
//! - with a return path, QEMU ends every incoming migration it is still alive for with
//!   `MIG_RP_MSG_SHUT` (`be16 type 1, be16 len 4, be32 status`), status 0 after a load that
//!   worked, 1 after one that failed, and then closes: a `SHUT 0` is a clean end whatever follows
//!   (a TLS peer may reset while the session closes), a non-zero `SHUT` is a failed migration,
//!   and a close without any `SHUT` is a destination that ended without a verdict;
//! - without one, a destination that loaded the whole stream has read every byte (QEMU reads the
//!   trailing description too) and closes cleanly, while one that failed exits with the rest of
//!   the stream unread, which makes its kernel reset the connection: a reset is a failure, a clean
//!   close is not. A destination that read everything and then failed (or died) closes cleanly:
//!   the proxy cannot tell, and says `completed`;
//! - at any time, a destination that closes while the stream is not yet complete cannot have
//!   loaded it.
//!
//! A failed load races with migproxy's own writes: the destination sends its `SHUT 1` and exits,
//! and its reset may fail the next write of the stream before the return-path relay has read the
//! `SHUT` (both arrive at once when migproxy is busy writing). The `SHUT` came first on the wire,
//! so it is already in the socket: a write that fails gives the relay [`SHUT_GRACE`] to read it
//! (and pass it on to the source) before the channel ends, and the verdict names the failed load
//! with the write error as context.
//!
//! The return path is still relayed raw and at once (`net::relay::pump`); the watch only looks at
//! the bytes as they pass, with constant work per byte, and decides nothing until the destination
//! has ended its side. The bytes are the destination QEMU's own messages, not guest data; a
//! message type the watch does not frame (the recovery bitmap carries bytes outside its length)
//! stops the watch, and the verdict falls back to what the connection's end alone says.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{DestinationVerdict, ProxyError};

/// `MIG_RP_MSG_SHUT`.
const SHUT: u16 = 1;
/// `MIG_RP_MSG_RECV_BITMAP`: its bitmap follows outside the message length.
const RECV_BITMAP: u16 = 5;
/// The last message type QEMU defines (`MIG_RP_MSG_SWITCHOVER_ACK`).
const LAST_KNOWN: u16 = 7;

/// How long a write towards the destination that failed waits for the return-path relay before
/// the main channel ends with its error. A destination sends its `SHUT` before it closes, so the
/// `SHUT` is in the socket when the write meets the close: the relay only has to be polled (and
/// pass the message on to the source). The bound is for a relay still writing earlier messages
/// to a slow source; it delays only a channel that is failing anyway, and its source by as much.
pub const SHUT_GRACE: Duration = Duration::from_millis(200);

/// How the destination's side of the main channel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// EOF (for TLS also a close without close_notify).
    Eof,
    /// The connection was reset.
    Reset,
}

/// How far the forward direction got when the destination's side ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// The whole stream was carried: the source ended its side after a complete stream.
    pub forwarded: bool,
    /// The stream decoded so far may end where it is (the destination may have loaded it).
    pub stream_complete: bool,
    /// The destination leg is TLS.
    pub tls: bool,
}

/// What the destination has said so far: shared by the return-path relay (which feeds it) and the
/// pump (which asks for the verdict).
#[derive(Debug, Default)]
pub struct DestinationEnd {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    framing: Framing,
    /// The first `SHUT`'s status.
    shut: Option<u32>,
    closed: Option<Closed>,
    /// A write (or flush) towards the destination failed.
    write_failed: bool,
}

/// Where the watch is in the message sequence.
#[derive(Debug, Default, Clone, Copy)]
enum Framing {
    /// Collecting a 4-byte header.
    #[default]
    Header,
    HeaderPart {
        bytes: [u8; 4],
        have: u8,
    },
    /// Skipping (or, for `SHUT`, collecting) the body.
    Body {
        kind: u16,
        left: u16,
        status: u32,
    },
    /// A message the watch cannot frame: it stops looking.
    Lost,
}

impl Seen {
    /// Follow the message framing over `bytes`: constant work per byte, whole bodies skipped.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.framing {
                Framing::Lost => return,
                Framing::Header => {
                    self.framing = Framing::HeaderPart {
                        bytes: [0; 4],
                        have: 0,
                    }
                }
                Framing::HeaderPart {
                    bytes: mut header,
                    mut have,
                } => {
                    let Some((&byte, rest)) = bytes.split_first() else {
                        return;
                    };
                    bytes = rest;
                    if let Some(slot) = header.get_mut(usize::from(have)) {
                        *slot = byte;
                    }
                    have = have.saturating_add(1);
                    self.framing = if have < 4 {
                        Framing::HeaderPart {
                            bytes: header,
                            have,
                        }
                    } else {
                        let [k0, k1, l0, l1] = header;
                        self.start_body(u16::from_be_bytes([k0, k1]), u16::from_be_bytes([l0, l1]))
                    };
                }
                Framing::Body {
                    kind,
                    left,
                    mut status,
                } => {
                    let take = bytes.len().min(usize::from(left));
                    let (body, rest) = bytes.split_at(take);
                    bytes = rest;
                    if kind == SHUT {
                        for &byte in body {
                            status = status << 8 | u32::from(byte);
                        }
                    }
                    let left = left.saturating_sub(u16::try_from(take).unwrap_or(u16::MAX));
                    self.framing = if left == 0 {
                        self.message_done(kind, status);
                        Framing::Header
                    } else {
                        Framing::Body { kind, left, status }
                    };
                }
            }
        }
    }

    fn start_body(&mut self, kind: u16, len: u16) -> Framing {
        if kind == 0 || kind == RECV_BITMAP || kind > LAST_KNOWN || (kind == SHUT && len != 4) {
            return Framing::Lost;
        }
        if len == 0 {
            self.message_done(kind, 0);
            return Framing::Header;
        }
        Framing::Body {
            kind,
            left: len,
            status: 0,
        }
    }

    fn message_done(&mut self, kind: u16, status: u32) {
        if kind == SHUT && self.shut.is_none() {
            self.shut = Some(status);
        }
    }

    fn lost(&self) -> bool {
        matches!(self.framing, Framing::Lost)
    }
}

impl DestinationEnd {
    /// `reader` (the destination's side of the main channel), watched as it is read.
    pub fn watch<R>(&self, reader: R) -> Watched<'_, R> {
        Watched {
            inner: reader,
            end: self,
        }
    }

    /// `writer` (migproxy's side of the main channel towards the destination), whose failures
    /// are noted: a failed write may be the destination's exit after a `SHUT` not yet read.
    pub fn watch_writes<W>(&self, writer: W) -> WatchedWrites<'_, W> {
        WatchedWrites {
            inner: writer,
            end: self,
        }
    }

    /// Run both directions of the main channel until both have ended, or one has failed.
    ///
    /// Like a `try_join`, except for a forward direction that failed on a write towards the
    /// destination: the return path is then driven on for up to [`SHUT_GRACE`] (or until it
    /// ends), so a `SHUT` already in the socket is read and relayed before the channel ends with
    /// the write's error (and [`DestinationEnd::verdict`] names the destination's failure).
    pub async fn both_directions(
        &self,
        forward: impl Future<Output = Result<(), ProxyError>>,
        return_path: impl Future<Output = Result<(), ProxyError>>,
    ) -> Result<(), ProxyError> {
        let mut forward = pin!(forward);
        let mut return_path = pin!(return_path);
        // Unbiased, like a join: a busy forward direction must not keep the return path (page
        // requests in postcopy) waiting, so neither always goes first.
        tokio::select! {
            forwarded = &mut forward => match forwarded {
                Ok(()) => return_path.await,
                Err(err) if self.seen().write_failed => {
                    // Whatever the return path ends with, the write's error is the channel's:
                    // the verdict reads what the watch saw meanwhile.
                    let _ = tokio::time::timeout(SHUT_GRACE, return_path).await;
                    Err(err)
                }
                Err(err) => Err(err),
            },
            relayed = &mut return_path => match relayed {
                Ok(()) => forward.await,
                Err(err) => Err(err),
            },
        }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().map(|seen| *seen).unwrap_or_default()
    }

    fn update(&self, change: impl FnOnce(&mut Seen)) {
        if let Ok(mut seen) = self.seen.lock() {
            change(&mut seen);
        }
    }

    /// What the end of the return-path relay means, decided when it ends: `relayed` is its
    /// result, `progress` how far the forward direction got.
    pub fn relay_ended(
        &self,
        relayed: Result<u64, ProxyError>,
        progress: Progress,
    ) -> Result<(), ProxyError> {
        let Progress {
            forwarded,
            stream_complete,
            tls,
        } = progress;
        let seen = self.seen();
        match seen.closed {
            // After a clean `SHUT 0` nothing the connection does changes the verdict.
            Some(_) if seen.shut == Some(0) => Ok(()),
            // Over TLS a destination that loaded everything resets too: migproxy's close_notify,
            // sent after the last byte, is data its QEMU never reads. Without a SHUT, that reset
            // says nothing.
            Some(Closed::Reset) if forwarded && tls && seen.shut.is_none() => Ok(()),
            // Every byte of a complete stream may be with the destination before the source has
            // closed its side: a reset then is the end of a load, as after the source's end.
            Some(Closed::Reset) => Err(ProxyError::Destination(if forwarded || stream_complete {
                DestinationVerdict::ResetAfterEnd
            } else {
                DestinationVerdict::ResetBeforeEnd
            })),
            Some(Closed::Eof) if !forwarded && !stream_complete && seen.shut.is_none() => {
                Err(ProxyError::Destination(DestinationVerdict::ClosedBeforeEnd))
            }
            Some(Closed::Eof) => Ok(()),
            // The relay stopped on its write towards the source: a source gone after the whole
            // stream went through has nothing left to hear.
            None => match relayed {
                Err(ProxyError::Io { source, .. })
                    if forwarded
                        && matches!(
                            source.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        ) =>
                {
                    Ok(())
                }
                other => other.map(|_| ()),
            },
        }
    }

    /// The main channel's result, with the destination's verdict: a failed load the destination
    /// reported wins over whatever error its exit caused on the way (a reset, a failed write),
    /// which is kept as context unless it is only another reading of the same end.
    pub fn verdict(
        &self,
        carried: Result<(), ProxyError>,
        return_path: bool,
    ) -> Result<(), ProxyError> {
        let seen = self.seen();
        match (seen.shut, carried) {
            (Some(status), carried) if status != 0 => {
                let verdict = DestinationVerdict::FailedLoad(status);
                Err(match carried {
                    Ok(()) | Err(ProxyError::Destination(_)) => ProxyError::Destination(verdict),
                    Err(cause) => ProxyError::DestinationMeanwhile {
                        verdict,
                        cause: Box::new(cause),
                    },
                })
            }
            (_, Err(err)) => Err(err),
            (None, Ok(())) if return_path && !seen.lost() && seen.closed == Some(Closed::Eof) => {
                Err(ProxyError::Destination(
                    DestinationVerdict::ClosedWithoutShut,
                ))
            }
            (_, Ok(())) => Ok(()),
        }
    }
}

/// A reader whose bytes (and end) the [`DestinationEnd`] sees as they are read.
pub struct Watched<'a, R> {
    inner: R,
    end: &'a DestinationEnd,
}

impl<R: AsyncRead + Unpin> AsyncRead for Watched<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => {
                let new = buf.filled().get(before..).unwrap_or_default();
                if new.is_empty() {
                    this.end.update(|seen| {
                        seen.closed.get_or_insert(Closed::Eof);
                    });
                } else {
                    this.end.update(|seen| seen.feed(new));
                }
            }
            Poll::Ready(Err(err)) => {
                let closed = match err.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                        Some(Closed::Reset)
                    }
                    // A TLS peer that closes without close_notify.
                    io::ErrorKind::UnexpectedEof => Some(Closed::Eof),
                    _ => None,
                };
                if let Some(closed) = closed {
                    this.end.update(|seen| {
                        seen.closed.get_or_insert(closed);
                    });
                }
            }
            Poll::Pending => {}
        }
        polled
    }
}

/// A writer whose failures the [`DestinationEnd`] sees.
pub struct WatchedWrites<'a, W> {
    inner: W,
    end: &'a DestinationEnd,
}

impl<W> WatchedWrites<'_, W> {
    fn noted<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &polled {
            self.end.update(|seen| seen.write_failed = true);
        }
        polled
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WatchedWrites<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.noted(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.noted(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.noted(polled)
    }

    /// A failed half-close is not noted: it comes after the whole stream, and the pump ignores it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut bytes = kind.to_be_bytes().to_vec();
        bytes.extend(u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
        bytes.extend(body);
        bytes
    }

    fn seen_after(chunks: &[&[u8]]) -> Seen {
        let mut seen = Seen::default();
        for chunk in chunks {
            seen.feed(chunk);
        }
        seen
    }

    #[test]
    fn the_shut_status_is_read_across_any_split_of_the_messages() {
        // What a 10.0 destination sends with switchover-ack: SWITCHOVER_ACK, PONG(1), SHUT(1).
        let mut stream = message(7, &[]);
        stream.extend(message(2, &1u32.to_be_bytes()));
        stream.extend(message(SHUT, &1u32.to_be_bytes()));
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            let seen = seen_after(&[a, b]);
            assert_eq!(seen.shut, Some(1), "split at {split}");
            assert!(!seen.lost());
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(seen_after(&bytewise).shut, Some(1));
    }

    #[test]
    fn page_requests_are_skipped_by_their_length() {
        // A REQ_PAGES_ID whose RAM block name holds what looks like a SHUT header.
        let mut body = vec![0u8; 12];
        body.push(8);
        body.extend(message(SHUT, &7u32.to_be_bytes()));
        let mut stream = message(3, &body);
        stream.extend(message(SHUT, &0u32.to_be_bytes()));
        assert_eq!(seen_after(&[&stream]).shut, Some(0));
    }

    #[test]
    fn a_message_it_cannot_frame_stops_the_watch() {
        let mut stream = message(RECV_BITMAP, &[4, b'p', b'c', b'.', b'r']);
        stream.extend(message(SHUT, &1u32.to_be_bytes()));
        let seen = seen_after(&[&stream]);
        assert!(seen.lost());
        assert_eq!(seen.shut, None);
        assert!(seen_after(&[&message(99, &[])]).lost());
        assert!(seen_after(&[&message(SHUT, &[0, 0])]).lost());
    }

    fn end_with(bytes: &[u8], closed: Option<Closed>) -> DestinationEnd {
        let end = DestinationEnd::default();
        end.update(|seen| {
            seen.feed(bytes);
            seen.closed = closed;
        });
        end
    }

    fn reason(result: Result<(), ProxyError>) -> String {
        match result {
            Ok(()) => "ok".to_owned(),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn verdicts_follow_what_the_destination_said_and_how_it_closed() {
        let shut0 = message(SHUT, &0u32.to_be_bytes());
        let shut1 = message(SHUT, &1u32.to_be_bytes());
        let eof = Some(Closed::Eof);
        let reset = Some(Closed::Reset);
        // Return-path bytes, how it closed, forwarded, stream complete, return path -> reason.
        type Case<'a> = (&'a [u8], Option<Closed>, bool, bool, bool, &'a str);
        let cases: [Case; 10] = [
            (&shut0, eof, true, true, true, "ok"),
            (&shut0, reset, true, true, true, "ok"),
            (
                &shut1,
                eof,
                true,
                true,
                true,
                "destination reported a failed load (return path SHUT 1)",
            ),
            (
                &shut1,
                reset,
                false,
                false,
                true,
                "destination reported a failed load (return path SHUT 1)",
            ),
            (&[], eof, true, true, false, "ok"),
            (
                &[],
                reset,
                true,
                true,
                false,
                "destination reset the connection after the stream ended",
            ),
            (
                &[],
                reset,
                false,
                false,
                false,
                "destination reset the connection before the stream ended",
            ),
            (
                &[],
                eof,
                false,
                false,
                false,
                "destination closed the connection before the stream ended",
            ),
            (
                &[],
                reset,
                false,
                true,
                false,
                "destination reset the connection after the stream ended",
            ),
            (
                &[],
                eof,
                true,
                true,
                true,
                "destination closed the connection without the return path's SHUT",
            ),
        ];
        for (bytes, closed, forwarded, complete, return_path, expected) in cases {
            let end = end_with(bytes, closed);
            let progress = Progress {
                forwarded,
                stream_complete: complete,
                tls: false,
            };
            let relayed = end.relay_ended(Ok(0), progress);
            let got = reason(end.verdict(relayed, return_path));
            assert_eq!(
                got, expected,
                "{bytes:?} {closed:?} forwarded={forwarded} return_path={return_path}"
            );
        }
    }

    #[test]
    fn a_reported_failure_wins_over_the_error_its_exit_caused() {
        let end = end_with(&message(SHUT, &1u32.to_be_bytes()), None);
        let write_failed = Err(ProxyError::io(
            "main channel: write to destination",
            io::Error::from(io::ErrorKind::BrokenPipe),
        ));
        assert_eq!(
            reason(end.verdict(write_failed, true)),
            "destination reported a failed load (return path SHUT 1) \
             (meanwhile main channel: write to destination: broken pipe)"
        );
        // Its reset read on the return path is the same end, not more context.
        let reset = Err(ProxyError::Destination(DestinationVerdict::ResetBeforeEnd));
        assert_eq!(
            reason(end.verdict(reset, true)),
            "destination reported a failed load (return path SHUT 1)"
        );
    }

    /// A writer whose every write fails as a socket reset by its peer does.
    struct ResetWriter;

    impl AsyncWrite for ResetWriter {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A forward direction whose write towards the destination fails.
    async fn failed_write(end: &DestinationEnd) -> Result<(), ProxyError> {
        use tokio::io::AsyncWriteExt;
        let mut writer = end.watch_writes(ResetWriter);
        writer
            .write_all(b"stream")
            .await
            .map_err(|e| ProxyError::io("main channel: write to destination", e))
    }

    /// A return path that brings `SHUT 1` after `delay` and then stays open.
    async fn shut_after(end: &DestinationEnd, delay: Duration) -> Result<(), ProxyError> {
        tokio::time::sleep(delay).await;
        end.update(|seen| seen.feed(&message(SHUT, &1u32.to_be_bytes())));
        std::future::pending().await
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_waits_for_a_shut_on_its_way_and_keeps_its_error_as_context() {
        let end = DestinationEnd::default();
        let carried = end
            .both_directions(failed_write(&end), shut_after(&end, SHUT_GRACE / 4))
            .await;
        assert_eq!(
            reason(end.verdict(carried, true)),
            "destination reported a failed load (return path SHUT 1) \
             (meanwhile main channel: write to destination: connection reset)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_is_bounded_and_only_a_failed_write_gets_it() {
        let end = DestinationEnd::default();
        let started = tokio::time::Instant::now();
        let carried = end
            .both_directions(failed_write(&end), shut_after(&end, SHUT_GRACE * 2))
            .await;
        assert_eq!(started.elapsed(), SHUT_GRACE, "virtual time");
        assert_eq!(
            reason(end.verdict(carried, true)),
            "main channel: write to destination: connection reset"
        );

        // A forward direction that failed for any other reason ends the channel at once.
        let end = DestinationEnd::default();
        let started = tokio::time::Instant::now();
        let refused = async { Err(ProxyError::Usage("refused here".to_owned())) };
        let carried = end
            .both_directions(refused, shut_after(&end, SHUT_GRACE / 4))
            .await;
        assert_eq!(started.elapsed(), Duration::ZERO, "virtual time");
        assert_eq!(reason(end.verdict(carried, true)), "refused here");
    }

    #[test]
    fn a_source_gone_after_the_whole_stream_is_no_failure() {
        let end = DestinationEnd::default();
        let gone = || {
            Err(ProxyError::io(
                "return path: write",
                io::Error::from(io::ErrorKind::BrokenPipe),
            ))
        };
        let done = Progress {
            forwarded: true,
            stream_complete: true,
            tls: false,
        };
        assert_eq!(reason(end.relay_ended(gone(), done)), "ok");
        assert!(reason(end.relay_ended(gone(), Progress::default())).contains("return path: write"));
    }

    #[test]
    fn over_tls_a_reset_after_the_stream_ended_says_nothing_without_a_shut() {
        let done = Progress {
            forwarded: true,
            stream_complete: true,
            tls: true,
        };
        let end = end_with(&[], Some(Closed::Reset));
        assert_eq!(
            reason(end.verdict(end.relay_ended(Ok(0), done), false)),
            "ok"
        );
        let end = end_with(&message(SHUT, &1u32.to_be_bytes()), Some(Closed::Reset));
        assert_eq!(
            reason(end.verdict(end.relay_ended(Ok(0), done), true)),
            "destination reported a failed load (return path SHUT 1)"
        );
        let early = Progress {
            forwarded: false,
            stream_complete: false,
            tls: true,
        };
        let end = end_with(&[], Some(Closed::Reset));
        assert_eq!(
            reason(end.verdict(end.relay_ended(Ok(0), early), false)),
            "destination reset the connection before the stream ended"
        );
    }
}
