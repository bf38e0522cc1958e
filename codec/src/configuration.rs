//! The `QEMU_VM_CONFIGURATION` record (migration/savevm.c `vmstate_configuration`).
//!
//! ```text
//! 07 | be32 len | machine name (len bytes) | subsections while the next byte is 05:
//!      05 | counted name | be32 version | body
//!         configuration/target-page-bits: be32 bits
//!         configuration/capabilities:     be32 count, count counted strings
//!         configuration/uuid:             16 bytes
//! ```
//!
//! The record can be as long as `Limits::max_record`, so the parser remembers how far it got:
//! each call resumes after the last complete element instead of starting again at byte 0, so the
//! work per received byte is constant however the record is split.

use crate::reader::{self, Reader};
use crate::record::{Parsed, RecordError};
use crate::wire::*;

/// The parsed configuration record.
#[derive(Debug)]
pub(crate) struct Configuration {
    pub(crate) machine: String,
    pub(crate) page_bits: u32,
    pub(crate) capabilities: Vec<String>,
    /// Bytes of the record.
    pub(crate) len: usize,
}

#[derive(Debug, Default, Clone, Copy)]
enum Stage {
    #[default]
    MachineName,
    Subsections,
    Capabilities {
        left: u32,
    },
}

/// Parse progress of one configuration record (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct ConfigurationParser {
    /// Bytes validated so far (complete elements).
    pos: usize,
    stage: Stage,
    machine: String,
    page_bits: Option<u32>,
    capabilities: Vec<String>,
    /// Elements parsed over the parser's life (for the work-per-byte tests).
    elements: u64,
}

impl ConfigurationParser {
    /// Elements (machine name, subsection headers, capabilities) parsed so far.
    pub(crate) fn elements(&self) -> u64 {
        self.elements
    }

    /// Continue on `buf` (the record's bytes from its `07`, a longer copy of what the previous
    /// call saw). Checks `max_record` against the machine name; the caller bounds the rest.
    pub(crate) fn resume(&mut self, buf: &[u8], max_record: usize) -> Parsed<Configuration> {
        loop {
            match self.stage {
                Stage::MachineName => {
                    let mut r = Reader::at(buf, 1);
                    let Some(len) = r.be32() else {
                        return Ok(None);
                    };
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    if len > max_record {
                        return Err(RecordError::TooLong {
                            pos: 1,
                            what: "machine name".into(),
                            len: len as u64,
                            limit: max_record,
                        });
                    }
                    let Some(machine) = r.bytes(len) else {
                        return Ok(None);
                    };
                    self.machine = reader::name(machine);
                    self.elements += 1;
                    self.pos = r.pos();
                    self.stage = Stage::Subsections;
                }
                Stage::Subsections => {
                    let mut r = Reader::at(buf, self.pos);
                    // One byte of look-ahead past the record tells whether it has ended.
                    match r.u8() {
                        None => return Ok(None),
                        Some(QEMU_VM_SUBSECTION) => {}
                        Some(_) => return Ok(Some(self.finish())),
                    }
                    let (Some(name), Some(_version)) = (r.counted(), r.be32()) else {
                        return Ok(None);
                    };
                    match name {
                        n if n == CONFIGURATION_TARGET_PAGE_BITS.as_bytes() => {
                            let Some(bits) = r.be32() else {
                                return Ok(None);
                            };
                            if !(ARM_TARGET_PAGE_BITS_MIN..=30).contains(&bits) {
                                return Err(RecordError::invalid(
                                    r.pos() - 4,
                                    "target page bits between 10 and 30",
                                    bits.to_string(),
                                ));
                            }
                            self.page_bits = Some(bits);
                        }
                        n if n == CONFIGURATION_CAPABILITIES.as_bytes() => {
                            let Some(count) = r.be32() else {
                                return Ok(None);
                            };
                            self.stage = Stage::Capabilities { left: count };
                        }
                        n if n == CONFIGURATION_UUID.as_bytes() => {
                            if r.bytes(16).is_none() {
                                return Ok(None);
                            }
                        }
                        _ => {
                            return Err(RecordError::invalid(
                                self.pos,
                                "a known configuration subsection",
                                format!("\"{}\"", reader::name(name)),
                            ))
                        }
                    }
                    self.pos = r.pos();
                    self.elements += 1;
                }
                Stage::Capabilities { mut left } => {
                    let mut r = Reader::at(buf, self.pos);
                    while left > 0 {
                        let Some(cap) = r.counted() else {
                            self.stage = Stage::Capabilities { left };
                            return Ok(None);
                        };
                        self.capabilities.push(reader::name(cap));
                        self.elements += 1;
                        self.pos = r.pos();
                        left -= 1;
                    }
                    self.stage = Stage::Subsections;
                }
            }
        }
    }

    fn finish(&mut self) -> Configuration {
        let elements = self.elements;
        let done = std::mem::take(self);
        self.elements = elements;
        Configuration {
            machine: done.machine,
            page_bits: done.page_bits.unwrap_or(ARM_TARGET_PAGE_BITS_MIN),
            capabilities: done.capabilities,
            len: done.pos,
        }
    }
}
