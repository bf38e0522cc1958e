//! `DecodeError`: every way a stream can fail to decode, located.

use std::fmt;

/// A section as named in error messages: `section 6 "cpu"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionRef {
    pub id: u32,
    pub idstr: Option<String>,
}

impl fmt::Display for SectionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.idstr {
            Some(name) => write!(f, "section {} \"{}\"", self.id, name),
            None => write!(f, "section {}", self.id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("at byte {offset}: {message}")]
    Malformed { offset: u64, message: String },
    #[error("at byte {offset}: expected {expected}, found {found}")]
    Unexpected {
        offset: u64,
        expected: String,
        found: String,
    },
    #[error("at byte {offset} in {section}: expected {expected}, found {found}")]
    InSection {
        offset: u64,
        section: SectionRef,
        expected: String,
        found: String,
    },
    #[error("at byte {offset}: {what} of {len} bytes exceeds the limit of {limit} bytes")]
    LimitExceeded {
        offset: u64,
        what: String,
        len: u64,
        limit: usize,
    },
    #[error("at byte {offset}: {what} before the first section end (early_setup device); such streams cannot be delimited and are refused")]
    EarlySetupDevice { offset: u64, what: String },
    #[error("at byte {offset}: {found} inside the device-state phase (only full sections, eof and the description may follow the first full section)")]
    UnexpectedInDevicePhase { offset: u64, found: String },
    #[error("at byte {offset}: stream ended after eof without a description (suppress-vmdesc?); device sections cannot be delimited")]
    MissingDescription { offset: u64 },
    #[error("at byte {offset}: stream truncated while reading {expected}")]
    Truncated { offset: u64, expected: String },
    #[error("at byte {offset}: description: {message}")]
    Description { offset: u64, message: String },
    #[error("at byte {offset} in {section}: {message}")]
    DeviceState {
        offset: u64,
        section: SectionRef,
        message: String,
    },
    #[error("cpu instance {instance}: {message}")]
    CpuRegisters { instance: u32, message: String },
    #[error("at byte {offset}: data after the end of the stream")]
    TrailingData { offset: u64 },
    /// Required by `tokio_util::codec::Decoder` (Framed reports socket errors through it).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
