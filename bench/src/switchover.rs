//! Added switchover latency: how much later the destination has the device-state tail
//! when a relay sits in between.
//!
//! Each iteration sends the RAM part, waits until the destination has all of it (so
//! nothing is in flight), then writes the device-state tail (FULL sections, EOF,
//! description) and half-closes. Latency = destination's last byte - the instant the
//! source's last write returned. migproxy holds the whole tail until the description
//! has arrived (DESIGN.md, "Device state is delimited exactly"), so this is where its hold shows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::receiver::Receiver;
use crate::relay_process::{RelaySpec, RunningRelay};
use crate::sender::Sender;
use crate::stats::{summarize, Summary};
use crate::stream_layout::layout_of_file;
use crate::BenchError;

const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a relay may take to exit on SIGTERM (valgrind writing its output) before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize)]
pub struct RelayLatency {
    pub relay: RelaySpec,
    /// Destination's last byte minus the source's last write, microseconds.
    pub samples_us: Vec<f64>,
    /// Destination's last byte minus the source's first tail byte, microseconds.
    pub from_tail_start_us: Vec<f64>,
    /// The round each sample was taken in (every relay runs once per round): the samples of one
    /// round were taken milliseconds apart, so the report pairs them with direct's to cancel drift.
    pub rounds: Vec<usize>,
    pub latency_us: Summary,
    pub from_tail_start: Summary,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub stream: PathBuf,
    pub stream_bytes: u64,
    pub device_state_offset: u64,
    pub device_state_bytes: u64,
    pub vcpus: usize,
    pub iterations: usize,
    /// Uncounted iterations per relay before the counted ones.
    pub warmup: usize,
    pub relays: Vec<RelayLatency>,
}

/// One relay's measurements, in the order they were taken.
#[derive(Debug, Clone, Default)]
struct Samples {
    latency_us: Vec<f64>,
    from_tail_start_us: Vec<f64>,
    rounds: Vec<usize>,
    errors: Vec<String>,
}

/// (latency from last write, latency from first tail byte), seconds.
fn one_iteration(
    target: u16,
    receiver: &Receiver,
    stream: &Path,
    prefix_len: u64,
    tail: &[u8],
) -> Result<(f64, f64), String> {
    let mut sender = Sender::connect(target, stream)?;
    sender.send_range(0, prefix_len)?;
    let connection = receiver.next_connection(STEP_TIMEOUT)?;
    connection.wait_bytes(prefix_len, STEP_TIMEOUT)?;
    let tail_start = std::time::Instant::now();
    sender.send_bytes(tail)?;
    let last_write = std::time::Instant::now();
    sender.shutdown_write()?;
    let last_byte = connection
        .wait_finished(STEP_TIMEOUT)?
        .ok_or("the destination received nothing")?;
    sender.finish(STEP_TIMEOUT)?;
    let signed = |later: std::time::Instant, earlier: std::time::Instant| match later
        .checked_duration_since(earlier)
    {
        Some(d) => d.as_secs_f64(),
        // The destination may read the last byte before the source's write() returns.
        None => -earlier.duration_since(later).as_secs_f64(),
    };
    Ok((signed(last_byte, last_write), signed(last_byte, tail_start)))
}

/// `warmup` uncounted iterations per relay, then `iterations` rounds in a rotated order.
pub fn run(
    stream: &Path,
    iterations: usize,
    warmup: usize,
    relays: &[RelaySpec],
    log_dir: &Path,
) -> Result<Report, BenchError> {
    let layout = layout_of_file(stream)?;
    let tail = {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(stream)
            .map_err(BenchError::io(format!("open {}", stream.display())))?;
        file.seek(SeekFrom::Start(layout.device_state_offset))
            .map_err(BenchError::io("seek tail"))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)
            .map_err(BenchError::io("read tail"))?;
        tail
    };
    let receiver = Receiver::start()?;
    // Long-lived relays here: the per-connection cost is what is measured, not start-up.
    let running: Vec<Option<RunningRelay>> = relays
        .iter()
        .map(|r| r.start(receiver.port(), log_dir))
        .collect::<Result<_, _>>()?;
    for (relay, process) in relays.iter().zip(&running) {
        let target = process.as_ref().map_or(receiver.port(), |p| p.listen_port);
        for _ in 0..warmup {
            receiver.discard_stray();
            if let Err(e) =
                one_iteration(target, &receiver, stream, layout.device_state_offset, &tail)
            {
                eprintln!("migbench: switchover {} warm-up: {e}", relay.name);
            }
        }
    }
    let mut samples = vec![Samples::default(); relays.len()];
    for iteration in 0..iterations {
        for k in 0..relays.len() {
            let index = (iteration + k) % relays.len();
            let (Some(relay), Some(process), Some(slot)) = (
                relays.get(index),
                running.get(index),
                samples.get_mut(index),
            ) else {
                continue;
            };
            let target = process.as_ref().map_or(receiver.port(), |p| p.listen_port);
            receiver.discard_stray();
            match one_iteration(target, &receiver, stream, layout.device_state_offset, &tail) {
                Ok((latency, from_start)) => {
                    slot.latency_us.push(latency * 1e6);
                    slot.from_tail_start_us.push(from_start * 1e6);
                    slot.rounds.push(iteration);
                }
                Err(e) => {
                    eprintln!(
                        "migbench: switchover {} iteration {iteration}: {e}",
                        relay.name
                    );
                    slot.errors.push(e);
                }
            }
        }
    }
    for process in running.into_iter().flatten() {
        // A relay run under valgrind writes its profile on a clean exit.
        process.stop_gracefully(STOP_GRACE);
    }
    let relays = relays
        .iter()
        .zip(samples)
        .map(|(relay, samples)| RelayLatency {
            relay: relay.clone(),
            latency_us: summarize(&samples.latency_us),
            from_tail_start: summarize(&samples.from_tail_start_us),
            samples_us: samples.latency_us,
            from_tail_start_us: samples.from_tail_start_us,
            rounds: samples.rounds,
            errors: samples.errors,
        })
        .collect();
    Ok(Report {
        stream: stream.to_path_buf(),
        stream_bytes: layout.total_len,
        device_state_offset: layout.device_state_offset,
        device_state_bytes: layout.tail_len(),
        vcpus: layout.vcpus,
        iterations,
        warmup,
        relays,
    })
}
