//! The offline subcommands over saved streams and profiles: `inspect`, `plan`, `rewrite` and
//! `profile capture`, over one loader (`input.rs`), one progress line and one QMP client.

pub mod capture;
pub mod input;
pub mod inspect;
pub mod plan;
pub mod progress;
pub mod qmp;
pub mod report;
pub mod rewrite;
