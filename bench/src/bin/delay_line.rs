#![forbid(unsafe_code)]
//! `delay-line`: forwards the packets read from standard input to standard output a fixed delay
//! later (see `migproxy_bench::delay_line`). Both are TUN devices its launcher opened
//! (`bench/tools/two_host.py delay-line`); the counters go to `--stats` once a second.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use migproxy_bench::delay_line::{self, DelayLineConfig, DelayLineStats};
use migproxy_bench::BenchError;

#[derive(Debug, Parser)]
#[command(
    name = "delay-line",
    about = "Forward packets from stdin to stdout after a fixed delay"
)]
struct Cli {
    /// Added to every packet, microseconds.
    #[arg(long)]
    delay_us: u64,
    /// Spin (instead of sleeping) this long before each deadline, microseconds.
    #[arg(long, default_value_t = 10)]
    spin_us: u64,
    /// Packets held at most; arrivals beyond it are dropped and counted.
    #[arg(long, default_value_t = 4096)]
    queue_packets: usize,
    /// Where the counters (JSON) are rewritten once a second.
    #[arg(long)]
    stats: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delay-line: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), BenchError> {
    let input = File::from(
        std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(BenchError::io("standard input"))?,
    );
    let output = File::from(
        std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(BenchError::io("standard output"))?,
    );
    let config = DelayLineConfig {
        delay: Duration::from_micros(cli.delay_us),
        spin: Duration::from_micros(cli.spin_us),
        queue_packets: cli.queue_packets,
    };
    let stats = Arc::new(DelayLineStats::default());
    let reporter_stats = Arc::clone(&stats);
    let path = cli.stats.clone();
    let delay = config.delay;
    // The reporter lives as long as the process: the line runs until it is stopped.
    thread::Builder::new()
        .name("delay-line-stats".into())
        .spawn(move || loop {
            if let Err(e) = write_stats(&path, &reporter_stats, delay) {
                eprintln!("delay-line: {e}");
            }
            thread::sleep(Duration::from_secs(1));
        })
        .map_err(BenchError::io("starting the stats writer"))?;
    delay_line::run(input, output, &config, &stats)?;
    write_stats(&cli.stats, &stats, delay)
}

/// Written to a temporary name and renamed, so a reader never sees half a file.
fn write_stats(path: &Path, stats: &DelayLineStats, delay: Duration) -> Result<(), BenchError> {
    let partial = path.with_extension("partial");
    let mut file = File::create(&partial)
        .map_err(BenchError::io(format!("creating {}", partial.display())))?;
    serde_json::to_writer(&mut file, &stats.report(delay))?;
    file.flush()
        .map_err(BenchError::io(format!("writing {}", partial.display())))?;
    std::fs::rename(&partial, path)
        .map_err(BenchError::io(format!("renaming to {}", path.display())))
}
