//! `set_coalesce_ram_records`: runs of page records come as one frame. Held against the decoder
//! without it on every real stream, whole and cut into random reads: the same bytes, the same
//! page records, and a damaged stream fails with the same error at the same offset after the
//! same bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use bytes::BytesMut;
use common::Rng;
use migproxy_codec::wire::*;
use migproxy_codec::{DecodeError, Frame, Limits, RecordKind, StreamDecoder, StreamEncoder};
use tokio_util::codec::{Decoder, Encoder};

/// What one decode produced: the bytes in order, the page records seen (as single records or
/// inside runs), the frames, and the error that ended it, if any.
#[derive(Debug, Default)]
struct Outcome {
    bytes: Vec<u8>,
    page_records: u64,
    frames: u64,
    error: Option<String>,
}

fn is_page_record(flags: u64) -> bool {
    matches!(
        flags & !RAM_SAVE_FLAG_CONTINUE,
        RAM_SAVE_FLAG_ZERO
            | RAM_SAVE_FLAG_PAGE
            | RAM_SAVE_FLAG_XBZRLE
            | RAM_SAVE_FLAG_COMPRESS_PAGE
    )
}

fn decode(input: &[u8], coalesce: bool, mut chunk_len: impl FnMut() -> usize) -> Outcome {
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_coalesce_ram_records(coalesce);
    let mut outcome = Outcome::default();
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut pos = 0;
    let take = |outcome: &mut Outcome, frame: Frame, out: &mut BytesMut| {
        outcome.frames += 1;
        match &frame {
            Frame::Verbatim {
                kind: RecordKind::RamRecord { flags },
                ..
            } if is_page_record(*flags) => outcome.page_records += 1,
            Frame::Verbatim {
                kind: RecordKind::RamRecords { records },
                ..
            } => {
                assert!(coalesce, "a run without coalescing");
                outcome.page_records += records;
            }
            _ => {}
        }
        StreamEncoder.encode(frame, out).unwrap();
    };
    let result: Result<(), DecodeError> = (|| {
        while pos < input.len() {
            let n = chunk_len().clamp(1, input.len() - pos);
            buf.extend_from_slice(&input[pos..pos + n]);
            pos += n;
            while let Some(frame) = decoder.decode(&mut buf)? {
                take(&mut outcome, frame, &mut out);
            }
        }
        while let Some(frame) = decoder.decode_eof(&mut buf)? {
            take(&mut outcome, frame, &mut out);
        }
        Ok(())
    })();
    outcome.error = result.err().map(|e| e.to_string());
    outcome.bytes = out.to_vec();
    outcome
}

fn vectors() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut found: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                bytes,
            )
        })
        .collect();
    found.sort();
    assert!(found.len() >= 10, "vectors missing in {}", dir.display());
    found
}

/// Both decoders on `input`, whole and in random reads (including reads that end inside
/// headers and payloads): everything but the frame count must agree.
fn assert_same(name: &str, input: &[u8]) -> (Outcome, Outcome) {
    let plain = decode(input, false, || usize::MAX);
    let runs = decode(input, true, || usize::MAX);
    assert_eq!(plain.error, runs.error, "{name}: whole");
    assert!(plain.bytes == runs.bytes, "{name}: whole: bytes differ");
    assert_eq!(plain.page_records, runs.page_records, "{name}: whole");
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let max = [7, 100, 4_200, 70_000][usize::try_from(seed % 4).unwrap()];
        let cut = decode(input, true, || 1 + rng.below(max));
        assert_eq!(plain.error, cut.error, "{name}: seed {seed}");
        assert!(
            plain.bytes == cut.bytes,
            "{name}: seed {seed}: bytes differ"
        );
        assert_eq!(plain.page_records, cut.page_records, "{name}: seed {seed}");
    }
    (plain, runs)
}

#[test]
fn every_real_stream_gives_the_same_bytes_and_records_in_fewer_frames() {
    for (name, stream) in vectors() {
        let (plain, runs) = assert_same(&name, &stream);
        assert_eq!(plain.error, None, "{name}");
        assert!(plain.bytes == stream, "{name}: not byte for byte");
        // Each page record was a frame for its header, one for a payload; now a run of them
        // is one.
        if plain.page_records > 100 {
            assert!(
                runs.frames + plain.page_records / 2 < plain.frames,
                "{name}: {} frames coalesced, {} without",
                runs.frames,
                plain.frames
            );
        }
    }
}

/// Offsets and lengths of the page record heads of `stream` (decoded without coalescing).
fn page_heads(stream: &[u8]) -> Vec<(usize, u64, usize)> {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = BytesMut::from(stream);
    let mut offset = 0;
    let mut heads = Vec::new();
    while let Some(frame) = decoder.decode_eof(&mut buf).unwrap() {
        if let Frame::Verbatim {
            kind: RecordKind::RamRecord { flags },
            bytes,
            ..
        } = &frame
        {
            if is_page_record(*flags) {
                heads.push((offset, *flags, bytes.len()));
            }
        }
        offset += frame.wire_len();
    }
    heads
}

#[test]
fn a_damaged_record_inside_a_run_fails_where_it_fails_without_runs() {
    let stream = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/q72-a64fx.bin"),
    )
    .unwrap();
    let heads = page_heads(&stream);
    assert!(heads.len() > 100);
    // Records in the middle of the RAM phase, so that good records precede them in a run.
    let pick = |want: &dyn Fn(u64) -> bool| {
        heads
            .iter()
            .skip(heads.len() / 2)
            .find(|&&(_, flags, _)| want(flags))
            .copied()
            .expect("such a record")
    };
    let mut damaged = Vec::new();
    // A page offset past the end of its block.
    let (at, _, _) = pick(&|_| true);
    let mut outside = stream.clone();
    outside[at] = 0x7f;
    damaged.push(("page offset", outside));
    // A zero page whose fill byte is not 0.
    let (at, _, len) = pick(&|flags| flags & !RAM_SAVE_FLAG_CONTINUE == RAM_SAVE_FLAG_ZERO);
    let mut fill = stream.clone();
    fill[at + len - 1] = 0x5a;
    damaged.push(("zero fill", fill));
    // Flags that are no RAM record at all.
    let (at, _, _) = pick(&|_| true);
    let mut flags = stream.clone();
    flags[at + 7] |= 0x80;
    damaged.push(("flags", flags));
    // A block name the MEM_SIZE list does not have.
    if let Some(&(at, _, _)) = heads
        .iter()
        .skip(1)
        .find(|&&(_, flags, _)| flags & RAM_SAVE_FLAG_CONTINUE == 0)
    {
        let mut name = stream.clone();
        name[at + 9] ^= 0x20;
        damaged.push(("block name", name));
    }
    for (what, input) in damaged {
        let (plain, _) = assert_same(what, &input);
        let error = plain.error.expect("the damage is found");
        assert!(error.contains("byte "), "{what}: {error}");
    }
}

#[test]
fn a_run_stops_at_records_that_are_not_pages() {
    use migproxy_codec::testing::{RamRecord, StreamBuilder};
    let mut builder = StreamBuilder::new("virt-7.2");
    builder.ram_start(1 << 20);
    builder.ram_section(
        false,
        &[
            RamRecord::Page(vec![1; 4096]),
            RamRecord::Zero,
            RamRecord::Page(vec![2; 4096]),
            RamRecord::MultifdFlush,
            RamRecord::Zero,
            RamRecord::Zero,
        ],
    );
    builder.ram_section(true, &[RamRecord::Page(vec![3; 4096])]);
    builder.cpu(0, &[(0x6030_0000_0013_c080, 0x30d0_0980)], 0x11);
    let stream = builder.finish();
    let (plain, runs) = assert_same("built", &stream);
    assert_eq!(plain.error, None);
    assert_eq!(plain.page_records, 6);
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_coalesce_ram_records(true);
    let mut buf = BytesMut::from(&stream[..]);
    let mut kinds = Vec::new();
    while let Some(frame) = decoder.decode_eof(&mut buf).unwrap() {
        if let Frame::Verbatim { kind, .. } = frame {
            match kind {
                RecordKind::RamRecords { records } => kinds.push(format!("run {records}")),
                RecordKind::RamRecord { flags } => kinds.push(format!("record 0x{flags:x}")),
                _ => {}
            }
        }
    }
    // MEM_SIZE and EOS of the START section; the first run ends at MULTIFD_FLUSH, the second at
    // EOS; a footer and a section header lie between the second and the third.
    assert_eq!(
        kinds,
        [
            "record 0x4",
            "record 0x10",
            "run 3",
            "record 0x200",
            "run 2",
            "record 0x10",
            "run 1",
            "record 0x10"
        ],
        "{}",
        runs.frames
    );
}
