//! Concurrent migrations through one relay process: aggregate throughput and memory per
//! migration.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::relay_process::RelaySpec;
use crate::rounds::{rotate, Outcomes};
use crate::sender::Sender;
use crate::stats::{summarize, Summary};
use crate::throughput::{Setup, TRANSFER_TIMEOUT};
use crate::{BenchError, GIB};

#[derive(Debug, Clone, Serialize)]
pub struct ScaleRun {
    pub rep: usize,
    pub seconds: f64,
    pub aggregate_gib_per_s: f64,
    pub relay_cpu_s: Option<f64>,
    pub idle_rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    /// (peak - idle) / concurrency.
    pub rss_per_migration_kib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    pub relay: RelaySpec,
    pub concurrency: usize,
    pub runs: Vec<ScaleRun>,
    pub errors: Vec<String>,
    pub aggregate_gib_per_s: Summary,
    pub peak_rss_mib: Option<Summary>,
    pub rss_per_migration_mib: Option<Summary>,
    pub cpu_s_per_gib: Option<Summary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub stream: PathBuf,
    pub stream_bytes: u64,
    pub reps: usize,
    /// Uncounted runs per relay and concurrency before the counted ones.
    pub warmup: usize,
    pub points: Vec<ScalePoint>,
}

/// The loopback address migration `k` comes from: 127.1.0.1, 127.1.0.2, ... (one source host
/// per migration; migproxy allows one migration per source host and destination). Distinct
/// for the first 62 500 migrations.
fn source_address(k: usize) -> Ipv4Addr {
    let third = u8::try_from(k / 250 % 250).unwrap_or(0);
    let fourth = u8::try_from(k % 250 + 1).unwrap_or(1);
    Ipv4Addr::new(127, 1, third, fourth)
}

fn one_run(
    relay: &RelaySpec,
    setup: &Setup,
    concurrency: usize,
    rep: usize,
) -> Result<ScaleRun, BenchError> {
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
        relay: format!("{} x{concurrency}", relay.name),
        reason,
    };
    receiver.discard_stray();
    let mut running = relay.start(receiver.port(), log_dir)?;
    let target = running.as_ref().map_or(receiver.port(), |r| r.listen_port);
    let idle_rss = running.as_ref().map(|r| r.rss_kib());
    let cpu_before = running.as_ref().map(|r| r.cpu_ticks()).transpose()?;
    let sampler = running.as_ref().map(|r| r.sample_peak_rss());

    let barrier = Arc::new(Barrier::new(concurrency + 1));
    let senders: Vec<_> = (0..concurrency)
        .map(|k| {
            let barrier = Arc::clone(&barrier);
            let stream = stream.to_path_buf();
            let source = source_address(k);
            std::thread::spawn(move || -> Result<(), String> {
                barrier.wait();
                let mut sender = Sender::connect_from(source, target, &stream)?;
                sender.send_range(0, stream_bytes)?;
                sender.finish(TRANSFER_TIMEOUT)
            })
        })
        .collect();
    let start = Instant::now();
    barrier.wait();
    let mut outcome: Result<Option<Instant>, String> = Ok(None);
    for _ in 0..concurrency {
        let step = receiver
            .next_connection(TRANSFER_TIMEOUT)
            .and_then(|c| c.wait_finished(TRANSFER_TIMEOUT).map(|t| (t, c.bytes())));
        outcome = match (outcome, step) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e),
            (Ok(latest), Ok((t, bytes))) => setup.check_received(bytes).map(|()| latest.max(t)),
        };
        if outcome.is_err() {
            break;
        }
    }
    if outcome.is_err() {
        // Unblock senders stuck on a stalled relay before joining them.
        if let Some(r) = running.take() {
            r.stop();
        }
    }
    for handle in senders {
        let joined = handle
            .join()
            .map_err(|_| failed("sender thread panicked".into()))?;
        if let Err(e) = joined {
            outcome = outcome.and(Err(e));
        }
    }
    let last_byte = outcome
        .map_err(failed)?
        .ok_or_else(|| failed("nothing arrived".into()))?;
    let seconds = last_byte.duration_since(start).as_secs_f64();
    let (relay_cpu_s, peak) = match (&running, cpu_before) {
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
    let total_gib = stream_bytes as f64 * concurrency as f64 / GIB;
    Ok(ScaleRun {
        rep,
        seconds,
        aggregate_gib_per_s: total_gib / seconds,
        relay_cpu_s,
        idle_rss_kib: idle_rss,
        peak_rss_kib: peak,
        rss_per_migration_kib: match (peak, idle_rss) {
            (Some(p), Some(i)) => Some(p.saturating_sub(i) as f64 / concurrency as f64),
            _ => None,
        },
    })
}

pub fn run(
    stream: &Path,
    concurrency: &[usize],
    reps: usize,
    warmup: usize,
    relays: &[RelaySpec],
    log_dir: &Path,
) -> Result<Report, BenchError> {
    let setup = Setup::new(stream, log_dir)?;
    let stream_bytes = setup.stream_bytes;
    let mut points = Vec::new();
    for &n in concurrency {
        let outcomes = rotate(
            &format!("scale x{n}"),
            relays,
            warmup,
            reps,
            |relay, rep| one_run(relay, &setup, n, rep),
            |run| {
                format!(
                    "{:.3} GiB/s aggregate, peak rss {:?} KiB",
                    run.aggregate_gib_per_s, run.peak_rss_kib
                )
            },
        );
        let total_gib = stream_bytes as f64 * n as f64 / GIB;
        for (relay, Outcomes { runs, errors }) in relays.iter().zip(outcomes) {
            let pick = |f: &dyn Fn(&ScaleRun) -> Option<f64>| -> Option<Summary> {
                let values: Vec<f64> = runs.iter().filter_map(f).collect();
                (!values.is_empty()).then(|| summarize(&values))
            };
            points.push(ScalePoint {
                relay: relay.clone(),
                concurrency: n,
                aggregate_gib_per_s: summarize(
                    &runs
                        .iter()
                        .map(|r| r.aggregate_gib_per_s)
                        .collect::<Vec<_>>(),
                ),
                peak_rss_mib: pick(&|r| r.peak_rss_kib.map(|k| k as f64 / 1024.0)),
                rss_per_migration_mib: pick(&|r| r.rss_per_migration_kib.map(|k| k / 1024.0)),
                cpu_s_per_gib: pick(&|r| r.relay_cpu_s.map(|c| c / total_gib)),
                runs,
                errors,
            });
        }
    }
    Ok(Report {
        stream: stream.to_path_buf(),
        stream_bytes,
        reps,
        warmup,
        points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_concurrent_migration_has_its_own_source_host() {
        let all: std::collections::BTreeSet<Ipv4Addr> = (0..1000).map(source_address).collect();
        assert_eq!(all.len(), 1000);
        assert!(all.iter().all(|a| a.is_loopback()));
    }
}
