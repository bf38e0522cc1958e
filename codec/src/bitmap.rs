//! Dirty-bitmap section chunks (migration/block-dirty-bitmap.c).
//!
//! ```text
//! u8 flags | [counted device name] | [counted bitmap name] | then one of:
//!   START     be32 granularity | u8 bitmap flags   (be32, despite QEMU's format comment)
//!   COMPLETE  nothing
//!   BITS      be64 first sector | be32 sector count | [be64 size | size bytes unless ZEROES]
//! ```

use crate::reader::Reader;
use crate::record::{Parsed, RecordError};
use crate::wire::*;

/// One parsed chunk.
#[derive(Debug)]
pub(crate) struct BitmapChunk {
    pub(crate) len: usize,
    /// The chunk carries EOS: the section footer follows.
    pub(crate) eos: bool,
}

/// Parse one chunk; `buf` starts at its flags byte. A BITS buffer is bounded by `max_chunk`.
pub(crate) fn parse_chunk(buf: &[u8], max_chunk: usize) -> Parsed<BitmapChunk> {
    let mut r = Reader::new(buf);
    let Some(flags) = r.u8() else {
        return Ok(None);
    };
    if flags & DIRTY_BITMAP_MIG_EXTRA_FLAGS_8 != 0 {
        return Err(RecordError::invalid(
            0,
            "single-byte dirty-bitmap flags",
            format!("flags 0x{flags:02x} (extra flag bytes are never sent by qemu 7.2/10.0)"),
        ));
    }
    if flags & DIRTY_BITMAP_MIG_FLAG_DEVICE_NAME != 0 && r.counted().is_none() {
        return Ok(None);
    }
    if flags & DIRTY_BITMAP_MIG_FLAG_BITMAP_NAME != 0 && r.counted().is_none() {
        return Ok(None);
    }
    if flags & DIRTY_BITMAP_MIG_FLAG_START != 0 {
        if r.be32().is_none() || r.u8().is_none() {
            return Ok(None);
        }
    } else if flags & DIRTY_BITMAP_MIG_FLAG_COMPLETE != 0 {
    } else if flags & DIRTY_BITMAP_MIG_FLAG_BITS != 0 {
        let (Some(_first), Some(_count)) = (r.be64(), r.be32()) else {
            return Ok(None);
        };
        if flags & DIRTY_BITMAP_MIG_FLAG_ZEROES == 0 {
            let Some(size) = r.be64() else {
                return Ok(None);
            };
            let size_usize = usize::try_from(size).unwrap_or(usize::MAX);
            if size_usize > max_chunk {
                return Err(RecordError::TooLong {
                    pos: r.pos() - 8,
                    what: "dirty-bitmap chunk".into(),
                    len: size,
                    limit: max_chunk,
                });
            }
            if r.bytes(size_usize).is_none() {
                return Ok(None);
            }
        }
    }
    Ok(Some(BitmapChunk {
        len: r.pos(),
        eos: flags & DIRTY_BITMAP_MIG_FLAG_EOS != 0,
    }))
}
