//! A fixed-delay packet line: every packet read from one file (a TUN device) is written to another
//! a fixed time after it arrived, in arrival order.
//!
//! The two-host benchmark (`scripts/bench-two-host.sh`) needs a 0.2 ms round trip between two
//! network namespaces on a kernel without `sch_netem`; it sends the reverse direction (the
//! destination's ACKs) through this line. One thread reads and stamps each packet with its
//! deadline (a monotonic clock), a bounded queue holds it (a full queue drops and counts), the
//! writing thread sleeps until shortly before the deadline with a 1 ns timer slack and spins the
//! rest, so the delay is precise to a few microseconds instead of the scheduler's 50 us default
//! slack.

use std::io::{Read, Write};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::BenchError;

/// The largest packet a TUN device hands out (its MTU is at most 65535).
pub const MAX_PACKET: usize = 65_536;
/// Lateness histogram: one bucket per microsecond up to this many, the rest in the last bucket.
const LATENESS_BUCKETS: usize = 1_000;

#[derive(Debug, Clone)]
pub struct DelayLineConfig {
    /// Added to every packet's time of arrival.
    pub delay: Duration,
    /// How long before a deadline the writer stops sleeping and spins (covers the wake-up latency).
    pub spin: Duration,
    /// Packets in flight inside the line; beyond it arrivals are dropped (and counted).
    pub queue_packets: usize,
}

/// Counters shared between the line's threads and whoever reports them.
#[derive(Debug)]
pub struct DelayLineStats {
    pub forwarded: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    /// Write errors (e.g. the namespace's side was down); the packet is lost, as on a wire.
    pub write_errors: AtomicU64,
    lateness_us: Vec<AtomicU64>,
}

impl Default for DelayLineStats {
    fn default() -> Self {
        DelayLineStats {
            forwarded: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            lateness_us: (0..LATENESS_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// A point-in-time copy of the counters, with lateness percentiles (microseconds past the deadline
/// at which the packet was written).
#[derive(Debug, Serialize)]
pub struct DelayLineReport {
    pub delay_us: u64,
    pub forwarded: u64,
    pub forwarded_bytes: u64,
    pub dropped_queue_full: u64,
    pub write_errors: u64,
    pub lateness_us_p50: Option<u64>,
    pub lateness_us_p99: Option<u64>,
    pub lateness_us_max_bucket: Option<u64>,
}

impl DelayLineStats {
    fn record_lateness(&self, late: Duration) {
        let us = usize::try_from(late.as_micros()).unwrap_or(usize::MAX);
        let bucket = us.min(LATENESS_BUCKETS - 1);
        if let Some(counter) = self.lateness_us.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn report(&self, delay: Duration) -> DelayLineReport {
        let counts: Vec<u64> = self
            .lateness_us
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let percentile = |p: u64| -> Option<u64> {
            let wanted = total.checked_mul(p)?.div_ceil(100).max(1);
            let mut seen = 0;
            for (us, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= wanted && total > 0 {
                    return u64::try_from(us).ok();
                }
            }
            None
        };
        let max_bucket = counts
            .iter()
            .rposition(|&n| n > 0)
            .and_then(|us| u64::try_from(us).ok());
        DelayLineReport {
            delay_us: u64::try_from(delay.as_micros()).unwrap_or(u64::MAX),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Ordering::Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            lateness_us_p50: percentile(50),
            lateness_us_p99: percentile(99),
            lateness_us_max_bucket: max_bucket,
        }
    }
}

struct Delayed {
    deadline: Instant,
    packet: Vec<u8>,
}

/// Runs the line until `input` reaches end of file (or fails): reads on a thread of its own, writes
/// on the calling thread. Returns after every queued packet went out.
pub fn run<R, W>(
    input: R,
    mut output: W,
    config: &DelayLineConfig,
    stats: &Arc<DelayLineStats>,
) -> Result<(), BenchError>
where
    R: Read + Send + 'static,
    W: Write,
{
    if config.queue_packets == 0 {
        return Err(BenchError::Usage(
            "the delay line's queue needs room for at least one packet".into(),
        ));
    }
    // Precise sleeps: the default slack (50 us) would be a quarter of the wanted round trip.
    rustix::thread::set_current_timer_slack(NonZeroU64::new(1))
        .map_err(|e| BenchError::io("setting the timer slack")(e.into()))?;
    let (queue, delayed) = mpsc::sync_channel(config.queue_packets);
    let reader_stats = Arc::clone(stats);
    let delay = config.delay;
    let reader = thread::Builder::new()
        .name("delay-line-read".into())
        .spawn(move || read_packets(input, delay, &queue, &reader_stats))
        .map_err(BenchError::io("starting the delay line's reader"))?;
    write_packets(&mut output, config.spin, &delayed, stats);
    reader
        .join()
        .map_err(|_| BenchError::Usage("the delay line's reader panicked".into()))?
}

fn read_packets<R: Read>(
    mut input: R,
    delay: Duration,
    queue: &SyncSender<Delayed>,
    stats: &DelayLineStats,
) -> Result<(), BenchError> {
    loop {
        let mut packet = vec![0; MAX_PACKET];
        // A TUN device returns exactly one packet per read.
        let n = input
            .read(&mut packet)
            .map_err(BenchError::io("reading a packet"))?;
        if n == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + delay;
        packet.truncate(n);
        match queue.try_send(Delayed { deadline, packet }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => return Ok(()),
        }
    }
}

fn write_packets<W: Write>(
    output: &mut W,
    spin: Duration,
    delayed: &Receiver<Delayed>,
    stats: &DelayLineStats,
) {
    while let Ok(Delayed { deadline, packet }) = delayed.recv() {
        wait_until(deadline, spin);
        stats.record_lateness(Instant::now().saturating_duration_since(deadline));
        // One write per packet: a TUN device takes a packet per write, never a part of one.
        match output.write(&packet) {
            Ok(n) if n == packet.len() => {
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
                stats
                    .forwarded_bytes
                    .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            _ => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Sleeps until `spin` before the deadline, then spins: a sleeping thread wakes tens of microseconds
/// late on a busy machine, a spinning one within a few.
fn wait_until(deadline: Instant, spin: Duration) {
    let now = Instant::now();
    if let Some(sleep) = deadline
        .checked_duration_since(now)
        .and_then(|left| left.checked_sub(spin))
    {
        thread::sleep(sleep);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// Real datagram sockets stand in for the TUN devices (one datagram per read, like a packet).
    #[test]
    fn packets_come_out_in_order_no_earlier_than_the_delay(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (feed, line_in) = UnixDatagram::pair()?;
        let line_in_end = line_in.try_clone()?;
        let (line_out, sink) = UnixDatagram::pair()?;
        let config = DelayLineConfig {
            delay: Duration::from_millis(20),
            spin: Duration::from_micros(50),
            queue_packets: 16,
        };
        let stats = Arc::new(DelayLineStats::default());
        let line_stats = Arc::clone(&stats);
        let line = thread::spawn(move || {
            run(
                DatagramIo(line_in),
                DatagramIo(line_out),
                &config,
                &line_stats,
            )
        });
        let mut sent = Vec::new();
        for i in 0u8..5 {
            feed.send(&[i; 100])?;
            sent.push(Instant::now());
        }
        let mut buf = [0u8; 200];
        for (i, at) in sent.iter().enumerate() {
            let n = sink.recv(&mut buf)?;
            assert!(
                at.elapsed() >= Duration::from_millis(20),
                "packet {i} came out before its delay"
            );
            assert_eq!(buf.get(..n), Some(&[u8::try_from(i)?; 100][..]));
        }
        // End of input ends the line after the queue drained.
        line_in_end.shutdown(std::net::Shutdown::Read)?;
        line.join().map_err(|_| "line panicked")??;
        let report = stats.report(Duration::from_millis(20));
        assert_eq!(
            (
                report.forwarded,
                report.dropped_queue_full,
                report.write_errors
            ),
            (5, 0, 0)
        );
        assert_eq!(report.forwarded_bytes, 500);
        Ok(())
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let stats = DelayLineStats::default();
        let (queue, _delayed) = mpsc::sync_channel(2);
        let input: &[u8] = &[1; 10];
        // A reader over an in-memory input returns everything in one read, then end of file: one
        // packet per call, so feed three calls through the same queue.
        for _ in 0..3 {
            assert!(read_packets(input, Duration::from_millis(1), &queue, &stats).is_ok());
        }
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 1);
    }

    struct DatagramIo(UnixDatagram);

    impl Read for DatagramIo {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.recv(buf)
        }
    }

    impl Write for DatagramIo {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.send(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
