#![forbid(unsafe_code)]
//! `migproxy`: a live-migration proxy that repairs ARM64 cpreg lists between QEMU builds.
//!
//! This file only parses the command line and maps outcomes to exit codes; the daemon
//! lives in `daemon/` (over `migration/` and `net/`), the offline subcommands in `offline/`.

mod cli;
mod daemon;
mod error;
mod migration;
mod net;
mod offline;
mod subsection_rules;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, ProfileCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => offline::inspect::main(&args),
        Command::Profile(ProfileCommand::Capture(args)) => offline::capture::capture(&args),
        Command::Plan(args) => offline::plan::main(&args),
        Command::Rewrite(args) => offline::rewrite::main(&args),
        Command::Run(args) => daemon::serve::main(*args),
        Command::Healthcheck(args) => daemon::healthcheck::main(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("migproxy: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
