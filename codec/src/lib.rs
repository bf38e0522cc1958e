#![forbid(unsafe_code)]
//! Exact, streaming, byte-transparent codec for the QEMU main migration channel.
//!
//! Two layers:
//! - pure per-record parsers over byte slices, one module per record family, each returning
//!   "need more bytes", the parsed record, or an error located inside the record (`record`):
//!   `configuration` (the configuration record, resumable), `command` (`QEMU_VM_COMMAND` and the
//!   one [`MigCommand`] list), `section` (section headers and footers), `ram` (RAM records and the
//!   MEM_SIZE block list), `bitmap` (dirty-bitmap chunks), `block` (block migration), and for the
//!   held device phase `candidates` (where it may end, a few checks per read), `device_phase` (the
//!   walk with the description, cpreg arrays, re-encoding) and `json` (the description text);
//! - one state machine ([`StreamDecoder`], see `decoder` for its diagram) implementing
//!   `tokio_util::codec::Decoder`, which owns the `BytesMut` discipline: payloads of RAM pages are
//!   cut from the read buffer as they arrive, everything else is emitted as whole records, and the
//!   device-state phase is held until the description arrives (DESIGN.md, "Device state is
//!   delimited exactly, never by scanning").
//!
//! `wire` holds QEMU's constants (record types, command numbers, RAM flags, the stream and
//! multifd magic numbers); `limits` the budgets; `error` the one error type; `offline` a blocking
//! driver for files and pipes. The codec knows nothing about sockets or runtimes, so it can be
//! fuzzed and used offline.
//!
//! # For connection code
//!
//! - Write `Frame::Verbatim` and `Frame::Payload` bytes to the destination as they come (they are
//!   slices of the read buffer; vectored writes avoid any copy). Only `Frame::DeviceState` needs
//!   encoding: optionally `set_cpregs` per vCPU, then `encode` into a `BytesMut` of `wire_len()`.
//! - `awaiting_description()` is true from the first device (FULL) section until the description
//!   has verified: the decoder cannot know where EOF is before then (FULL sections carry no
//!   length). Arm the description deadline while it is true; `description_error()` says why the
//!   last description-looking bytes did not verify, if any did.
//! - Where the phase ends: a connection that forwards the device state unchanged calls
//!   `set_checking_relay(true)` (a guest-forged ending then cannot stop the migration: more bytes
//!   continue the phase, released later as `RecordKind::DevicePhaseContinued`); a connection that
//!   rewrites should give the source's reference description (`set_reference_description`), which
//!   makes the ending exact (`DeviceState::is_confirmed`). DESIGN.md, "How the end of the phase is
//!   recognised", argues both.
//! - After the device state (precopy) or the final EOF (postcopy), `is_done()` is true; unless
//!   the checking relay is waiting to see whether an unconfirmed ending was real, any further byte
//!   is `DecodeError::TrailingData`. `decode_eof` reports truncation, a missing
//!   description (`MissingDescription`) or the description's own error.
//! - A postcopy `MIG_CMD_PACKAGED` comes as one `Verbatim` frame holding the command and the whole
//!   blob (bounded by `Limits::max_packaged`); its device state is not delimited (no description).
//! - The held device phase is bounded by `max_device_state + max_description`; vCPUs, registers,
//!   rewrite output and iterable sections by the other `Limits` fields. `work()` counts what the
//!   decoder did (bytes scanned, descriptions tried, configuration elements), for tests that hold
//!   it to constant work per received byte.

mod bitmap;
mod block;
mod candidates;
mod command;
mod configuration;
mod decoder;
mod description_cache;
mod device_phase;
mod encoder;
mod error;
mod frame;
mod json;
mod limits;
pub mod offline;
mod package;
mod ram;
mod reader;
mod record;
mod reference;
mod section;
#[cfg(feature = "testing")]
pub mod testing;
mod walk_plan;
pub mod wire;

pub use command::command_name;
pub use decoder::{DecodeWork, StreamDecoder};
pub use description_cache::DescriptionCache;
pub use device_phase::{CpuRegisters, CpuSubsection, DeviceSection, DeviceState};
pub use encoder::StreamEncoder;
pub use error::{DecodeError, SectionRef};
pub use frame::{Frame, MigCommand, RecordKind, StreamInfo};
pub use limits::Limits;
pub use package::{PackageDeviceState, PackageEnding, PING_PACKAGED_LOADED};
pub use reference::{LayoutMismatch, ReferenceDescription};
