//! Cut real captured streams into small fuzz seeds for the raw `decode` target: for each
//! `VECTOR.bin` given, `VECTOR-head` (its first KiB: header, configuration, commands, the RAM
//! block list, the first pages) and `VECTOR-tail` (everything up to the end of the first RAM
//! section's START record, an END record for that section, then the stream from its device phase
//! to its end, or its postcopy package and EOF). The tail seed is a complete stream the decoder accepts, a few
//! dozen KiB instead of the capture's hundreds.
//!
//! Each seed starts with the `decode` target's control byte (`0x00`: rewriting decoder, no chosen
//! read sizes: the stream arrives in one piece).
//!
//! `cargo run -p migproxy-codec --example capture_seeds -- OUT_DIR VECTOR.bin...`

use bytes::BytesMut;
use migproxy_codec::wire::{
    QEMU_VM_EOF, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER, RAM_SAVE_FLAG_EOS,
};
use migproxy_codec::{Frame, Limits, MigCommand, RecordKind, StreamDecoder};
use tokio_util::codec::Decoder;

/// Bytes of a capture's head seed.
const HEAD: usize = 1024;

/// Where the first iterable section's START record ends (its footer included) and its id, and
/// where the device phase or postcopy package begins (and, for a package, ends).
struct Cuts {
    start_end: usize,
    ram_id: u32,
    tail_start: usize,
    package_end: Option<usize>,
}

fn cuts(stream: &[u8]) -> Result<Cuts, String> {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = BytesMut::from(stream);
    let mut offset = 0usize;
    let mut start_end = None;
    loop {
        let frame = decoder
            .decode_eof(&mut buf)
            .map_err(|e| format!("does not decode: {e}"))?
            .ok_or("no device phase or package")?;
        let len = frame.wire_len();
        match &frame {
            Frame::Verbatim {
                kind: RecordKind::SectionFooter,
                section_id: Some(id),
                ..
            } if start_end.is_none() => start_end = Some((offset + len, *id)),
            Frame::DeviceState(_)
            | Frame::Verbatim {
                kind: RecordKind::Command(MigCommand::Packaged { .. }),
                ..
            } => {
                let (start_end, ram_id) = start_end.ok_or("no section before the device phase")?;
                let package = matches!(frame, Frame::Verbatim { .. });
                return Ok(Cuts {
                    start_end,
                    ram_id,
                    tail_start: offset,
                    package_end: package.then_some(offset + len),
                });
            }
            _ => {}
        }
        offset += len;
    }
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .ok_or("usage: capture_seeds OUT_DIR VECTOR.bin...")?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{out}: {e}"))?;
    for path in args {
        let stream = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
        let name = std::path::Path::new(&path)
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{path}: no file name"))?
            .to_string();
        let mut head = vec![0u8];
        head.extend_from_slice(&stream[..stream.len().min(HEAD)]);
        std::fs::write(format!("{out}/{name}-head"), head).map_err(|e| e.to_string())?;
        let cuts = match cuts(&stream) {
            Ok(cuts) => cuts,
            Err(err) => {
                eprintln!("{path}: no tail seed: {err}");
                continue;
            }
        };
        let mut tail = vec![0u8];
        tail.extend_from_slice(&stream[..cuts.start_end]);
        tail.push(QEMU_VM_SECTION_END);
        tail.extend_from_slice(&cuts.ram_id.to_be_bytes());
        tail.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        tail.push(QEMU_VM_SECTION_FOOTER);
        tail.extend_from_slice(&cuts.ram_id.to_be_bytes());
        match cuts.package_end {
            // The postcopy RAM after a package is left out: the stream ends with EOF.
            Some(end) => {
                tail.extend_from_slice(&stream[cuts.tail_start..end]);
                tail.push(QEMU_VM_EOF);
            }
            None => tail.extend_from_slice(&stream[cuts.tail_start..]),
        }
        println!(
            "{name}: head {} bytes, tail {} bytes",
            HEAD.min(stream.len()),
            tail.len() - 1
        );
        std::fs::write(format!("{out}/{name}-tail"), tail).map_err(|e| e.to_string())?;
    }
    Ok(())
}
