//! Hostile input on the codec directly: each test reproduces an attack from docs/hostile-input.md
//! and checks the defence (work done, not wall time, where the attack is about CPU).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use common::decode_chunked;
use migproxy_codec::testing::{RamRecord, StreamBuilder};
use migproxy_codec::wire::*;
use migproxy_codec::{
    DecodeError, Frame, Limits, RecordKind, ReferenceDescription, StreamDecoder, StreamEncoder,
};
use tokio_util::codec::{Decoder, Encoder};

fn regs(n: u64) -> Vec<(u64, u64)> {
    (0..n).map(|i| (0x6030_0000_0013_0000 + i * 8, i)).collect()
}

/// What a guest writes into its own registers so that they look like the end of the device
/// phase: the first section's footer, EOF, VMDESCRIPTION and a description that names only that
/// section, with one field that reaches exactly to the forged footer.
fn forged_ending(first_idstr: &str, guest_offset: usize) -> Vec<u8> {
    let json = format!(
        "{{\"page_size\": 4096, \"devices\": [{{\"name\": \"{first_idstr}\", \"instance_id\": 0, \"vmsd_name\": \"{first_idstr}\", \"version\": 1, \"fields\": [{{\"name\": \"data\", \"type\": \"buffer\", \"size\": {guest_offset}}}]}}]}}"
    );
    let mut forged = vec![QEMU_VM_SECTION_FOOTER, 0, 0, 0, 1];
    forged.extend_from_slice(&[QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]);
    forged.extend_from_slice(&(json.len() as u32).to_be_bytes());
    forged.extend_from_slice(json.as_bytes());
    forged
}

/// A stream whose first device section (id 1, "guestregs") holds a forged ending at byte 16 of
/// its payload; returns the stream, the stream offset where the forged description ends, and
/// the real description.
fn stream_with_forged_ending() -> (Vec<u8>, usize, String) {
    let mut b = StreamBuilder::new("virt-10.0");
    b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
    let guest_offset = 16;
    let mut payload = vec![0x5a; guest_offset];
    payload.extend_from_slice(&forged_ending("guestregs", guest_offset));
    payload.extend_from_slice(&[0x5a; 40]);
    let prefix_len = {
        let mut probe = StreamBuilder::new("virt-10.0");
        probe
            .ram_start(1 << 20)
            .ram_section(true, &[RamRecord::Zero]);
        probe.into_bytes().len()
    };
    b.device("guestregs", 0, &payload, None);
    b.cpu(0, &regs(8), 1);
    b.cpu(1, &regs(8), 2);
    let description = b.description();
    let stream = b.finish();
    // FULL 04, be32 id, counted "guestregs" (1 + 9), be32 instance, be32 version.
    let payload_start = prefix_len + 1 + 4 + 10 + 4 + 4;
    let forged_end = payload_start + guest_offset + forged_ending("guestregs", guest_offset).len();
    (stream, forged_end, description)
}

/// Feed `input` so that one read ends exactly at `boundary`, the rest in 4 KiB reads.
fn decode_with_boundary(
    mut decoder: StreamDecoder,
    input: &[u8],
    boundary: usize,
    mut on_frame: impl FnMut(&mut Frame),
) -> Result<(Vec<u8>, StreamDecoder), DecodeError> {
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut pos = 0;
    while pos < input.len() {
        let end = if pos < boundary {
            boundary
        } else {
            (pos + 4096).min(input.len())
        };
        buf.extend_from_slice(&input[pos..end]);
        pos = end;
        while let Some(mut frame) = decoder.decode(&mut buf)? {
            on_frame(&mut frame);
            StreamEncoder.encode(frame, &mut out).unwrap();
        }
    }
    while let Some(mut frame) = decoder.decode_eof(&mut buf)? {
        on_frame(&mut frame);
        StreamEncoder.encode(frame, &mut out).unwrap();
    }
    Ok((out.to_vec(), decoder))
}

#[test]
fn the_forged_ending_verifies_where_the_guest_put_it() {
    // The attack as filed: with the decoder of a rewriting connection and no reference, the
    // forged ending is taken and the real bytes after it fail the migration.
    let (input, forged_end, _) = stream_with_forged_ending();
    let result = decode_with_boundary(
        StreamDecoder::new(Limits::default()),
        &input,
        forged_end,
        |_| {},
    );
    let Err(err) = result else {
        panic!("the forged ending was not taken: the reproduction is broken")
    };
    assert!(matches!(err, DecodeError::TrailingData { .. }), "{err}");
}

#[test]
fn a_checking_relay_forwards_the_whole_stream_past_a_forged_ending() {
    let (input, forged_end, _) = stream_with_forged_ending();
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_checking_relay(true);
    let mut kinds = Vec::new();
    let (out, decoder) = decode_with_boundary(decoder, &input, forged_end, |frame| match frame {
        Frame::DeviceState(state) => {
            assert!(!state.is_confirmed());
            kinds.push("device-state");
        }
        Frame::Verbatim {
            kind: RecordKind::DevicePhaseContinued,
            ..
        } => kinds.push("continued"),
        _ => {}
    })
    .unwrap();
    assert_eq!(out, input, "the relay changed or lost bytes");
    assert!(decoder.is_done());
    // The false ending was released, then the rest once the real description verified the
    // whole phase.
    assert_eq!(kinds, ["device-state", "continued"]);
}

#[test]
fn a_checking_relay_still_refuses_a_phase_that_never_verifies() {
    let (mut input, forged_end, _) = stream_with_forged_ending();
    // Damage the real description: the false ending was released, the rest never is.
    let last = input.len() - 1;
    input[last] = b' ';
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_checking_relay(true);
    let mut released = 0;
    let err = decode_with_boundary(decoder, &input, forged_end, |frame| {
        released += frame.wire_len();
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::MissingDescription { .. } | DecodeError::Description { .. }
        ),
        "{err}"
    );
    assert!(
        released <= forged_end,
        "bytes past the false ending were released"
    );
}

#[test]
fn a_reference_description_makes_the_ending_exact() {
    let (input, forged_end, description) = stream_with_forged_ending();
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_reference_description(ReferenceDescription::parse(description.as_bytes()).unwrap());
    let mut states = 0;
    let (out, decoder) = decode_with_boundary(decoder, &input, forged_end, |frame| {
        if let Frame::DeviceState(state) = frame {
            states += 1;
            assert!(state.is_confirmed());
            assert_eq!(state.cpus().len(), 2);
            // A rewrite on a confirmed ending is safe.
            state.set_cpregs(0, &regs(4)).unwrap();
        }
    })
    .unwrap();
    assert_eq!(states, 1, "one device state, at the real ending");
    assert!(decoder.is_done());
    assert!(out.len() < input.len(), "the rewrite did not apply");
}

#[test]
fn a_description_unlike_the_reference_is_refused_by_name() {
    let (input, _, _) = stream_with_forged_ending();
    let mut other = StreamBuilder::new("virt-10.0");
    other.device("guestregs", 0, &[0; 99], None);
    let reference = ReferenceDescription::parse(other.description().as_bytes()).unwrap();
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_reference_description(reference);
    let err = decode_with_boundary(decoder, &input, input.len(), |_| {}).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("reference description"), "{text}");
    assert!(text.contains("devices"), "{text}");
}

/// The stream up to the first FULL section's header, then `tail`.
fn device_phase_with(tail: &[u8]) -> Vec<u8> {
    let mut b = StreamBuilder::new("virt-10.0");
    b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
    let mut input = b.into_bytes();
    input.extend_from_slice(&[QEMU_VM_SECTION_FULL, 0, 0, 0, 1, 3]);
    input.extend_from_slice(b"cpu");
    input.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 22]);
    input.extend_from_slice(tail);
    input
}

/// Feed `input` one byte per read; returns the decoder (the stream is incomplete on purpose).
fn trickle(input: &[u8], limits: Limits) -> StreamDecoder {
    let mut decoder = StreamDecoder::new(limits);
    let mut buf = BytesMut::new();
    for byte in input {
        buf.extend_from_slice(&[*byte]);
        while decoder.decode(&mut buf).unwrap().is_some() {}
    }
    decoder
}

#[test]
fn closing_braces_trickled_into_the_device_phase_are_examined_once() {
    // Each `}` made the old decoder look backwards over the held bytes for a JSON object.
    let mut tail = vec![0u8, 6, 0, 0, 0, 200, b'{'];
    tail.extend(std::iter::repeat_n(b'}', 20_000));
    let input = device_phase_with(&tail);
    let decoder = trickle(&input, Limits::default());
    assert!(decoder.awaiting_description());
    let work = decoder.work();
    let held = (input.len() as u64) - decoder.offset();
    assert_eq!(work.device_phase_bytes_scanned, held, "{work:?}");
    // One candidate (`00 06 <200> {`) ended at a read boundary and was tried once.
    assert_eq!(work.descriptions_tried, 1, "{work:?}");
}

#[test]
fn a_configuration_record_trickled_byte_by_byte_is_parsed_once() {
    // The old decoder re-parsed the configuration record from byte 0 on every read.
    let caps = 20_000u32;
    let machine = b"virt-10.0";
    let mut input = Vec::new();
    input.extend_from_slice(&QEMU_VM_FILE_MAGIC.to_be_bytes());
    input.extend_from_slice(&QEMU_VM_FILE_VERSION.to_be_bytes());
    input.push(QEMU_VM_CONFIGURATION);
    input.extend_from_slice(&(machine.len() as u32).to_be_bytes());
    input.extend_from_slice(machine);
    input.push(QEMU_VM_SUBSECTION);
    input.push(CONFIGURATION_CAPABILITIES.len() as u8);
    input.extend_from_slice(CONFIGURATION_CAPABILITIES.as_bytes());
    input.extend_from_slice(&1u32.to_be_bytes());
    input.extend_from_slice(&caps.to_be_bytes());
    for i in 0..caps {
        let cap = format!("cap{i}");
        input.push(cap.len() as u8);
        input.extend_from_slice(cap.as_bytes());
    }
    input.push(QEMU_VM_EOF);
    let decoder = trickle(&input, Limits::default());
    assert!(decoder.is_done());
    assert_eq!(decoder.info().capabilities.len(), caps as usize);
    let elements = decoder.work().configuration_elements;
    // machine name + subsection header + capabilities, each parsed once.
    assert_eq!(elements, u64::from(caps) + 2);
}

#[test]
fn a_postcopy_package_without_advise_is_refused_before_its_blob() {
    let mut b = StreamBuilder::new("virt-10.0");
    b.command(MIG_CMD_PACKAGED, &1000u32.to_be_bytes());
    let input = b.into_bytes();
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = BytesMut::from(&input[..]);
    let err = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("waited for the blob of an unadvised package"),
            Err(err) => break err,
        }
    };
    assert!(err.to_string().contains("POSTCOPY_ADVISE"), "{err}");

    // With ADVISE first, the same package is accepted.
    let mut b = StreamBuilder::new("virt-10.0");
    b.command(MIG_CMD_POSTCOPY_ADVISE, &[]);
    b.command(MIG_CMD_PACKAGED, &4u32.to_be_bytes());
    let mut input = b.into_bytes();
    input.extend_from_slice(&[1, 2, 3, 4, QEMU_VM_EOF]);
    let (out, decoder) = decode_chunked(&input, Limits::default(), || 3, |_| {}).unwrap();
    assert_eq!(out, input);
    assert!(decoder.is_done());
}

/// A minimal stream with `cpus` vCPUs of `regs` registers each.
fn many_cpus(cpus: u32, regs_per_cpu: u64) -> Vec<u8> {
    let mut b = StreamBuilder::new("virt-10.0");
    b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
    for i in 0..cpus {
        b.cpu(i, &regs(regs_per_cpu), 0);
    }
    b.finish()
}

#[test]
fn vcpus_and_registers_per_stream_are_budgeted() {
    let limits = Limits {
        max_cpus: 4,
        ..Limits::default()
    };
    let err = decode_chunked(&many_cpus(5, 2), limits.clone(), || usize::MAX, |_| {}).unwrap_err();
    assert!(err.to_string().contains("max_cpus"), "{err}");
    decode_chunked(&many_cpus(4, 2), limits, || usize::MAX, |_| {}).unwrap();

    let limits = Limits {
        max_cpregs: 16,
        ..Limits::default()
    };
    let err = decode_chunked(&many_cpus(1, 17), limits.clone(), || usize::MAX, |_| {}).unwrap_err();
    assert!(err.to_string().contains("max_cpregs"), "{err}");
    let mut refused = None;
    decode_chunked(
        &many_cpus(1, 16),
        limits,
        || usize::MAX,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                refused = Some(state.set_cpregs(0, &regs(17)).unwrap_err());
            }
        },
    )
    .unwrap();
    let refused = refused.expect("no device state");
    assert!(refused.to_string().contains("limit of 16"), "{refused}");
}

#[test]
fn rewrite_output_is_budgeted() {
    let input = many_cpus(2, 4);
    let mut phase_len = 0;
    decode_chunked(
        &input,
        Limits::default(),
        || usize::MAX,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                phase_len = state.wire_len();
            }
        },
    )
    .unwrap();
    let limits = Limits {
        max_rewrite_output: phase_len + 100,
        ..Limits::default()
    };
    let mut results = Vec::new();
    decode_chunked(
        &input,
        limits,
        || usize::MAX,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                // 4 more registers per vCPU: 64 bytes each, within the budget once, not twice.
                results.push(state.set_cpregs(0, &regs(8)).is_ok());
                results.push(state.set_cpregs(1, &regs(8)).is_ok());
                assert!(state.wire_len() <= phase_len + 100);
            }
        },
    )
    .unwrap();
    assert_eq!(results, [true, false]);
}

/// The rewrite budget is checked from a running total, not by re-encoding every vCPU for each
/// one (quadratic at 512 vCPUs x 4096 registers): the total must stay exact, so a budget of
/// exactly the largest length reached passes, and one byte less refuses the step that reached it.
#[test]
fn the_rewrite_budget_is_exact_after_many_replacements() {
    let input = many_cpus(40, 4);
    // Growing and shrinking arrays, counts crossing a digit boundary (9 -> 10), one vCPU twice.
    let steps: Vec<(u32, u64)> = std::iter::once((3, 9))
        .chain((0..40).map(|cpu| (cpu, u64::from(cpu % 13))))
        .collect();
    let apply = |limits: Limits| {
        let mut outcome = Vec::new();
        decode_chunked(
            &input,
            limits,
            || usize::MAX,
            |frame| {
                if let Frame::DeviceState(state) = frame {
                    for &(cpu, n) in &steps {
                        let ok = state.set_cpregs(cpu, &regs(n)).is_ok();
                        outcome.push((ok, state.wire_len()));
                    }
                }
            },
        )
        .unwrap();
        outcome
    };
    let lengths: Vec<usize> = apply(Limits::default())
        .iter()
        .map(|(_, len)| *len)
        .collect();
    let peak = lengths.iter().copied().max().unwrap();
    let first_at_peak = lengths.iter().position(|len| *len == peak);
    let fits = apply(Limits {
        max_rewrite_output: peak,
        ..Limits::default()
    });
    assert!(fits.iter().all(|(ok, _)| *ok), "{fits:?}");
    let short = apply(Limits {
        max_rewrite_output: peak - 1,
        ..Limits::default()
    });
    assert_eq!(
        short.iter().position(|(ok, _)| !ok),
        first_at_peak,
        "{short:?}"
    );
}

#[test]
fn iterable_sections_per_stream_are_budgeted() {
    let mut input = StreamBuilder::new("virt-10.0").into_bytes();
    for id in 0..10u32 {
        input.push(QEMU_VM_SECTION_START);
        input.extend_from_slice(&id.to_be_bytes());
        input.push(12);
        input.extend_from_slice(b"dirty-bitmap");
        input.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        input.push(DIRTY_BITMAP_MIG_FLAG_EOS);
        input.push(QEMU_VM_SECTION_FOOTER);
        input.extend_from_slice(&id.to_be_bytes());
    }
    input.push(QEMU_VM_EOF);
    let limits = Limits {
        max_sections: 8,
        ..Limits::default()
    };
    let err = decode_chunked(&input, limits, || usize::MAX, |_| {}).unwrap_err();
    assert!(err.to_string().contains("section 8"), "{err}");
    assert!(err.to_string().contains("max_sections"), "{err}");
}

/// The description a captured stream ends with.
fn description_of(vector: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(vector);
    let input = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let mut description = None;
    decode_chunked(
        &input,
        Limits::default(),
        || 1 << 16,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                description = Some(state.description_json().to_vec());
            }
        },
    )
    .unwrap();
    description.expect("no device state")
}

#[test]
fn a_reference_from_a_paused_vm_confirms_running_vms_of_its_configuration() {
    // q10-a64fx.bin: virt-10.0, a64fx, -S (never started); the others ran a guest that dirties
    // memory, with xbzrle, multifd, a return path. Same machine and cpu: same layout.
    let reference = ReferenceDescription::parse(&description_of("q10-a64fx.bin")).unwrap();
    assert!(reference.devices() > 2);
    for vector in ["q10-xbzrle.bin", "q10-mfd-main.bin", "q10-rp-main.bin"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/vectors")
            .join(vector);
        let input = std::fs::read(&path).unwrap();
        let mut decoder = StreamDecoder::new(Limits::default());
        decoder.set_reference_description(reference.clone());
        let (out, decoder) = decode_with_boundary(decoder, &input, 1, |frame| {
            if let Frame::DeviceState(state) = frame {
                assert!(state.is_confirmed());
            }
        })
        .unwrap_or_else(|err| panic!("{vector}: {err}"));
        assert_eq!(out, input, "{vector}");
        assert!(decoder.is_done());
    }
    // A different machine type has a different layout, and says where.
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_reference_description(reference);
    let input = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/q10m72-max.bin"),
    )
    .unwrap();
    let err = decode_with_boundary(decoder, &input, 1, |_| {}).unwrap_err();
    assert!(err.to_string().contains("reference description"), "{err}");
}

#[test]
fn a_second_cpu_section_for_one_instance_is_refused() {
    // set_cpregs addresses a vCPU by instance: a duplicate would leave one section unrewritten.
    let mut b = StreamBuilder::new("virt-10.0");
    b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
    b.cpu(0, &regs(2), 0);
    b.cpu(0, &regs(2), 1);
    let err = decode_chunked(&b.finish(), Limits::default(), || usize::MAX, |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains("a second cpu section for instance 0"),
        "{err}"
    );
}
