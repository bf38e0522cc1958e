//! Instructions a relay executes per GiB relayed: a measure that, unlike seconds, barely
//! moves when other work shares the machine, so a regression shows on a noisy host.
//!
//! Each relay is started under an instruction counter twice: once idle (started, asked to
//! exit, no connection: start-up and shut-down cost) and once relaying the stream. The
//! difference, scaled to a GiB, is what relaying costs. The counter is `perf stat -e
//! instructions:u` where the CPU exposes it (many VMs do not), otherwise valgrind's
//! cachegrind with the cache simulation off. Both count user-space instructions only: the
//! kernel's copies and TCP work are not in the figure (the relay CPU seconds of the
//! throughput run carry them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::relay_process::RelaySpec;
use crate::sender::Sender;
use crate::stats::{summarize, Summary};
use crate::throughput::{Setup, TRANSFER_TIMEOUT};
use crate::{BenchError, GIB};

/// valgrind starts a Rust binary in seconds natively; on a loaded 2-core host much slower.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
/// A relay under valgrind drains and writes its counts after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Counter {
    /// `perf stat -e instructions:u` when the CPU counter works, else cachegrind.
    Auto,
    Perf,
    Cachegrind,
}

/// Whether `perf stat -e instructions:u` counts on this machine, with what it said.
pub fn probe_perf() -> (bool, String) {
    let output = Command::new("perf")
        .args(["stat", "-x,", "-e", "instructions:u", "--", "true"])
        .output();
    match output {
        Err(e) => (false, format!("perf not runnable: {e}")),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let line = text
                .lines()
                .find(|l| l.contains("instructions"))
                .unwrap_or("")
                .trim()
                .to_string();
            let counted = parse_perf_line(&line).is_some_and(|n| n > 0);
            (
                counted,
                if line.is_empty() {
                    text.trim().to_string()
                } else {
                    line
                },
            )
        }
    }
}

/// The count of a `perf stat -x,` line (`12345,,instructions:u,...`); None for
/// `<not supported>` or `<not counted>`.
fn parse_perf_line(line: &str) -> Option<u64> {
    line.split(',').next()?.trim().parse().ok()
}

/// The total of a cachegrind output file (`summary: 12345`).
fn parse_cachegrind(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

impl Counter {
    /// The counter this run uses (auto resolved), and the perf probe's answer.
    pub fn resolve(self) -> (Counter, String) {
        let (perf_works, said) = probe_perf();
        let chosen = match self {
            Counter::Auto if perf_works => Counter::Perf,
            Counter::Auto => Counter::Cachegrind,
            other => other,
        };
        (chosen, said)
    }

    fn wrap(self, command: &[String], counts: &Path) -> Vec<String> {
        let counts = counts.display().to_string();
        let mut argv: Vec<String> = match self {
            Counter::Perf | Counter::Auto => [
                "perf",
                "stat",
                "-x,",
                "-e",
                "instructions:u",
                "-o",
                counts.as_str(),
                "--",
            ]
            .map(String::from)
            .to_vec(),
            Counter::Cachegrind => vec![
                "valgrind".into(),
                "--tool=cachegrind".into(),
                "--cache-sim=no".into(),
                format!("--cachegrind-out-file={counts}"),
                "--".into(),
            ],
        };
        argv.extend(command.iter().cloned());
        argv
    }

    fn read(self, counts: &Path) -> Result<u64, String> {
        let text = std::fs::read_to_string(counts)
            .map_err(|e| format!("no counts in {}: {e}", counts.display()))?;
        let count = match self {
            Counter::Cachegrind => parse_cachegrind(&text),
            Counter::Perf | Counter::Auto => text
                .lines()
                .find(|l| l.contains("instructions"))
                .and_then(parse_perf_line),
        };
        count.ok_or_else(|| format!("{}: no instruction count in it", counts.display()))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayInstructions {
    pub relay: RelaySpec,
    /// Start-up and shut-down without a connection.
    pub idle: Vec<u64>,
    /// Start-up, one relayed stream, shut-down.
    pub loaded: Vec<u64>,
    /// (loaded - median idle) per GiB of stream, one per repetition.
    pub per_gib: Vec<f64>,
    pub per_gib_summary: Summary,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub stream: PathBuf,
    pub stream_bytes: u64,
    pub counter: Counter,
    /// What `perf stat -e instructions:u` said here (why it was or was not used).
    pub perf_probe: String,
    pub reps: usize,
    pub relays: Vec<RelayInstructions>,
}

/// One counted life of the relay: started, optionally relaying the stream once, SIGTERM.
fn count_once(
    relay: &RelaySpec,
    counter: Counter,
    setup: &Setup,
    counts: &Path,
    relay_stream: bool,
) -> Result<u64, BenchError> {
    let failed = |reason: String| BenchError::Transfer {
        relay: relay.name.clone(),
        reason,
    };
    let command = relay
        .command
        .as_ref()
        .ok_or_else(|| BenchError::Usage("`direct` has no relay process to count".into()))?;
    let counted = RelaySpec {
        name: format!("{}-instructions", relay.name),
        command: Some(counter.wrap(command, counts)),
    };
    let _ = std::fs::remove_file(counts);
    setup.receiver.discard_stray();
    let running = counted
        .start_within(setup.receiver.port(), setup.log_dir, STARTUP_TIMEOUT)?
        .ok_or_else(|| failed("no relay process".into()))?;
    if relay_stream {
        let mut sender = Sender::connect(running.listen_port, setup.stream).map_err(failed)?;
        sender.send_range(0, setup.stream_bytes).map_err(failed)?;
        sender.shutdown_write().map_err(failed)?;
        let connection = setup
            .receiver
            .next_connection(TRANSFER_TIMEOUT)
            .map_err(failed)?;
        connection
            .wait_finished(TRANSFER_TIMEOUT)
            .map_err(failed)?
            .ok_or_else(|| failed("the destination received nothing".into()))?;
        sender.finish(Duration::from_secs(60)).map_err(failed)?;
        setup.check_received(connection.bytes()).map_err(failed)?;
    }
    // The exit status is not checked: a relay without a SIGTERM handler (tokio-relay)
    // dies of the signal, and valgrind or perf still write the counts.
    running.terminate(EXIT_TIMEOUT)?;
    counter.read(counts).map_err(failed)
}

fn median_u64(values: &[u64]) -> Option<f64> {
    let as_f64: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    let s = summarize(&as_f64);
    (s.n > 0).then_some(s.median)
}

pub fn run(
    stream: &Path,
    reps: usize,
    counter: Counter,
    relays: &[RelaySpec],
    log_dir: &Path,
) -> Result<Report, BenchError> {
    let (counter, perf_probe) = counter.resolve();
    let setup = Setup::new(stream, log_dir)?;
    let gib = setup.stream_bytes as f64 / GIB;
    let mut results = Vec::new();
    for relay in relays {
        let counts = log_dir.join(format!("{}.instructions", relay.name));
        let (mut idle, mut loaded, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps.max(1) {
            for relay_stream in [false, true] {
                let what = if relay_stream { "relaying" } else { "idle" };
                eprintln!(
                    "migbench: instructions {} {what} rep {}/{reps}",
                    relay.name,
                    rep + 1
                );
                match count_once(relay, counter, &setup, &counts, relay_stream) {
                    Ok(n) if relay_stream => loaded.push(n),
                    Ok(n) => idle.push(n),
                    Err(e) => {
                        eprintln!("migbench:   failed: {e}");
                        errors.push(e.to_string());
                    }
                }
            }
        }
        let per_gib: Vec<f64> = match median_u64(&idle) {
            Some(idle_median) if gib > 0.0 => loaded
                .iter()
                .map(|&n| (n as f64 - idle_median) / gib)
                .collect(),
            _ => Vec::new(),
        };
        eprintln!("migbench:   {} instructions/GiB {:?}", relay.name, per_gib);
        results.push(RelayInstructions {
            relay: relay.clone(),
            per_gib_summary: summarize(&per_gib),
            idle,
            loaded,
            per_gib,
            errors,
        });
    }
    Ok(Report {
        stream: stream.to_path_buf(),
        stream_bytes: setup.stream_bytes,
        counter,
        perf_probe,
        reps: reps.max(1),
        relays: results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_outputs_parse() {
        assert_eq!(
            parse_perf_line("123456,,instructions:u,1000,100.00,,"),
            Some(123_456)
        );
        assert_eq!(
            parse_perf_line("<not supported>,,instructions:u,0,100.00,,"),
            None
        );
        let cachegrind = "desc: I1 cache:\ncmd: relay\nevents: Ir\nfl=x\n1 2\nsummary: 987654321\n";
        assert_eq!(parse_cachegrind(cachegrind), Some(987_654_321));
        assert_eq!(parse_cachegrind("events: Ir\n"), None);
    }
}
