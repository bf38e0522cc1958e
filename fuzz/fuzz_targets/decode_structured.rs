//! Structure-aware fuzzing of the main-channel decoder.
//!
//! The input does not hold a stream: it steers a `StreamBuilder` (RAM records, commands, device
//! sections whose payloads are input bytes, i.e. guest-controlled, vCPUs with cpreg arrays), may
//! plant a forged description ending inside a device payload (what a guest can write into its
//! registers), may damage the stream, and chooses the decoder mode (rewriting, checking relay,
//! reference description) and the read boundaries. A few hundred bytes of input reach deep into
//! the device phase, so the target runs thousands of times faster than raw captured streams.
//!
//! Properties checked:
//! - never a panic, never a hang (every path consumes input or stops);
//! - what was emitted re-encodes to exactly the bytes consumed (identity rewrites included);
//! - an undamaged stream decodes completely in relay and reference mode, whatever the guest
//!   bytes and the read boundaries (a guest cannot end the device phase early), and in
//!   reference mode the device state is confirmed;
//! - a real rewrite (one register fewer) re-encodes to `wire_len()` bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use migproxy_codec::testing::{RamRecord, StreamBuilder};
use migproxy_codec::wire::*;
use migproxy_codec::{Frame, Limits, ReferenceDescription, StreamDecoder, StreamEncoder};
use tokio_util::codec::{Decoder, Encoder};

const DEVICE_NAMES: &[&str] = &["timer", "arm_gic", "guestregs", "cpu", "cpu_common", "virtio"];

fn bytes(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<u8>> {
    let len = u.int_in_range(0..=max)?;
    Ok(u.bytes(len)?.to_vec())
}

fn ram_record(u: &mut Unstructured<'_>) -> Result<RamRecord> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 => RamRecord::Zero,
        1 => RamRecord::Page(bytes(u, 8)?),
        2 => RamRecord::Xbzrle(bytes(u, 48)?),
        3 => RamRecord::Compressed(bytes(u, 48)?),
        _ => RamRecord::MultifdFlush,
    })
}

/// A forged ending for a section with id `id` named `idstr`, for guest bytes at `offset` of its
/// payload.
fn forged_ending(id: u32, idstr: &str, offset: usize) -> Vec<u8> {
    let json = format!(
        "{{\"devices\": [{{\"name\": \"{idstr}\", \"instance_id\": 0, \"version\": 1, \"fields\": [{{\"name\": \"data\", \"size\": {offset}}}]}}]}}"
    );
    let mut out = vec![QEMU_VM_SECTION_FOOTER];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

struct Built {
    stream: Vec<u8>,
    description: String,
    /// Stream offsets where a forged ending ends (read boundaries worth trying).
    forged_ends: Vec<usize>,
}

fn build(u: &mut Unstructured<'_>) -> Result<Built> {
    let mut b = StreamBuilder::new(if u.arbitrary()? { "virt-7.2" } else { "virt-10.0" });
    if u.arbitrary()? {
        b.command(MIG_CMD_OPEN_RETURN_PATH, &[]);
    }
    b.ram_start(1 << 20);
    for _ in 0..u.int_in_range(0..=2u8)? {
        let records: Vec<RamRecord> = (0..u.int_in_range(0..=4u8)?)
            .map(|_| ram_record(u))
            .collect::<Result<_>>()?;
        b.ram_section(false, &records);
        if u.arbitrary()? {
            b.command(MIG_CMD_PING, &u.arbitrary::<u32>()?.to_be_bytes());
        }
    }
    b.ram_section(true, &[RamRecord::Zero]);
    let mut forged_ends = Vec::new();
    // Section ids: 0 is ram; FULL sections count up from 1 in the builder.
    let mut next_id = 1u32;
    let mut next_cpu = 0u32;
    // At least one device: without any, EOF would end the stream before the description.
    for _ in 0..u.int_in_range(1..=3u8)? {
        if u.arbitrary()? {
            let regs: Vec<(u64, u64)> = (0..u.int_in_range(0..=6u64)?)
                .map(|i| Ok((0x6030_0000_0013_0000 + i * 8, u.arbitrary()?)))
                .collect::<Result<_>>()?;
            // Instances are unique in a real stream (a duplicate is refused, tested elsewhere).
            b.cpu(next_cpu, &regs, u.arbitrary()?);
            next_cpu += 1;
            next_id += 2;
        } else {
            let name = *u.choose(DEVICE_NAMES)?;
            let mut payload = bytes(u, 40)?;
            let mut forged_at = None;
            if u.ratio(1, 3)? {
                // The guest writes a forged ending into its state.
                forged_at = Some(payload.len());
                payload.extend_from_slice(&forged_ending(next_id, name, payload.len()));
                payload.extend_from_slice(&bytes(u, 16)?);
            }
            let sub_data = bytes(u, 8)?;
            let with_sub = u.arbitrary::<bool>()?;
            let before = b.len();
            b.device(name, 0, &payload, with_sub.then_some(("sub", &sub_data[..])));
            if let Some(at) = forged_at {
                // FULL 04, be32 id, counted name, be32 instance, be32 version.
                let payload_start = before + 1 + 4 + 1 + name.len() + 8;
                forged_ends.push(payload_start + at + forged_ending(next_id, name, at).len());
            }
            next_id += 1;
        }
    }
    let description = b.description();
    Ok(Built {
        stream: b.finish(),
        description,
        forged_ends,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Rewriting,
    Relay,
    Reference,
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(built) = build(&mut u) else {
        return;
    };
    let reference = ReferenceDescription::parse(built.description.as_bytes());
    let mode = match u.int_in_range(0..=2u8).unwrap_or(0) {
        0 => Mode::Rewriting,
        1 => Mode::Relay,
        // Opaque devices that share a name with different sizes are no valid reference (QEMU
        // gives one vmstate one layout).
        _ if reference.is_err() => Mode::Relay,
        _ => Mode::Reference,
    };
    let mut input = built.stream;
    let mut damaged = false;
    for _ in 0..u.int_in_range(0..=2u8).unwrap_or(0) {
        if let (Ok(pos), Ok(value)) = (u.choose_index(input.len()), u.arbitrary::<u8>()) {
            damaged |= input[pos] != value;
            input[pos] = value;
        }
    }
    if u.ratio(1, 8).unwrap_or(false) {
        let keep = u.choose_index(input.len()).unwrap_or(0);
        damaged |= keep < input.len();
        input.truncate(keep);
    }
    let rewrite = u.ratio(1, 4).unwrap_or(false);
    let small_reads = u.arbitrary::<bool>().unwrap_or(false);

    let limits = Limits {
        max_record: 1 << 16,
        max_device_state: 1 << 20,
        max_description: 1 << 16,
        max_packaged: 1 << 16,
        ..Limits::default()
    };
    let mut decoder = StreamDecoder::new(limits);
    match mode {
        Mode::Rewriting => {}
        Mode::Relay => decoder.set_checking_relay(true),
        Mode::Reference => {
            if let Ok(reference) = reference {
                decoder.set_reference_description(reference);
            }
        }
    }
    // Read boundaries: at every forged ending (the attack), else input-chosen sizes.
    let mut boundaries: Vec<usize> = built.forged_ends.clone();
    let mut pos = 0usize;
    while pos < input.len() {
        let step = if small_reads {
            usize::from(u.int_in_range(1..=64u8).unwrap_or(64))
        } else {
            usize::from(u.arbitrary::<u16>().unwrap_or(u16::MAX)).max(1)
        };
        pos += step;
        boundaries.push(pos.min(input.len()));
    }
    boundaries.push(input.len());
    boundaries.sort_unstable();
    boundaries.dedup();

    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut rewritten = false;
    let mut fed = 0usize;
    let mut result = Ok(());
    'feed: for &end in &boundaries {
        let end = end.min(input.len());
        if end <= fed {
            continue;
        }
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(mut frame)) => {
                    if let Frame::DeviceState(state) = &mut frame {
                        if mode == Mode::Reference {
                            assert!(state.is_confirmed(), "reference mode: unconfirmed ending");
                        }
                        for cpu in state.cpus() {
                            let mut regs = cpu.registers.clone();
                            if rewrite && !regs.is_empty() && mode != Mode::Relay {
                                regs.pop();
                                rewritten = true;
                            }
                            let _ = state.set_cpregs(cpu.instance, &regs);
                        }
                        let expected = state.wire_len();
                        let mut encoded = BytesMut::new();
                        state.encode(&mut encoded);
                        assert_eq!(encoded.len(), expected, "wire_len differs from encode");
                    }
                    StreamEncoder.encode(frame, &mut out).expect("encoding into memory");
                }
                Ok(None) => break,
                Err(err) => {
                    result = Err(err);
                    break 'feed;
                }
            }
        }
    }
    if result.is_ok() {
        result = match decoder.decode_eof(&mut buf) {
            Ok(Some(frame)) => {
                StreamEncoder.encode(frame, &mut out).expect("encoding into memory");
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(err) => Err(err),
        };
    }
    if !rewritten {
        let consumed = usize::try_from(decoder.offset()).unwrap_or(usize::MAX);
        assert!(out.len() <= input.len());
        assert!(out[..] == input[..out.len()], "re-encoding differs from the input");
        assert!(consumed <= input.len());
    }
    if !damaged && mode != Mode::Rewriting {
        // A guest cannot end the device phase early: the undamaged stream always completes.
        if let Err(err) = result {
            panic!("undamaged stream refused in {} mode: {err}", if mode == Mode::Relay { "relay" } else { "reference" });
        }
        assert!(decoder.is_done());
        if !rewritten {
            assert!(out[..] == input[..], "the relay lost bytes");
        }
    }
});
