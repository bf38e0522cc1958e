//! Synthetic streams: rewriting cpreg arrays, corrupted input, and a property-based round trip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{decode_all, decode_chunked, Rng};
use migproxy_codec::testing::{RamRecord, StreamBuilder};
use migproxy_codec::wire::*;
use migproxy_codec::{DecodeError, Frame, Limits};
use proptest::prelude::*;

fn regs(n: u64, salt: u64) -> Vec<(u64, u64)> {
    (0..n)
        .map(|i| (0x6030_0000_0013_0000 + i * 8, i.wrapping_mul(salt)))
        .collect()
}

/// A small precopy stream: RAM START/PART/END, devices, two vCPUs, description.
fn sample() -> Vec<u8> {
    let mut b = StreamBuilder::new("virt-7.2");
    b.ram_start(1 << 20)
        .ram_section(
            false,
            &[
                RamRecord::Page(vec![0x7e, 0, 0, 0, 1, 4]),
                RamRecord::Zero,
                RamRecord::Xbzrle(vec![1, 2, 3]),
                RamRecord::Compressed(vec![0x78, 0x9c, 1]),
                RamRecord::MultifdFlush,
            ],
        )
        .ram_section(true, &[RamRecord::Page(b"}{\x00\x06".to_vec())]);
    b.device("timer", 0, &[0u8; 24], None);
    b.cpu(0, &regs(20, 3), 0x11);
    b.cpu(1, &regs(20, 5), 0x22);
    b.device(
        "arm_gic",
        0,
        b"\x00\x06\x00\x00\x00\x02{}",
        Some(("sub", b"}")),
    );
    b.finish()
}

#[test]
fn sample_round_trips_in_every_chunking() {
    let input = sample();
    let (out, decoder) = decode_all(&input).unwrap();
    assert!(decoder.is_done());
    assert_eq!(out, input);
    let (out, _) = decode_chunked(&input, Limits::default(), || 1, |_| {}).unwrap();
    assert_eq!(out, input);
}

#[test]
fn device_state_lists_sections_and_cpus() {
    let input = sample();
    let mut seen = false;
    decode_chunked(
        &input,
        Limits::default(),
        || 7,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                let names: Vec<_> = state.sections().iter().map(|s| s.idstr.as_str()).collect();
                assert_eq!(
                    names,
                    ["timer", "cpu_common", "cpu", "cpu_common", "cpu", "arm_gic"]
                );
                let cpus = state.cpus();
                assert_eq!(cpus.len(), 2);
                assert_eq!(cpus[1].instance, 1);
                assert_eq!(cpus[1].section_version, 22);
                assert_eq!(cpus[1].registers, regs(20, 5));
                seen = true;
            }
        },
    )
    .unwrap();
    assert!(seen);
}

#[test]
fn set_cpregs_rewrites_the_section_and_the_description_only() {
    let input = sample();
    let new_regs = regs(27, 9);
    let (out, _) = decode_chunked(
        &input,
        Limits::default(),
        || usize::MAX,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                state.set_cpregs(1, &new_regs).unwrap();
                assert_eq!(state.cpus()[1].registers, new_regs);
            }
        },
    )
    .unwrap();
    assert_eq!(out.len(), input.len() + 7 * 16);
    // The rewritten stream decodes, carries the new registers, and its description says 27.
    let mut checked = false;
    decode_chunked(
        &out,
        Limits::default(),
        || 3,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                let cpus = state.cpus();
                assert_eq!(cpus[0].registers, regs(20, 3));
                assert_eq!(cpus[1].registers, new_regs);
                checked = true;
            }
        },
    )
    .unwrap();
    assert!(checked);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("\"array_len\": 27").count(), 2);
    assert_eq!(text.matches("\"array_len\": 20").count(), 2);
}

#[test]
fn to_bytes_and_wire_len_match_encode_when_the_count_changes_digits() {
    let input = sample();
    // 20 -> 9 and 20 -> 100 registers change the length of the array_len text; none: as received.
    for replacement in [None, Some(regs(9, 7)), Some(regs(100, 7))] {
        let mut checked = false;
        decode_chunked(
            &input,
            Limits::default(),
            || usize::MAX,
            |frame| {
                if let Frame::DeviceState(state) = frame {
                    if let Some(new_regs) = &replacement {
                        state.set_cpregs(0, new_regs).unwrap();
                    }
                    let mut encoded = bytes::BytesMut::new();
                    state.encode(&mut encoded);
                    assert_eq!(state.to_bytes(), encoded.freeze());
                    assert_eq!(state.wire_len(), state.to_bytes().len());
                    checked = true;
                }
            },
        )
        .unwrap();
        assert!(checked);
    }
}

#[test]
fn set_cpregs_refuses_unsorted_ids_and_unknown_instances() {
    let input = sample();
    decode_chunked(
        &input,
        Limits::default(),
        || usize::MAX,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                let err = state.set_cpregs(0, &[(2, 0), (1, 0)]).unwrap_err();
                assert!(matches!(err, DecodeError::CpuRegisters { instance: 0, .. }));
                let err = state.set_cpregs(7, &[]).unwrap_err();
                assert!(matches!(err, DecodeError::CpuRegisters { instance: 7, .. }));
            }
        },
    )
    .unwrap();
}

#[test]
fn every_truncation_is_a_specific_error() {
    let input = sample();
    for len in 0..input.len() {
        let err = decode_all(&input[..len]).expect_err("a strict prefix must not decode");
        assert!(
            matches!(
                err,
                DecodeError::Truncated { .. }
                    | DecodeError::MissingDescription { .. }
                    // The arm_gic payload ends with bytes that look like EOF + a description:
                    // a prefix ending there reports why they did not verify.
                    | DecodeError::DeviceState { .. }
                    | DecodeError::Description { .. }
                    | DecodeError::UnexpectedInDevicePhase { .. }
            ),
            "prefix {len}: {err}"
        );
    }
}

/// Offset of the first byte equal to `tag` at or after `from`, located by the builder's layout.
fn header_len(machine: &str) -> usize {
    // magic, version, 07, be32 len, name, subsection (1 + 1 + 30 + 4 + 4)
    8 + 1 + 4 + machine.len() + 40
}

#[test]
fn flipped_type_bytes_are_named() {
    let input = sample();
    let start = header_len("virt-7.2");
    assert_eq!(input[start], QEMU_VM_SECTION_START);
    let mut bad = input.clone();
    bad[start] = 0x42;
    let err = error_of(&bad);
    assert!(
        matches!(&err, DecodeError::Unexpected { found, .. } if found.contains("0x42")),
        "{err}"
    );
    // The MEM_SIZE record header: flip it to an unknown flag combination.
    let mut bad = input.clone();
    let mem_size = start + 1 + 4 + 4 + 8;
    bad[mem_size + 7] = 0x06; // ZERO|MEM_SIZE
    let err = error_of(&bad);
    assert!(matches!(err, DecodeError::InSection { .. }), "{err}");
    assert!(err.to_string().contains("\"ram\""), "{err}");
    // The magic.
    let mut bad = input.clone();
    bad[0] = b'X';
    assert!(matches!(
        error_of(&bad),
        DecodeError::Unexpected { offset: 0, .. }
    ));
}

#[test]
fn corrupt_footer_is_reported_with_its_section() {
    let input = sample();
    let start = header_len("virt-7.2");
    // START ram: header 17, MEM_SIZE 8 + 14 + 8, EOS 8, then the footer.
    let footer = start + 17 + 8 + 14 + 8 + 8;
    assert_eq!(input[footer], QEMU_VM_SECTION_FOOTER);
    let mut bad = input.clone();
    bad[footer + 4] ^= 1;
    let err = error_of(&bad);
    assert!(matches!(err, DecodeError::InSection { .. }), "{err}");
    assert!(err.to_string().contains("section footer"), "{err}");
}

#[test]
fn lengths_past_limits_are_refused_before_buffering() {
    let mut b = StreamBuilder::new("virt-7.2");
    b.command(MIG_CMD_PACKAGED, &u32::MAX.to_be_bytes());
    let input = b.into_bytes();
    let err = error_of(&input);
    assert!(matches!(err, DecodeError::LimitExceeded { .. }), "{err}");

    let input = sample();
    let limits = Limits {
        max_device_state: 100,
        max_description: 100,
        ..Limits::default()
    };
    let err = chunked_error(&input, limits, 64);
    assert!(matches!(err, DecodeError::LimitExceeded { .. }), "{err}");

    let limits = Limits {
        max_record: 16,
        ..Limits::default()
    };
    let err = chunked_error(&input, limits, 1);
    assert!(matches!(err, DecodeError::LimitExceeded { .. }), "{err}");

    // Each budget on its own: a device state over max_device_state is refused even when the
    // description's budget would leave room for it in the held phase.
    let limits = Limits {
        max_device_state: 100,
        ..Limits::default()
    };
    let err = chunked_error(&input, limits, 64);
    assert!(
        err.to_string()
            .contains("device-state phase (full sections and eof) of"),
        "{err}"
    );
}

#[test]
fn missing_description_is_reported_at_end_of_input() {
    let mut b = StreamBuilder::new("virt-7.2");
    b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
    b.cpu(0, &regs(4, 1), 0);
    let input = b.finish_without_description();
    let decoder_awaiting;
    let err = {
        let mut decoder = migproxy_codec::StreamDecoder::new(Limits::default());
        let mut buf = bytes::BytesMut::from(&input[..]);
        use tokio_util::codec::Decoder;
        while decoder.decode(&mut buf).unwrap().is_some() {}
        decoder_awaiting = decoder.awaiting_description();
        decoder.decode_eof(&mut buf).unwrap_err()
    };
    assert!(decoder_awaiting);
    assert!(
        matches!(err, DecodeError::MissingDescription { .. }),
        "{err}"
    );
}

#[test]
fn full_section_before_the_first_end_is_refused() {
    let mut b = StreamBuilder::new("virt-10.0");
    b.device("virtio-mem", 0, &[1, 2, 3], None);
    b.ram_start(1 << 20).ram_section(true, &[]);
    let err = error_of(&b.finish());
    assert!(matches!(err, DecodeError::EarlySetupDevice { .. }), "{err}");
    assert!(err.to_string().contains("virtio-mem"), "{err}");
}

/// Position of `needle` in the description at the end of `input` (tests only; the codec never
/// searches stream bytes).
fn find_in_description(input: &[u8], needle: &str) -> usize {
    let start = input.len() - 10_000.min(input.len());
    let pos = input[start..]
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap();
    start + pos
}

fn chunked_error(input: &[u8], limits: Limits, chunk: usize) -> DecodeError {
    match decode_chunked(input, limits, || chunk, |_| {}) {
        Ok(_) => panic!("the stream decoded"),
        Err(err) => err,
    }
}

/// The error decoding `input` gives (without printing the stream when it unexpectedly decodes).
fn error_of(input: &[u8]) -> DecodeError {
    match decode_all(input) {
        Ok(_) => panic!("the corrupted stream decoded"),
        Err(err) => err,
    }
}

#[test]
fn broken_descriptions_are_specific_errors() {
    let input = sample();
    // A wrong field size: the walk misses the footer.
    let pos = find_in_description(&input, "\"size\": 24");
    let mut bad = input.clone();
    bad[pos + 9] = b'5';
    let err = error_of(&bad);
    assert!(matches!(err, DecodeError::DeviceState { .. }), "{err}");
    assert!(err.to_string().contains("\"timer\""), "{err}");
    // Invalid JSON inside an otherwise well-formed description.
    let pos = find_in_description(&input, "\"page_size\"");
    let mut bad = input.clone();
    bad[pos + 11] = b'=';
    let err = error_of(&bad);
    assert!(matches!(err, DecodeError::Description { .. }), "{err}");
    // A description that does not list the last device.
    let mut b = StreamBuilder::new("virt-7.2");
    b.ram_start(1 << 20).ram_section(true, &[]);
    b.device("timer", 0, &[0; 8], None);
    let desc = b.description();
    b.device("extra", 0, &[0; 8], None);
    let mut stream = b.into_bytes();
    stream.push(QEMU_VM_EOF);
    stream.push(QEMU_VM_VMDESCRIPTION);
    stream.extend_from_slice(&(desc.len() as u32).to_be_bytes());
    stream.extend_from_slice(desc.as_bytes());
    let err = error_of(&stream);
    assert!(
        matches!(err, DecodeError::UnexpectedInDevicePhase { .. }),
        "{err}"
    );
}

#[test]
fn random_corruption_never_panics() {
    let input = sample();
    let mut rng = Rng(42);
    for _ in 0..3000 {
        let mut bad = input.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(bad.len());
            bad[i] = rng.next_u64() as u8;
        }
        let _ = decode_chunked(&bad, Limits::default(), || 1 + rng.below(300), |_| {});
    }
}

#[test]
fn trailing_data_after_the_description_is_refused() {
    let mut input = sample();
    input.push(0);
    // Fed whole, the description is not at the end of the buffer; the stream then ends.
    assert!(decode_all(&input).is_err());
    // Fed in pieces, the description completes first and the extra byte is trailing data.
    let n = input.len() - 1;
    let mut first = true;
    let result = decode_chunked(
        &input,
        Limits::default(),
        || {
            let len = if first { n } else { 1 };
            first = false;
            len
        },
        |_| {},
    );
    let Err(err) = result else {
        panic!("trailing data accepted")
    };
    assert!(matches!(err, DecodeError::TrailingData { .. }), "{err}");
}

#[derive(Debug, Clone)]
enum Piece {
    Device(Vec<u8>, Option<Vec<u8>>),
    Cpu(u64, u8),
}

fn ram_record() -> impl Strategy<Value = RamRecord> {
    prop_oneof![
        Just(RamRecord::Zero),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(RamRecord::Page),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(RamRecord::Xbzrle),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(RamRecord::Compressed),
        Just(RamRecord::MultifdFlush),
    ]
}

fn device_bytes() -> impl Strategy<Value = Vec<u8>> {
    // Bias towards bytes that look like structure: footers, EOF, VMDESCRIPTION, braces.
    prop::collection::vec(
        prop_oneof![
            any::<u8>(),
            Just(0x7e),
            Just(0x00),
            Just(0x06),
            Just(b'}'),
            Just(b'{')
        ],
        0..200,
    )
}

fn pieces() -> impl Strategy<Value = (Vec<Vec<RamRecord>>, Vec<Piece>)> {
    (
        prop::collection::vec(prop::collection::vec(ram_record(), 0..6), 0..4),
        prop::collection::vec(
            prop_oneof![
                (device_bytes(), prop::option::of(device_bytes()))
                    .prop_map(|(d, s)| Piece::Device(d, s)),
                (0u64..40, any::<u8>()).prop_map(|(n, fill)| Piece::Cpu(n, fill)),
            ],
            1..6,
        ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn generated_streams_round_trip((parts, devices) in pieces(), seed in any::<u64>()) {
        let mut b = StreamBuilder::new("virt-10.0");
        b.ram_start(64 << 20);
        for records in &parts {
            b.ram_section(false, records);
        }
        b.ram_section(true, &[RamRecord::Zero]);
        let mut cpus = 0;
        for (i, piece) in devices.iter().enumerate() {
            match piece {
                Piece::Device(data, sub) => {
                    b.device(&format!("dev{i}"), i as u32, data, sub.as_deref().map(|s| ("s", s)));
                }
                Piece::Cpu(n, fill) => {
                    b.cpu(cpus, &regs(*n, u64::from(*fill)), *fill);
                    cpus += 1;
                }
            }
        }
        let input = b.finish();
        let mut rng = Rng(seed | 1);
        let (out, decoder) = decode_chunked(&input, Limits::default(), || 1 + rng.below(64), |_| {})
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert!(decoder.is_done());
        prop_assert_eq!(out, input);
    }
}
