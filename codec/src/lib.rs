#![forbid(unsafe_code)]
//! Exact, streaming, byte-transparent codec for the QEMU main migration channel.
//!
//! Two layers:
//! - pure per-record parsers over byte slices (`header`, `configuration`, `section`, `command`,
//!   `ram`, `iterable`, `vmdesc`, `cpu`), each returning "need more bytes" or a parsed record;
//! - one state machine ([`StreamDecoder`], see `decoder` for its diagram) implementing
//!   `tokio_util::codec::Decoder`, which owns the `BytesMut` discipline: payloads of RAM pages are
//!   cut from the read buffer as they arrive, everything else is emitted as whole records, and the
//!   device-state phase is held until the description arrives (design-decisions §1).
//!
//! The codec knows nothing about sockets or runtimes, so it can be fuzzed and used offline.

mod decoder;
mod device_phase;
mod encoder;
mod error;
mod frame;
mod json;
mod limits;
pub mod offline;
mod reader;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use decoder::StreamDecoder;
pub use device_phase::{CpuRegisters, DeviceSection, DeviceState};
pub use encoder::StreamEncoder;
pub use error::DecodeError;
pub use frame::{Frame, MigCommand, RecordKind, StreamInfo};
pub use limits::Limits;
