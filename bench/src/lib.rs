#![forbid(unsafe_code)]
//! Benchmark harness for migproxy.
//!
//! The driver (`migbench`) replays a captured QEMU migration stream from a sender to a
//! discarding receiver on loopback, either directly or through a relay process it starts
//! (socat, HAProxy, the `tokio-relay` baseline of this crate, or `migproxy run`), and
//! measures what an operator pays for the relay: throughput, CPU seconds of the relay
//! process per GiB, its peak RSS, the extra time the device-state tail needs to arrive
//! (added switchover latency), how this scales with concurrent migrations, and what the raw
//! multifd channels cost (`multifd.rs`).

pub mod delay_line;
pub mod error;
pub mod instructions;
pub mod multifd;
pub mod procfs;
pub mod receiver;
pub mod relay_process;
pub mod rounds;
pub mod scale;
pub mod sender;
pub mod stats;
pub mod stream_layout;
pub mod switchover;
pub mod throughput;

pub use error::BenchError;

/// Bytes in a GiB, for the per-GiB figures.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
