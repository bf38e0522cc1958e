#![forbid(unsafe_code)]
//! `migproxy`: a live-migration proxy that repairs ARM64 cpreg lists between QEMU builds.
//!
//! This file only parses the command line and maps outcomes to exit codes; every
//! subcommand lives in its own module.

mod addr;
mod admin;
mod classify;
mod cli;
mod conn;
mod error;
mod healthcheck;
mod http_client;
mod inspect;
mod listener;
mod main_channel;
mod metrics;
mod migration;
mod plan;
mod policy_args;
mod profile_cmd;
mod profile_source;
mod relay;
mod rewrite_cmd;
mod run;
mod shutdown;
mod subsection_rules;
mod tls;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, ProfileCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::main(&args),
        Command::Profile(ProfileCommand::Capture(args)) => profile_cmd::capture(&args),
        Command::Plan(args) => plan::main(&args),
        Command::Rewrite(args) => rewrite_cmd::main(&args),
        Command::Run(args) => run::main(*args),
        Command::Healthcheck(args) => healthcheck::main(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("migproxy: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
