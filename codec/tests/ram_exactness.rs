//! RAM records are held to what QEMU's loader accepts, so a damaged stream fails at its own offset
//! in the proxy instead of somewhere in the destination: page records name a block of the
//! MEM_SIZE list and stay inside it, EOS and MULTIFD_FLUSH carry no address bits, zero pages
//! fill with 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{decode_all, decode_chunked};
use migproxy_codec::wire::*;
use migproxy_codec::{Frame, Limits, RecordKind};

fn vector(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Stream offsets and flags of every RAM record head in a real stream.
fn ram_records(stream: &[u8]) -> Vec<(usize, u64, usize)> {
    let mut offset = 0usize;
    let mut found = Vec::new();
    decode_chunked(
        stream,
        Limits::default(),
        || usize::MAX,
        |frame| {
            if let Frame::Verbatim {
                kind: RecordKind::RamRecord { flags },
                bytes,
                ..
            } = frame
            {
                found.push((offset, *flags, bytes.len()));
            }
            offset += frame.wire_len();
        },
    )
    .expect("the vector decodes");
    found
}

fn error_of(stream: &[u8]) -> String {
    match decode_all(stream) {
        Ok(_) => panic!("a damaged stream decoded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_page_record_naming_an_unknown_block_fails_at_its_offset() {
    let stream = vector("q72-a64fx.bin");
    let (at, _, len) = ram_records(&stream)
        .into_iter()
        .find(|&(_, flags, _)| flags == RAM_SAVE_FLAG_ZERO)
        .expect("a zero page record that names its block");
    let mut damaged = stream.clone();
    // The last letter of the block name (the fill byte follows it).
    damaged[at + len - 2] ^= 0x20;
    let err = error_of(&damaged);
    assert!(err.contains("ram block of the MEM_SIZE list"), "{err}");
    assert!(err.contains(&format!("byte {}", at + 8)), "{err}");
}

#[test]
fn a_page_offset_outside_its_block_fails() {
    let stream = vector("q72-a64fx.bin");
    let (at, _, _) = ram_records(&stream)
        .into_iter()
        .find(|&(_, flags, _)| flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE) != 0)
        .expect("a page record");
    let mut damaged = stream.clone();
    damaged[at] = 0x7f;
    let err = error_of(&damaged);
    assert!(err.contains("page offset inside its ram block"), "{err}");
    assert!(err.contains(&format!("byte {at}")), "{err}");
}

#[test]
fn an_eos_with_address_bits_fails() {
    let stream = vector("q72-a64fx.bin");
    let (at, _, _) = ram_records(&stream)
        .into_iter()
        .find(|&(_, flags, _)| flags == RAM_SAVE_FLAG_EOS)
        .expect("an EOS record");
    let mut damaged = stream.clone();
    damaged[at + 5] = 0x10;
    let err = error_of(&damaged);
    assert!(err.contains("bare 0x10 record header"), "{err}");
}

#[test]
fn a_zero_page_with_a_nonzero_fill_byte_fails() {
    let stream = vector("q72-a64fx.bin");
    let (at, _, len) = ram_records(&stream)
        .into_iter()
        .find(|&(_, flags, _)| flags & !RAM_SAVE_FLAG_CONTINUE == RAM_SAVE_FLAG_ZERO)
        .expect("a zero page record");
    let mut damaged = stream.clone();
    damaged[at + len - 1] = 0x5a;
    let err = error_of(&damaged);
    assert!(err.contains("zero page fill byte"), "{err}");
}
