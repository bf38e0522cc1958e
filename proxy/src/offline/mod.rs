//! The offline subcommands over saved streams and profiles: `inspect`, `plan`, `rewrite` and
//! `profile capture`.

pub mod capture;
pub mod inspect;
pub mod plan;
pub mod rewrite;
