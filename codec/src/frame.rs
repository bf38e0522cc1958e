//! The items the decoder yields.

use bytes::Bytes;

pub use crate::command::MigCommand;
use crate::device_phase::DeviceState;

/// What the decoder learnt about the stream so far.
#[derive(Debug, Clone, Default)]
pub struct StreamInfo {
    /// Machine type from the configuration record (e.g. `virt-7.2`).
    pub machine: Option<String>,
    /// Target page size, from `configuration/target-page-bits`.
    pub page_size: Option<u64>,
    /// Validated capabilities from `configuration/capabilities`.
    pub capabilities: Vec<String>,
    /// `MIG_CMD_OPEN_RETURN_PATH` seen.
    pub return_path: bool,
    /// Any `MIG_CMD_POSTCOPY_ADVISE` seen.
    pub postcopy_advised: bool,
}

/// One decoded item.
pub enum Frame {
    /// Bytes forwarded unchanged: one whole record, or the head of a record whose payload follows as Payload.
    Verbatim {
        kind: RecordKind,
        section_id: Option<u32>,
        bytes: Bytes,
    },
    /// A piece of a page (or block-migration) payload cut from the read buffer; may be partial.
    Payload { section_id: u32, bytes: Bytes },
    /// The whole held device-state phase (FULL sections, EOF, description), walked and verified.
    /// Boxed: it comes once per migration, while every page record's frame is moved a few times
    /// on its way to the write queue; inline it would make each of those moves 200 bytes.
    DeviceState(Box<DeviceState>),
}

impl std::fmt::Debug for Frame {
    // Payload bytes are guest data: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::Verbatim {
                kind,
                section_id,
                bytes,
            } => f
                .debug_struct("Verbatim")
                .field("kind", kind)
                .field("section_id", section_id)
                .field("len", &bytes.len())
                .finish(),
            Frame::Payload { section_id, bytes } => f
                .debug_struct("Payload")
                .field("section_id", section_id)
                .field("len", &bytes.len())
                .finish(),
            Frame::DeviceState(state) => f.debug_tuple("DeviceState").field(state).finish(),
        }
    }
}

impl Frame {
    /// Number of bytes this frame occupies on the wire when encoded.
    pub fn wire_len(&self) -> usize {
        match self {
            Frame::Verbatim { bytes, .. } | Frame::Payload { bytes, .. } => bytes.len(),
            Frame::DeviceState(state) => state.wire_len(),
        }
    }
}

/// What a `Verbatim` frame holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordKind {
    FileHeader,
    Configuration,
    Command(MigCommand),
    SectionStart {
        idstr: String,
        instance: u32,
        version: u32,
    },
    SectionPart,
    SectionEnd,
    RamRecord {
        flags: u64,
    },
    /// `records` consecutive page records, headers and payloads, the last payload possibly in
    /// part (its rest follows as `Payload`): only with `StreamDecoder::set_coalesce_ram_records`.
    RamRecords {
        records: u64,
    },
    IterableChunk,
    SectionFooter,
    Eof,
    /// Checking relay only: the rest of a device phase whose earlier ending proved false, released
    /// once a later description verified the whole phase (`StreamDecoder::set_checking_relay`).
    DevicePhaseContinued,
    /// Only outside the held phase; nothing emits it today.
    SectionFull {
        idstr: String,
        instance: u32,
        version: u32,
    },
}
