//! Section headers and footers (migration/savevm.c).
//!
//! ```text
//! START / FULL  01|04 | be32 section id | counted idstr | be32 instance | be32 version
//! PART / END    02|03 | be32 section id
//! footer        7E | be32 section id
//! ```

use crate::reader::{self, Reader};
use crate::record::{Parsed, RecordError};
use crate::wire::*;

/// A START (or FULL) header.
#[derive(Debug)]
pub(crate) struct SectionHeader {
    pub(crate) id: u32,
    pub(crate) idstr: String,
    pub(crate) instance: u32,
    pub(crate) version: u32,
    pub(crate) len: usize,
}

/// Parse a START or FULL header; `buf` starts at its record byte.
pub(crate) fn parse_start(buf: &[u8]) -> Parsed<SectionHeader> {
    let mut r = Reader::at(buf, 1);
    let (Some(id), Some(idstr), Some(instance), Some(version)) =
        (r.be32(), r.counted(), r.be32(), r.be32())
    else {
        return Ok(None);
    };
    Ok(Some(SectionHeader {
        id,
        idstr: reader::name(idstr),
        instance,
        version,
        len: r.pos(),
    }))
}

/// The section id of a PART or END record (`buf` starts at its record byte).
pub(crate) fn parse_part_or_end(buf: &[u8]) -> Option<u32> {
    Reader::at(buf, 1).be32()
}

/// Check the footer of `section`; `buf` starts where the footer must be. Returns its length.
pub(crate) fn parse_footer(buf: &[u8], section: u32) -> Parsed<usize> {
    let mut r = Reader::new(buf);
    let (Some(tag), Some(id)) = (r.u8(), r.be32()) else {
        // A wrong tag is an error as soon as it arrives.
        if let Some(&tag) = buf.first() {
            if tag != QEMU_VM_SECTION_FOOTER {
                return Err(RecordError::invalid(
                    0,
                    "section footer (0x7e)",
                    record_type_name(tag),
                ));
            }
        }
        return Ok(None);
    };
    if tag != QEMU_VM_SECTION_FOOTER || id != section {
        return Err(RecordError::invalid(
            0,
            format!("section footer 7e {section:08x}"),
            format!("{tag:02x} {id:08x}"),
        ));
    }
    Ok(Some(r.pos()))
}
