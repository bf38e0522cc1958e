//! A multifd-style migration through a relay: what the raw channels cost it.
//!
//! One run: the main channel sends a captured stream up to its device-state phase (so the relay
//! has a migration the channels can join, and decodes a real stream as it would), then N multifd
//! channels each send QEMU's multifd handshake (magic, version, zero UUID, channel id) and
//! `channel_bytes` of bulk data from a payload file at once, then half-close; once every channel
//! has arrived at the destination the main channel sends the rest of its stream and closes. The
//! relay's CPU time (utime+stime of its process tree, `/proc/PID/stat`) over the whole run is
//! divided by the bytes the destination received. Relays rotate order each repetition. Meant for
//! `migproxy run --raw-relay copy` against `--raw-relay splice`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::receiver::{Connection, Receiver};
use crate::relay_process::RelaySpec;
use crate::rounds::{rotate, Outcomes};
use crate::sender::Sender;
use crate::stats::{summarize, Summary};
use crate::stream_layout::layout_of_file;
use crate::throughput::{warm_page_cache, TRANSFER_TIMEOUT};
use crate::{procfs, BenchError, GIB};

/// QEMU's multifd handshake (`multifd_send_initial_packet`): magic, version 1, a zero UUID (no
/// `-uuid`), the channel id, padding to 64 bytes.
fn multifd_handshake(id: u8) -> Vec<u8> {
    let mut packet = vec![0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1];
    packet.extend_from_slice(&[0; 16]);
    packet.push(id);
    packet.resize(64, 0);
    packet
}

/// What the runs share.
pub struct Plan<'a> {
    /// The main channel's stream.
    pub stream: &'a Path,
    /// Where the bulk bytes of the multifd channels come from (read in a loop).
    pub payload: &'a Path,
    pub channels: u8,
    pub channel_bytes: u64,
    pub log_dir: &'a Path,
    /// Uncounted runs per relay before the counted ones.
    pub warmup: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub rep: usize,
    /// From the first multifd byte sent to the last multifd byte received.
    pub multifd_seconds: f64,
    pub multifd_gib_per_s: f64,
    pub bytes_received: u64,
    pub relay_cpu_s: f64,
    pub cpu_s_per_gib: f64,
    pub peak_rss_kib: u64,
    pub loadavg: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayResult {
    pub relay: RelaySpec,
    pub runs: Vec<Run>,
    pub errors: Vec<String>,
    pub cpu_s_per_gib: Option<Summary>,
    pub multifd_gib_per_s: Option<Summary>,
    pub peak_rss_mib: Option<Summary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub stream: PathBuf,
    pub payload: PathBuf,
    pub channels: u8,
    pub channel_bytes: u64,
    pub reps: usize,
    pub warmup: usize,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub relays: Vec<RelayResult>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Sends `len` bytes of `payload` (repeated from its start as often as needed), then half-closes.
fn send_bulk(sender: &mut Sender, payload_len: u64, len: u64) -> Result<(), String> {
    let mut left = len;
    while left > 0 {
        let part = left.min(payload_len);
        sender.send_range(0, part)?;
        left -= part;
    }
    sender.shutdown_write()
}

fn one_run(
    relay: &RelaySpec,
    plan: &Plan,
    receiver: &Receiver,
    rep: usize,
) -> Result<Run, BenchError> {
    let failed = |reason: String| BenchError::Transfer {
        relay: relay.name.clone(),
        reason,
    };
    let layout = layout_of_file(plan.stream)?;
    let payload_len = std::fs::metadata(plan.payload)
        .map_err(BenchError::io(format!("stat {}", plan.payload.display())))?
        .len();
    if payload_len == 0 {
        return Err(BenchError::Usage("the payload file is empty".into()));
    }
    let stray = receiver.discard_stray();
    if stray > 0 {
        eprintln!("migbench: discarded {stray} stray destination connection(s)");
    }
    let running = relay
        .start(receiver.port(), plan.log_dir)?
        .ok_or_else(|| BenchError::Usage("multifd-relay measures a relay, not direct".into()))?;
    let hz = procfs::clock_ticks_per_second();
    let cpu_before = running.cpu_ticks()?;
    let sampler = running.sample_peak_rss();

    // The main channel opens the migration and is dialed first.
    let mut main = Sender::connect(running.listen_port, plan.stream).map_err(failed)?;
    main.send_range(0, layout.device_state_offset)
        .map_err(failed)?;
    let main_arrived = receiver.next_connection(TRANSFER_TIMEOUT).map_err(failed)?;

    let start = Instant::now();
    let senders: Vec<std::thread::JoinHandle<Result<(), String>>> = (0..plan.channels)
        .map(|id| {
            let (port, payload, bytes) = (
                running.listen_port,
                plan.payload.to_path_buf(),
                plan.channel_bytes,
            );
            std::thread::spawn(move || {
                let mut sender = Sender::connect(port, &payload)?;
                sender.send_bytes(&multifd_handshake(id))?;
                send_bulk(&mut sender, payload_len, bytes)?;
                sender.finish(TRANSFER_TIMEOUT)
            })
        })
        .collect();
    let arrived: Vec<Arc<Connection>> = (0..plan.channels)
        .map(|_| receiver.next_connection(TRANSFER_TIMEOUT))
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    let mut last_byte = start;
    for connection in &arrived {
        let at = connection
            .wait_finished(TRANSFER_TIMEOUT)
            .map_err(failed)?
            .ok_or_else(|| failed("a multifd channel received nothing".into()))?;
        last_byte = last_byte.max(at);
    }
    for sender in senders {
        sender
            .join()
            .map_err(|_| failed("a multifd sender panicked".into()))?
            .map_err(failed)?;
    }
    let multifd_seconds = last_byte.duration_since(start).as_secs_f64();

    main.send_range(
        layout.device_state_offset,
        layout.total_len - layout.device_state_offset,
    )
    .map_err(failed)?;
    main.finish(TRANSFER_TIMEOUT).map_err(failed)?;
    main_arrived
        .wait_finished(TRANSFER_TIMEOUT)
        .map_err(failed)?;

    running.settle(Duration::from_secs(2));
    let cpu_after = running.cpu_ticks()?;
    let peak_rss_kib = sampler.finish().max(running.hwm_kib());
    running.stop();

    let per_channel = plan.channel_bytes + 64;
    for (index, connection) in arrived.iter().enumerate() {
        if connection.bytes() != per_channel {
            return Err(failed(format!(
                "multifd connection {index} delivered {} of {per_channel} bytes",
                connection.bytes()
            )));
        }
    }
    if main_arrived.bytes() != layout.total_len {
        return Err(failed(format!(
            "the main channel delivered {} of {} bytes",
            main_arrived.bytes(),
            layout.total_len
        )));
    }
    let multifd_bytes = per_channel * u64::from(plan.channels);
    let bytes_received = multifd_bytes + layout.total_len;
    let relay_cpu_s = cpu_after.saturating_sub(cpu_before) as f64 / hz as f64;
    Ok(Run {
        rep,
        multifd_seconds,
        multifd_gib_per_s: multifd_bytes as f64 / GIB / multifd_seconds,
        bytes_received,
        relay_cpu_s,
        cpu_s_per_gib: relay_cpu_s / (bytes_received as f64 / GIB),
        peak_rss_kib,
        loadavg: loadavg(),
    })
}

pub fn run(plan: &Plan, reps: usize, relays: &[RelaySpec]) -> Result<Report, BenchError> {
    if plan.channels == 0 {
        return Err(BenchError::Usage("at least one multifd channel".into()));
    }
    warm_page_cache(plan.stream)?;
    warm_page_cache(plan.payload)?;
    let receiver = Receiver::start()?;
    let loadavg_start = loadavg();
    let outcomes = rotate(
        "multifd-relay",
        relays,
        plan.warmup,
        reps,
        |relay, rep| one_run(relay, plan, &receiver, rep),
        |run| {
            format!(
                "{:.3} GiB/s, cpu {:.2} s = {:.3} s/GiB, peak rss {} KiB, load {}",
                run.multifd_gib_per_s,
                run.relay_cpu_s,
                run.cpu_s_per_gib,
                run.peak_rss_kib,
                run.loadavg
            )
        },
    );
    let relays = relays
        .iter()
        .zip(outcomes)
        .map(|(relay, Outcomes { runs, errors })| {
            let pick = |f: fn(&Run) -> f64| -> Option<Summary> {
                let values: Vec<f64> = runs.iter().map(f).collect();
                (!values.is_empty()).then(|| summarize(&values))
            };
            RelayResult {
                relay: relay.clone(),
                cpu_s_per_gib: pick(|r| r.cpu_s_per_gib),
                multifd_gib_per_s: pick(|r| r.multifd_gib_per_s),
                peak_rss_mib: pick(|r| r.peak_rss_kib as f64 / 1024.0),
                runs,
                errors,
            }
        })
        .collect();
    Ok(Report {
        stream: plan.stream.to_path_buf(),
        payload: plan.payload.to_path_buf(),
        channels: plan.channels,
        channel_bytes: plan.channel_bytes,
        reps,
        warmup: plan.warmup,
        loadavg_start,
        loadavg_end: loadavg(),
        relays,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_is_qemus_64_bytes_with_the_channel_id() {
        let packet = multifd_handshake(2);
        assert_eq!(packet.len(), 64);
        assert_eq!(&packet[..8], &[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
        assert_eq!(packet[24], 2);
    }
}
