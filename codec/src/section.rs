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
///
/// A wrong tag is an error as soon as it arrives, and the error is the same however many bytes
/// of the footer have arrived (read boundaries must not change what the operator is told).
pub(crate) fn parse_footer(buf: &[u8], section: u32) -> Parsed<usize> {
    let mut r = Reader::new(buf);
    let Some(tag) = r.u8() else {
        return Ok(None);
    };
    if tag != QEMU_VM_SECTION_FOOTER {
        return Err(RecordError::invalid(
            0,
            "section footer (0x7e)",
            record_type_name(tag),
        ));
    }
    let Some(id) = r.be32() else {
        return Ok(None);
    };
    if id != section {
        return Err(RecordError::invalid(
            0,
            format!("section footer 7e {section:08x}"),
            format!("{tag:02x} {id:08x}"),
        ));
    }
    Ok(Some(r.pos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `decode_structured` fuzz target's split-read oracle: a wrong footer tag was
    /// reported as "found unknown record type 0x6d" when one byte had arrived and as
    /// "found 6d 00000000" when five had.
    #[test]
    fn a_wrong_footer_tag_reads_the_same_however_much_arrived() {
        let footer = [0x6d, 0, 0, 0, 0];
        let errors: Vec<String> = (1..=footer.len())
            .map(|n| match parse_footer(&footer[..n], 0) {
                Err(err) => format!("{err:?}"),
                Ok(parsed) => format!("no error: {parsed:?}"),
            })
            .collect();
        assert!(errors[0].contains("section footer (0x7e)"), "{}", errors[0]);
        assert!(errors.iter().all(|e| *e == errors[0]), "{errors:?}");
    }

    #[test]
    fn a_footer_of_another_section_is_refused_once_its_id_arrived() {
        let footer = [QEMU_VM_SECTION_FOOTER, 0, 0, 0, 7];
        assert!(matches!(parse_footer(&footer[..4], 3), Ok(None)));
        let err = parse_footer(&footer, 3);
        assert!(
            matches!(&err, Err(e) if format!("{e:?}").contains("7e 00000007")),
            "{err:?}"
        );
        assert!(matches!(parse_footer(&footer, 7), Ok(Some(5))));
    }
}
