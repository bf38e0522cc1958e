//! Bulk throughput: the whole stream, one migration at a time, relays alternating.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::receiver::Receiver;
use crate::relay_process::RelaySpec;
use crate::rounds::{rotate, Outcomes};
use crate::sender::Sender;
use crate::stats::{summarize, Summary};
use crate::stream_layout::layout_of_file;
use crate::{procfs, BenchError, GIB};

/// Upper bound for one transfer; a relay that stalls is reported, not waited for forever.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub rep: usize,
    pub seconds: f64,
    pub gib_per_s: f64,
    pub bytes_received: u64,
    /// None for `direct` (no relay process).
    pub relay_cpu_s: Option<f64>,
    pub cpu_s_per_gib: Option<f64>,
    pub idle_rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayResult {
    pub relay: RelaySpec,
    pub runs: Vec<Run>,
    pub errors: Vec<String>,
    pub gib_per_s: Summary,
    pub cpu_s_per_gib: Option<Summary>,
    pub peak_rss_mib: Option<Summary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub stream: PathBuf,
    pub stream_bytes: u64,
    pub reps: usize,
    /// Runs per relay before the counted ones (page cache, relay binary, TCP state warm).
    pub warmup: usize,
    pub clock_ticks_per_second: u64,
    pub relays: Vec<RelayResult>,
}

/// Reads the file once so that every relay sees it from the page cache.
pub fn warm_page_cache(path: &Path) -> Result<(), BenchError> {
    let mut file =
        std::fs::File::open(path).map_err(BenchError::io(format!("open {}", path.display())))?;
    std::io::copy(&mut file, &mut std::io::sink())
        .map_err(BenchError::io(format!("read {}", path.display())))?;
    Ok(())
}

/// What every run of a benchmark shares.
pub struct Setup<'a> {
    pub receiver: Receiver,
    pub stream: &'a Path,
    pub stream_bytes: u64,
    pub log_dir: &'a Path,
    /// Clock ticks per second of `/proc/PID/stat`.
    pub hz: u64,
    /// How far the destination's byte count may differ from the stream's: a rewriting
    /// relay changes the size of the device-state phase (registers dropped or filled), and
    /// nothing else. 0 when the file is not a QEMU stream with a description.
    pub size_tolerance: u64,
}

impl Setup<'_> {
    /// Whether a destination that received `bytes` got the whole migration.
    pub fn check_received(&self, bytes: u64) -> Result<(), String> {
        if bytes.abs_diff(self.stream_bytes) > self.size_tolerance {
            return Err(format!(
                "the destination received {bytes} bytes of a {}-byte stream (allowed difference {})",
                self.stream_bytes, self.size_tolerance
            ));
        }
        Ok(())
    }
}

impl<'a> Setup<'a> {
    /// Sizes the stream, warms the page cache with it and starts the destination.
    pub fn new(stream: &'a Path, log_dir: &'a Path) -> Result<Self, BenchError> {
        let stream_bytes = std::fs::metadata(stream)
            .map_err(BenchError::io(format!("stat {}", stream.display())))?
            .len();
        warm_page_cache(stream)?;
        Ok(Setup {
            receiver: Receiver::start()?,
            stream,
            stream_bytes,
            log_dir,
            hz: procfs::clock_ticks_per_second(),
            size_tolerance: layout_of_file(stream).map_or(0, |layout| layout.tail_len()),
        })
    }
}

/// One migration of `stream` through `relay` (a fresh relay process per run, so peak RSS
/// is that run's own high-water mark).
pub fn one_run(relay: &RelaySpec, setup: &Setup, rep: usize) -> Result<Run, BenchError> {
    let Setup {
        receiver,
        stream,
        stream_bytes,
        log_dir,
        hz,
        ..
    } = setup;
    let (stream_bytes, hz) = (*stream_bytes, *hz);
    let failed = |reason: String| BenchError::Transfer {
        relay: relay.name.clone(),
        reason,
    };
    let stray = receiver.discard_stray();
    if stray > 0 {
        eprintln!("migbench: discarded {stray} stray destination connection(s)");
    }
    let running = relay.start(receiver.port(), log_dir)?;
    let target = running.as_ref().map_or(receiver.port(), |r| r.listen_port);
    let idle_rss = running.as_ref().map(|r| r.rss_kib());
    let cpu_before = running.as_ref().map(|r| r.cpu_ticks()).transpose()?;
    let sampler = running.as_ref().map(|r| r.sample_peak_rss());

    let start = Instant::now();
    let mut sender = Sender::connect(target, stream).map_err(failed)?;
    sender.send_range(0, stream_bytes).map_err(failed)?;
    sender.shutdown_write().map_err(failed)?;
    let connection = receiver.next_connection(TRANSFER_TIMEOUT).map_err(failed)?;
    let last_byte = connection
        .wait_finished(TRANSFER_TIMEOUT)
        .map_err(failed)?
        .ok_or_else(|| failed("the destination received nothing".into()))?;
    sender.finish(Duration::from_secs(30)).map_err(failed)?;
    let seconds = last_byte.duration_since(start).as_secs_f64();

    let (relay_cpu_s, peak_rss_kib) = match (&running, cpu_before) {
        (Some(r), Some(before)) => {
            r.settle(Duration::from_secs(2));
            let after = r.cpu_ticks()?;
            let peak = sampler.map_or(0, |s| s.finish()).max(r.hwm_kib());
            (
                Some(after.saturating_sub(before) as f64 / hz as f64),
                Some(peak),
            )
        }
        _ => (None, None),
    };
    if let Some(r) = running {
        r.stop();
    }
    let bytes_received = connection.bytes();
    setup.check_received(bytes_received).map_err(failed)?;
    let gib = stream_bytes as f64 / GIB;
    Ok(Run {
        rep,
        seconds,
        gib_per_s: gib / seconds,
        bytes_received,
        relay_cpu_s,
        cpu_s_per_gib: relay_cpu_s.map(|c| c / gib),
        idle_rss_kib: idle_rss,
        peak_rss_kib,
    })
}

/// `warmup` uncounted runs per relay first, then `reps` rounds in a rotated order.
pub fn run(
    stream: &Path,
    reps: usize,
    warmup: usize,
    relays: &[RelaySpec],
    log_dir: &Path,
) -> Result<Report, BenchError> {
    let setup = Setup::new(stream, log_dir)?;
    let outcomes = rotate(
        "throughput",
        relays,
        warmup,
        reps,
        |relay, rep| one_run(relay, &setup, rep),
        |run| {
            format!(
                "{:.3} GiB/s, cpu {:?} s, peak rss {:?} KiB",
                run.gib_per_s, run.relay_cpu_s, run.peak_rss_kib
            )
        },
    );
    let relays = relays
        .iter()
        .zip(outcomes)
        .map(|(relay, Outcomes { runs, errors })| {
            let pick = |f: fn(&Run) -> Option<f64>| -> Option<Summary> {
                let values: Vec<f64> = runs.iter().filter_map(f).collect();
                (!values.is_empty()).then(|| summarize(&values))
            };
            RelayResult {
                relay: relay.clone(),
                gib_per_s: summarize(&runs.iter().map(|r| r.gib_per_s).collect::<Vec<_>>()),
                cpu_s_per_gib: pick(|r| r.cpu_s_per_gib),
                peak_rss_mib: pick(|r| r.peak_rss_kib.map(|k| k as f64 / 1024.0)),
                runs,
                errors,
            }
        })
        .collect();
    Ok(Report {
        stream: stream.to_path_buf(),
        stream_bytes: setup.stream_bytes,
        reps,
        warmup,
        clock_ticks_per_second: setup.hz,
        relays,
    })
}
