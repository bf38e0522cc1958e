//! RAM section records (migration/ram.c): the record header and the MEM_SIZE block list.
//!
//! ```text
//! be64 offset|flags (flags = the bits below the target page size), then per flag:
//!   ZERO           [counted block name unless CONTINUE] | fill byte (0)
//!   PAGE           [counted block name unless CONTINUE] | page_size bytes   (payload)
//!   XBZRLE         [counted block name unless CONTINUE] | 01 | be16 len | len bytes
//!   COMPRESS_PAGE  [counted block name unless CONTINUE] | be32 len | len bytes (<= compressBound)
//!   MEM_SIZE       total RAM in the offset bits; block entries until their lengths add up:
//!                  counted name | be64 used_length [| be64 mr addr with x-ignore-shared]
//!   EOS, MULTIFD_FLUSH  the bare flag
//! ```
//!
//! Page records are held to what QEMU's loader accepts ("Unknown ramblock", "Illegal RAM
//! offset"), so a damaged stream fails here at its own offset rather than in the destination.

use std::collections::HashMap;

use crate::reader::{self, Reader};
use crate::record::{Parsed, RecordError};
use crate::wire::*;

/// What the decoder knows that a RAM record is checked against.
pub(crate) struct RamContext<'a> {
    pub(crate) page_size: u64,
    /// The MEM_SIZE list: block idstr -> used_length.
    pub(crate) blocks: &'a HashMap<Vec<u8>, u64>,
    /// used_length of the block the last page record named (CONTINUE records refer to it).
    pub(crate) current_block_len: Option<u64>,
    pub(crate) mapped_ram: bool,
}

/// One parsed RAM record header.
#[derive(Debug)]
pub(crate) enum RamRecord {
    /// ZERO, PAGE, XBZRLE or COMPRESS_PAGE: `head` bytes of header, then `payload` bytes.
    Page {
        flags: u64,
        head: usize,
        payload: usize,
        block_len: u64,
    },
    /// MEM_SIZE with `total` bytes of RAM; the block list follows (none when 0).
    MemSize {
        flags: u64,
        total: u64,
    },
    MultifdFlush {
        flags: u64,
    },
    Eos {
        flags: u64,
    },
}

/// Parse one RAM record header; `buf` starts at its be64.
pub(crate) fn parse_record(buf: &[u8], ctx: &RamContext<'_>) -> Parsed<RamRecord> {
    let mut r = Reader::new(buf);
    let Some(header) = r.be64() else {
        return Ok(None);
    };
    // QEMU: flags = addr & ~TARGET_PAGE_MASK.
    let flags = header & (ctx.page_size - 1);
    let kind = flags & !RAM_SAVE_FLAG_CONTINUE;
    match kind {
        RAM_SAVE_FLAG_ZERO
        | RAM_SAVE_FLAG_PAGE
        | RAM_SAVE_FLAG_XBZRLE
        | RAM_SAVE_FLAG_COMPRESS_PAGE => {
            let block_len = if flags & RAM_SAVE_FLAG_CONTINUE == 0 {
                let Some(name) = r.counted() else {
                    return Ok(None);
                };
                match ctx.blocks.get(name) {
                    Some(&len) => len,
                    None => {
                        return Err(RecordError::invalid(
                            8,
                            "a ram block of the MEM_SIZE list",
                            format!("{:?}", reader::name(name)),
                        ))
                    }
                }
            } else {
                match ctx.current_block_len {
                    Some(len) => len,
                    None => {
                        return Err(RecordError::invalid(
                            0,
                            "a ram block name before the first CONTINUE record",
                            format!("flags 0x{flags:x}"),
                        ))
                    }
                }
            };
            let page_offset = header & !(ctx.page_size - 1);
            if page_offset
                .checked_add(ctx.page_size)
                .is_none_or(|end| end > block_len)
            {
                return Err(RecordError::invalid(
                    0,
                    format!("a page offset inside its ram block of {block_len} bytes"),
                    format!("0x{page_offset:x}"),
                ));
            }
            let payload = match kind {
                RAM_SAVE_FLAG_ZERO => {
                    let Some(fill) = r.u8() else {
                        return Ok(None);
                    };
                    // Both senders write 0; QEMU 10.0's loader refuses anything else.
                    if fill != 0 {
                        return Err(RecordError::invalid(
                            r.pos() - 1,
                            "a zero page fill byte 0x00",
                            format!("0x{fill:02x}"),
                        ));
                    }
                    0
                }
                // Page bits are at most 30 (checked in the configuration).
                RAM_SAVE_FLAG_PAGE => usize::try_from(ctx.page_size).unwrap_or(usize::MAX),
                RAM_SAVE_FLAG_XBZRLE => {
                    let (Some(encoding), Some(len)) = (r.u8(), r.be16()) else {
                        return Ok(None);
                    };
                    if encoding != ENCODING_FLAG_XBZRLE {
                        return Err(RecordError::invalid(
                            r.pos() - 3,
                            "xbzrle encoding flag 0x01",
                            format!("0x{encoding:02x}"),
                        ));
                    }
                    if u64::from(len) > ctx.page_size {
                        return Err(RecordError::invalid(
                            r.pos() - 2,
                            "an xbzrle length up to the page size",
                            len.to_string(),
                        ));
                    }
                    usize::from(len)
                }
                _ => {
                    let Some(len) = r.be32() else {
                        return Ok(None);
                    };
                    // QEMU refuses more than compressBound(TARGET_PAGE_SIZE).
                    let bound = compress_bound(ctx.page_size);
                    if u64::from(len) > bound {
                        return Err(RecordError::invalid(
                            r.pos() - 4,
                            format!("a compressed page of at most {bound} bytes"),
                            len.to_string(),
                        ));
                    }
                    usize::try_from(len).unwrap_or(usize::MAX)
                }
            };
            Ok(Some(RamRecord::Page {
                flags,
                head: r.pos(),
                payload,
                block_len,
            }))
        }
        RAM_SAVE_FLAG_MEM_SIZE => {
            if ctx.mapped_ram {
                return Err(RecordError::invalid(
                    0,
                    "a sequential stream",
                    "the mapped-ram capability (file: migrations only)".into(),
                ));
            }
            Ok(Some(RamRecord::MemSize {
                flags,
                total: header & !(ctx.page_size - 1),
            }))
        }
        // QEMU writes these two as the bare flag: address bits mean a misaligned stream.
        RAM_SAVE_FLAG_MULTIFD_FLUSH | RAM_SAVE_FLAG_EOS if header != kind => {
            Err(RecordError::invalid(
                0,
                format!("a bare 0x{kind:x} record header"),
                format!("0x{header:016x}"),
            ))
        }
        RAM_SAVE_FLAG_MULTIFD_FLUSH => Ok(Some(RamRecord::MultifdFlush { flags })),
        RAM_SAVE_FLAG_EOS => Ok(Some(RamRecord::Eos { flags })),
        _ => Err(RecordError::invalid(
            0,
            "a ram record flag (ZERO, MEM_SIZE, PAGE, EOS, XBZRLE, COMPRESS_PAGE, MULTIFD_FLUSH)",
            if flags & RAM_SAVE_FLAG_HOOK != 0 {
                format!("flags 0x{flags:x} (RAM_SAVE_FLAG_HOOK: rdma is not supported)")
            } else {
                format!("flags 0x{flags:x}")
            },
        )),
    }
}

/// One entry of the MEM_SIZE block list.
pub(crate) struct BlockEntry<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) used_length: u64,
    /// Position after the entry.
    pub(crate) end: usize,
}

/// Parse the block entry at `pos` of a MEM_SIZE record that still has `remaining` bytes of RAM
/// to account for.
pub(crate) fn parse_block_entry<'a>(
    buf: &'a [u8],
    pos: usize,
    remaining: u64,
    ignore_shared: bool,
) -> Parsed<BlockEntry<'a>> {
    let mut r = Reader::at(buf, pos);
    let (Some(name), Some(used_length)) = (r.counted(), r.be64()) else {
        return Ok(None);
    };
    let length_pos = r.pos() - 8;
    if ignore_shared && r.be64().is_none() {
        return Ok(None);
    }
    if used_length > remaining {
        return Err(RecordError::invalid(
            length_pos,
            format!("a block length within the remaining {remaining} bytes of MEM_SIZE"),
            used_length.to_string(),
        ));
    }
    Ok(Some(BlockEntry {
        name,
        used_length,
        end: r.pos(),
    }))
}

/// Per-block page sizes are written for hugepage blocks only, and the stream does not say which:
/// with a postcopy advise summary of mixed page sizes the block list cannot be parsed exactly.
pub(crate) fn check_advise_summary(summary: Option<u64>) -> Result<(), RecordError> {
    match summary {
        Some(summary) if summary.count_ones() > 1 => Err(RecordError::invalid(
            0,
            "a single page size in the postcopy advise summary",
            format!("ram_pagesize_summary 0x{summary:x} (mixed page sizes)"),
        )),
        _ => Ok(()),
    }
}

/// zlib's compressBound(), which QEMU uses to bound a COMPRESS_PAGE record.
fn compress_bound(len: u64) -> u64 {
    len + (len >> 12) + (len >> 14) + (len >> 25) + 13
}
