//! Block-migration section records (QEMU <= 9.0 migration/block.c).
//!
//! ```text
//! be64 sector<<9 | flags, then with DEVICE_BLOCK: counted device name and, unless ZERO_BLOCK,
//! exactly BLK_MIG_BLOCK_SIZE payload bytes; PROGRESS and EOS records are the be64 alone.
//! ```

use crate::reader::Reader;
use crate::record::{Parsed, RecordError};
use crate::wire::*;

/// One parsed block-migration record header.
#[derive(Debug)]
pub(crate) struct BlockRecord {
    /// Header bytes.
    pub(crate) head: usize,
    /// Payload bytes that follow the header.
    pub(crate) payload: usize,
    /// The record carries EOS: the section footer follows (after the payload).
    pub(crate) eos: bool,
}

/// Parse one record header; `buf` starts at its be64.
pub(crate) fn parse_record(buf: &[u8]) -> Parsed<BlockRecord> {
    let mut r = Reader::new(buf);
    let Some(header) = r.be64() else {
        return Ok(None);
    };
    // flags = addr & (BDRV_SECTOR_SIZE - 1)
    let flags = header & ((1u64 << BDRV_SECTOR_BITS) - 1);
    let eos = flags & BLK_MIG_FLAG_EOS != 0;
    if flags & BLK_MIG_FLAG_DEVICE_BLOCK != 0 {
        if r.counted().is_none() {
            return Ok(None);
        }
        let payload = if flags & BLK_MIG_FLAG_ZERO_BLOCK != 0 {
            0
        } else {
            BLK_MIG_BLOCK_SIZE
        };
        return Ok(Some(BlockRecord {
            head: r.pos(),
            payload,
            eos,
        }));
    }
    if flags & BLK_MIG_FLAG_PROGRESS == 0 && !eos {
        return Err(RecordError::invalid(
            0,
            "a block migration flag (DEVICE_BLOCK, EOS, PROGRESS)",
            format!("flags 0x{flags:x}"),
        ));
    }
    Ok(Some(BlockRecord {
        head: 8,
        payload: 0,
        eos,
    }))
}
