#![forbid(unsafe_code)]
//! `migbench`: replays a captured QEMU migration stream through relays on loopback and
//! writes the measurements as JSON (see `scripts/bench.sh` for the full run).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use migproxy_bench::instructions::{self, Counter};
use migproxy_bench::relay_process::RelaySpec;
use migproxy_bench::{multifd, scale, stream_layout, switchover, throughput, BenchError};

#[derive(Debug, Parser)]
#[command(name = "migbench", about = "Benchmark migration relays on loopback")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// A captured migration stream (`migrate "exec:cat > FILE"`).
    #[arg(long)]
    stream: PathBuf,
    /// `direct`, or `NAME=COMMAND ARGS` with `{listen}`/`{upstream}` port placeholders; repeatable.
    #[arg(long = "relay", required = true)]
    relays: Vec<RelaySpec>,
    /// Where relay logs go.
    #[arg(long, default_value = "migbench-logs")]
    log_dir: PathBuf,
    /// Write the JSON result here (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Whole-stream throughput, relay CPU per GiB and peak RSS; relays alternate.
    Throughput {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Uncounted runs per relay before the counted ones.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// Added latency of the device-state tail (switchover).
    Switchover {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        iterations: usize,
        /// Uncounted iterations per relay before the counted ones.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
    },
    /// Concurrent migrations through one relay process.
    Scale {
        #[command(flatten)]
        common: Common,
        /// Concurrency levels, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        concurrency: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Uncounted runs per relay and concurrency before the counted ones.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// User-space instructions per GiB relayed, under `perf stat` or valgrind's cachegrind.
    Instructions {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1)]
        reps: usize,
        #[arg(long, value_enum, default_value_t = Counter::Auto)]
        counter: Counter,
    },
    /// A main channel plus N multifd channels of bulk data: relay CPU per GiB and throughput
    /// (e.g. `migproxy run --raw-relay copy` against `--raw-relay splice`); relays rotate.
    MultifdRelay {
        #[command(flatten)]
        common: Common,
        /// Where the multifd channels' bytes come from (default: the stream itself).
        #[arg(long)]
        payload: Option<PathBuf>,
        #[arg(long, default_value_t = 4)]
        channels: u8,
        /// Bulk bytes per multifd channel, in MiB.
        #[arg(long, default_value_t = 1024)]
        channel_mib: u64,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Uncounted runs per relay before the counted ones.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// Print where the device-state phase of a stream starts.
    Layout { stream: PathBuf },
}

fn write_json(out: Option<&Path>, value: &impl serde::Serialize) -> Result<(), BenchError> {
    let text = serde_json::to_string_pretty(value)?;
    match out {
        Some(path) => std::fs::write(path, text + "\n")
            .map_err(BenchError::io(format!("write {}", path.display()))),
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

fn run(cli: Cli) -> Result<(), BenchError> {
    match cli.command {
        Command::Throughput {
            common,
            reps,
            warmup,
        } => {
            let report = throughput::run(
                &common.stream,
                reps,
                warmup,
                &common.relays,
                &common.log_dir,
            )?;
            write_json(common.out.as_deref(), &report)
        }
        Command::Switchover {
            common,
            iterations,
            warmup,
        } => {
            let report = switchover::run(
                &common.stream,
                iterations,
                warmup,
                &common.relays,
                &common.log_dir,
            )?;
            write_json(common.out.as_deref(), &report)
        }
        Command::Scale {
            common,
            concurrency,
            reps,
            warmup,
        } => {
            let report = scale::run(
                &common.stream,
                &concurrency,
                reps,
                warmup,
                &common.relays,
                &common.log_dir,
            )?;
            write_json(common.out.as_deref(), &report)
        }
        Command::Instructions {
            common,
            reps,
            counter,
        } => {
            let report = instructions::run(
                &common.stream,
                reps,
                counter,
                &common.relays,
                &common.log_dir,
            )?;
            write_json(common.out.as_deref(), &report)
        }
        Command::MultifdRelay {
            common,
            payload,
            channels,
            channel_mib,
            reps,
            warmup,
        } => {
            let plan = multifd::Plan {
                stream: &common.stream,
                payload: payload.as_deref().unwrap_or(&common.stream),
                channels,
                channel_bytes: channel_mib.saturating_mul(1 << 20),
                log_dir: &common.log_dir,
                warmup,
            };
            let report = multifd::run(&plan, reps, &common.relays)?;
            write_json(common.out.as_deref(), &report)
        }
        Command::Layout { stream } => {
            let layout = stream_layout::layout_of_file(&stream)?;
            println!(
                "{{\"total_len\": {}, \"device_state_offset\": {}, \"device_state_bytes\": {}, \"vcpus\": {}}}",
                layout.total_len,
                layout.device_state_offset,
                layout.tail_len(),
                layout.vcpus
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migbench: {e}");
            ExitCode::FAILURE
        }
    }
}
