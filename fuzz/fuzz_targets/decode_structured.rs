//! Structure-aware fuzzing of the main-channel decoder, the device-phase walk, the reference
//! description, the postcopy package walk and the cpreg rewrite.
//!
//! The input does not hold a stream: it steers a `StreamBuilder` into a valid skeleton (header,
//! configuration, a few RAM records, END, then either a device phase of `cpu` and opaque device
//! sections with its description, or a postcopy package of those sections as QEMU writes it, with
//! or without `postcopy-ram` and the loaded PING), may plant a forged
//! description ending inside a device payload (what a guest can write into its registers), may
//! damage or truncate the stream, and chooses the decoder mode (rewriting, checking relay,
//! reference description), the read boundaries, a destination profile, a source profile and a
//! policy. Most inputs reach the device phase and the rewrite with a few dozen bytes.
//!
//! Oracles, not just "no panic":
//! - split reads: the stream fed in input-chosen pieces gives the same bytes, the same result
//!   and the same end state as the stream fed in one piece (relay and reference mode always; a
//!   rewriting decoder without a reference may only stop earlier, at a forged ending, with
//!   `TrailingData` after a prefix of the same bytes: the rule DESIGN.md documents);
//! - page-run coalescing (`set_coalesce_ram_records`, as the proxy's pump decodes), whole and
//!   split, changes only the cut of the frames: the same bytes in the same order, the same
//!   result and offset, the same end state;
//! - what was emitted re-encodes to exactly the bytes consumed; `wire_len()` equals what
//!   `encode` writes;
//! - an undamaged stream always completes in relay and reference mode, whatever the guest bytes
//!   and read boundaries, and in reference mode the device state is confirmed;
//! - the rewrite (`migproxy_config::rewrite` against the fuzzed profiles and policy) returns a
//!   strictly ascending list that accounts for every source register; applied (plus removed
//!   `cpu` subsections), the stream re-decodes and carries exactly those registers;
//! - a postcopy package walks with the reference, rewrites, and its record walks again;
//! - work stays bounded per byte (`DecodeWork`): each held byte scanned once, at most one
//!   description tried per read, configuration elements within the bytes.
#![no_main]

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use migproxy_codec::testing::{RamRecord, StreamBuilder};
use migproxy_codec::wire::*;
use migproxy_codec::{
    DeviceState, Frame, Limits, MigCommand, PackageDeviceState, RecordKind, ReferenceDescription,
    StreamDecoder,
};
use migproxy_config::{
    check_subsections, Accel, FillMissing, OnExtra, OnIdMismatch, Policy, Profile, RegId,
    SourceSubsection,
};

mod feed;

use feed::Decoded;

const DEVICE_NAMES: &[&str] = &[
    "timer",
    "arm_gic",
    "guestregs",
    "cpu",
    "cpu_common",
    "virtio",
];

/// The cpreg ids source, destination and profiles draw from, sorted: real encodings, among them
/// identification registers (ID_AA64PFR0_EL1, ID_AA64ISAR0_EL1, MIDR_EL1), SCTLR_EL1,
/// CONTEXTIDR_EL1, TPIDR_EL0, CNTKCTL_EL1, a KVM firmware register and a CCSIDR entry.
const REGISTERS: &[u64] = &[
    0x6030_0000_0013_c000, // MIDR_EL1
    0x6030_0000_0013_c020, // ID_AA64PFR0_EL1
    0x6030_0000_0013_c030, // ID_AA64ISAR0_EL1
    0x6030_0000_0013_c080, // SCTLR_EL1
    0x6030_0000_0013_c681, // CONTEXTIDR_EL1
    0x6030_0000_0013_c708, // CNTKCTL_EL1
    0x6030_0000_0013_de82, // TPIDR_EL0
    0x6030_0000_0014_0000, // KVM firmware register 0
    0x6020_0000_0011_0000, // a CCSIDR entry (demux)
];

/// Small budgets: the limit paths are reachable with small inputs, and nothing reserves much.
fn limits() -> Limits {
    Limits {
        max_record: 1 << 14,
        max_device_state: 1 << 15,
        max_description: 1 << 14,
        max_packaged: 1 << 15,
        max_cpus: 8,
        max_cpregs: 16,
        max_rewrite_output: 1 << 16,
        max_sections: 8,
    }
}

fn bytes(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<u8>> {
    let len = u.int_in_range(0..=max)?;
    Ok(u.bytes(len)?.to_vec())
}

fn ram_record(u: &mut Unstructured<'_>) -> Result<RamRecord> {
    Ok(match u.int_in_range(0..=9u8)? {
        // A full page is 4 KiB of stream: rare, the other records carry the same parsing.
        0 => RamRecord::Page(bytes(u, 4)?),
        1..=3 => RamRecord::Xbzrle(bytes(u, 24)?),
        4 | 5 => RamRecord::Compressed(bytes(u, 24)?),
        6 => RamRecord::MultifdFlush,
        _ => RamRecord::Zero,
    })
}

/// Registers drawn from `REGISTERS` by a bit mask, values from the input (often 0, so that
/// "unused since reset" drops happen).
fn registers(u: &mut Unstructured<'_>) -> Result<Vec<(u64, u64)>> {
    let mask: u16 = u.arbitrary()?;
    let mut regs = Vec::new();
    for (bit, &id) in REGISTERS.iter().enumerate() {
        if mask & (1 << bit) != 0 {
            let value = match u.int_in_range(0..=3u8)? {
                0 | 1 => 0,
                2 => u64::from(u.arbitrary::<u8>()?),
                _ => u.arbitrary()?,
            };
            regs.push((id, value));
        }
    }
    Ok(regs)
}

/// A forged ending for a section with id `id` named `idstr`, for guest bytes at `offset` of its
/// payload.
fn forged_ending(id: u32, idstr: &str, offset: usize) -> Vec<u8> {
    migproxy_codec::testing::forged_description_ending(id, idstr, offset)
}

/// The device sections: `cpu` (with `cpu_common`) and opaque devices, some with forged endings.
struct Devices {
    builder: StreamBuilder,
    /// Offsets (relative to the builder's first device byte) where a forged ending ends.
    forged_ends: Vec<usize>,
}

/// Device sections in a builder of their own, whose header is cut off when they are placed.
fn devices(u: &mut Unstructured<'_>, machine: &str) -> Result<(Devices, usize)> {
    let mut b = StreamBuilder::new(machine);
    let header_len = b.len();
    let mut forged_ends = Vec::new();
    let mut cpus = 0u32;
    // Section ids count from 0 in this builder; the stream's RAM section is placed before with
    // id 0 as well, which the device walk does not mind (the decoder keeps iterables apart).
    let mut next_id = 0u32;
    // At least one device: without any, EOF would end the stream before the description.
    for _ in 0..u.int_in_range(1..=3u8)? {
        if u.ratio(3, 5)? {
            let mut regs = registers(u)?;
            if u.ratio(1, 16)? && regs.len() > 1 {
                // QEMU sends the list sorted; the rewrite sorts (and reports) what is not.
                regs.swap(0, 1);
            }
            // Instances are unique in a real stream (a duplicate is refused, tested elsewhere).
            b.cpu(cpus, &regs, u.arbitrary()?);
            cpus += 1;
            next_id += 2;
        } else {
            let name = *u.choose(DEVICE_NAMES)?;
            let mut payload = bytes(u, 24)?;
            let mut forged_at = None;
            if u.ratio(1, 3)? {
                // The guest writes a forged ending into its state.
                forged_at = Some(payload.len());
                payload.extend_from_slice(&forged_ending(next_id, name, payload.len()));
                payload.extend_from_slice(&bytes(u, 8)?);
            }
            let sub_data = bytes(u, 8)?;
            let with_sub = u.arbitrary::<bool>()?;
            let before = b.len() - header_len;
            // Named like the `cpu` subsections QEMU versions differ in, when the device is `cpu`.
            let sub_name = *u.choose(&["sub", "wfxt-timer", "irq-line-state", "sve"])?;
            b.device(
                name,
                0,
                &payload,
                with_sub.then_some((sub_name, &sub_data[..])),
            );
            if let Some(at) = forged_at {
                // FULL 04, be32 id, counted name, be32 instance, be32 version.
                let payload_start = before + 1 + 4 + 1 + name.len() + 8;
                forged_ends.push(payload_start + at + forged_ending(next_id, name, at).len());
            }
            next_id += 1;
        }
    }
    Ok((
        Devices {
            builder: b,
            forged_ends,
        },
        header_len,
    ))
}

struct Built {
    stream: Vec<u8>,
    /// The description of the device sections (the reference description's text).
    description: String,
    /// Stream offsets where a forged ending ends (read boundaries worth trying).
    forged_ends: Vec<usize>,
    /// The device sections travel in a postcopy package, which ends this way.
    package: Option<PackageTail>,
}

/// The commands after a package's sections, as the generator wrote them.
#[derive(Clone, Copy, Debug)]
struct PackageTail {
    /// Their bytes: [PING 3] [PING 0x42] RUN.
    len: usize,
    /// `PING 0x42` is among them.
    loaded_ping: bool,
}

fn build(u: &mut Unstructured<'_>) -> Result<Built> {
    let machine = if u.arbitrary()? {
        "virt-7.2"
    } else {
        "virt-10.0"
    };
    let postcopy = u.ratio(1, 4)?;
    let mut b = StreamBuilder::new(machine);
    let return_path = u.arbitrary()?;
    if return_path {
        b.command(MIG_CMD_OPEN_RETURN_PATH, &[]);
    }
    // Postcopy of RAM (`postcopy-ram`), or of dirty bitmaps alone: QEMU advises the first with
    // its page sizes (`ram_pagesize_summary`, target page size), the second with no payload.
    let postcopy_ram = postcopy && u.arbitrary()?;
    if postcopy_ram {
        let mut page_sizes = 4096u64.to_be_bytes().to_vec();
        page_sizes.extend_from_slice(&4096u64.to_be_bytes());
        b.command(MIG_CMD_POSTCOPY_ADVISE, &page_sizes);
    } else if postcopy {
        b.command(MIG_CMD_POSTCOPY_ADVISE, &[]);
    }
    b.ram_start(1 << 20);
    for _ in 0..u.int_in_range(0..=2u8)? {
        let records: Vec<RamRecord> = (0..u.int_in_range(0..=3u8)?)
            .map(|_| ram_record(u))
            .collect::<Result<_>>()?;
        b.ram_section(false, &records);
        if u.ratio(1, 4)? {
            b.command(MIG_CMD_PING, &u.arbitrary::<u32>()?.to_be_bytes());
        }
    }
    let (devices, header_len) = devices(u, machine)?;
    let description = devices.builder.description();
    let sections = devices.builder.into_bytes();
    let sections = sections.get(header_len..).unwrap_or_default();
    if postcopy {
        // QEMU's package (`postcopy_start`): LISTEN, the device sections, `PING 3` with
        // postcopy-ram, `PING 0x42` from a source since 10.2 with a return path, RUN; then
        // postcopy RAM and EOF without a description.
        let mut blob = vec![QEMU_VM_COMMAND, 0x00, 0x04, 0x00, 0x00];
        blob.extend_from_slice(sections);
        let sections_end = blob.len();
        if postcopy_ram {
            blob.extend_from_slice(&[QEMU_VM_COMMAND, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 3]);
        }
        let loaded_ping = return_path && u.arbitrary()?;
        if loaded_ping {
            blob.extend_from_slice(&[QEMU_VM_COMMAND, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 0x42]);
        }
        blob.extend_from_slice(&[QEMU_VM_COMMAND, 0x00, 0x05, 0x00, 0x00]);
        let package = PackageTail {
            len: blob.len() - sections_end,
            loaded_ping,
        };
        let blob_len = u32::try_from(blob.len()).unwrap_or(u32::MAX);
        b.command(MIG_CMD_PACKAGED, &blob_len.to_be_bytes());
        let mut stream = b.into_bytes();
        stream.extend_from_slice(&blob);
        // Postcopy RAM follows (here an END section of the same RAM section), then EOF.
        let mut tail = StreamBuilder::new(machine);
        tail.ram_start(1 << 20);
        let tail_start = tail.len();
        tail.ram_section(true, &[RamRecord::Zero]);
        let tail = tail.into_bytes();
        stream.extend_from_slice(tail.get(tail_start..).unwrap_or_default());
        stream.push(QEMU_VM_EOF);
        return Ok(Built {
            stream,
            description,
            forged_ends: Vec::new(),
            package: Some(package),
        });
    }
    b.ram_section(true, &[RamRecord::Zero]);
    let mut stream = b.into_bytes();
    let sections_start = stream.len();
    stream.extend_from_slice(sections);
    stream.push(QEMU_VM_EOF);
    stream.push(QEMU_VM_VMDESCRIPTION);
    stream.extend_from_slice(
        &u32::try_from(description.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    stream.extend_from_slice(description.as_bytes());
    Ok(Built {
        stream,
        description,
        forged_ends: devices
            .forged_ends
            .iter()
            .map(|end| sections_start + end)
            .collect(),
        package: None,
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Rewriting,
    Relay,
    Reference,
}

/// What one decode of the stream produced.
fn decoder(mode: Mode, reference: Option<&ReferenceDescription>) -> StreamDecoder {
    let mut decoder = StreamDecoder::new(limits());
    match mode {
        Mode::Rewriting => {}
        Mode::Relay => decoder.set_checking_relay(true),
        Mode::Reference => {
            if let Some(reference) = reference {
                decoder.set_reference_description(reference.clone());
            }
        }
    }
    decoder
}

/// Decode `input` fed up to each of `boundaries` in turn (ascending; the input's end last).
fn decode(input: &[u8], boundaries: &[usize], decoder: StreamDecoder) -> Decoded {
    feed::decode(input, boundaries, decoder, encode_frame)
}

/// The rewrite's inputs, drawn from the input.
struct RewriteSetup {
    dest: Profile,
    source: Option<Profile>,
    policy: Policy,
}

fn rewrite_setup(u: &mut Unstructured<'_>) -> Result<Option<RewriteSetup>> {
    let accel = if u.ratio(1, 3)? {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let Ok(mut dest) = Profile::from_vcpus(accel, &[(0, registers(u)?)]) else {
        return Ok(None);
    };
    // Which `cpu` subsections the destination loads depends on its QEMU version.
    dest.qemu_version = u
        .choose(&[None, Some("7.2.0"), Some("10.0.0"), Some("11.1.0")])?
        .map(String::from);
    let source = if u.arbitrary()? {
        Profile::from_vcpus(accel, &[(0, registers(u)?)]).ok()
    } else {
        None
    };
    let policy = Policy {
        on_extra: *u.choose(&[OnExtra::DropUnused, OnExtra::Drop, OnExtra::Refuse])?,
        allow_drop: if u.ratio(1, 4)? {
            vec![RegId(*u.choose(REGISTERS)?)]
        } else {
            Vec::new()
        },
        fill_missing: *u.choose(&[FillMissing::Auto, FillMissing::Always, FillMissing::Never])?,
        on_id_mismatch: *u.choose(&[
            OnIdMismatch::Auto,
            OnIdMismatch::Refuse,
            OnIdMismatch::Warn,
            OnIdMismatch::UseDestination,
        ])?,
    };
    Ok(Some(RewriteSetup {
        dest,
        source,
        policy,
    }))
}

/// Rewrite every vCPU as the proxy does; return what each vCPU must now carry, or `None` when
/// the rewrite refused (the proxy then fails the migration and writes nothing).
fn rewrite_cpus(state: &mut DeviceState, setup: &RewriteSetup) -> Option<Vec<Vec<(u64, u64)>>> {
    let mut expected = Vec::new();
    for cpu in state.cpus() {
        let result = migproxy_config::rewrite(
            cpu.instance,
            &cpu.registers,
            &setup.dest,
            setup.source.as_ref(),
            &setup.policy,
        );
        let report = &result.report;
        // The list QEMU's cpu_post_load merges: strictly ascending.
        assert!(
            result.registers.windows(2).all(|w| w[0].0 < w[1].0),
            "rewrite output not strictly ascending"
        );
        let source_ids: BTreeSet<u64> = cpu.registers.iter().map(|r| r.0).collect();
        let out_ids: BTreeSet<u64> = result.registers.iter().map(|r| r.0).collect();
        for dropped in &report.dropped {
            assert!(
                !out_ids.contains(&dropped.id.0),
                "a dropped register is still sent"
            );
            assert!(
                !setup.dest.has(dropped.id),
                "dropped a register the destination has"
            );
        }
        for filled in &report.filled {
            assert!(
                !source_ids.contains(&filled.id.0),
                "filled a register the source has"
            );
            assert!(
                setup.dest.has(filled.id),
                "filled a register the destination lacks"
            );
        }
        // The operator's view of it must not panic either.
        let _ = report.to_string();
        if report.is_refused() {
            let _ = report.refusal_summary();
            return None;
        }
        for id in &source_ids {
            // Every source register is sent or was dropped by a rule.
            assert!(
                out_ids.contains(id) || report.dropped.iter().any(|d| d.id.0 == *id),
                "source register {id:#x} vanished"
            );
        }
        for id in &out_ids {
            assert!(
                source_ids.contains(id) || report.filled.iter().any(|f| f.id.0 == *id),
                "register {id:#x} came from nowhere"
            );
        }
        if report.is_unchanged() {
            assert_eq!(
                result.registers, cpu.registers,
                "unchanged, but not the input"
            );
        } else if state.set_cpregs(cpu.instance, &result.registers).is_err() {
            // Over a budget (registers per vCPU, output bytes): the proxy refuses too.
            return None;
        }
        expected.push(
            state
                .cpus()
                .iter()
                .find(|c| c.instance == cpu.instance)?
                .registers
                .clone(),
        );
    }
    Some(expected)
}

/// Remove `cpu` subsections as the proxy does (`check_subsections` against the destination
/// profile: `None` when it refuses) or, half of the time, the ones the input picks; return the
/// (instance, name) of those kept, in stream order (what the rewritten stream must carry).
fn remove_subsections(
    u: &mut Unstructured<'_>,
    state: &mut DeviceState,
    dest: &Profile,
) -> Option<Vec<(u32, String)>> {
    let subs = state.cpu_subsections();
    if u.arbitrary().unwrap_or(false) {
        let mut instances: Vec<u32> = subs.iter().map(|s| s.instance).collect();
        instances.dedup();
        for instance in instances {
            let of_vcpu: Vec<SourceSubsection<'_>> = subs
                .iter()
                .filter(|s| s.instance == instance)
                .map(|s| SourceSubsection {
                    name: &s.name,
                    nested: &s.nested,
                    payload: &s.payload,
                })
                .collect();
            let report = check_subsections(instance, &of_vcpu, dest);
            let _ = report.to_string();
            if report.is_refused() {
                let _ = report.refusal_summary();
                return None;
            }
            for removed in &report.removed {
                state
                    .remove_cpu_subsection(instance, &removed.name)
                    .expect("a subsection the rule removes is there");
            }
        }
    } else {
        for sub in subs {
            if u.ratio(1, 3).unwrap_or(false) {
                state
                    .remove_cpu_subsection(sub.instance, &sub.name)
                    .expect("a listed subsection can be removed");
            }
        }
    }
    Some(subsections(state))
}

fn subsections(state: &DeviceState) -> Vec<(u32, String)> {
    state
        .cpu_subsections()
        .into_iter()
        .map(|sub| (sub.instance, sub.name))
        .collect()
}

/// One frame written back as the proxy writes it (frames are not `Clone`: the byte frames go
/// through `StreamEncoder` as cheap copies of their `Bytes`).
/// Re-encode `frame` unchanged; a device state's `to_bytes` must give the same bytes.
fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    let before = out.len();
    feed::encode_frame(frame, out);
    if let Frame::DeviceState(state) = frame {
        assert_eq!(
            state.to_bytes()[..],
            out[before..],
            "to_bytes differs from encode"
        );
    }
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for frame in frames {
        encode_frame(frame, &mut out);
    }
    out.to_vec()
}

/// The rewritten stream decodes (one piece, checking relay) and carries exactly what was set.
fn check_redecodes(
    rewritten: &[u8],
    expected: &[Vec<(u64, u64)>],
    kept: &[(u32, String)],
    reference: Option<&ReferenceDescription>,
) {
    let mode = if reference.is_some() {
        Mode::Reference
    } else {
        Mode::Relay
    };
    let again = decode(rewritten, &[rewritten.len()], decoder(mode, reference));
    if let Err(err) = &again.result {
        if std::env::var_os("FUZZ_DEBUG").is_some() {
            eprintln!("rewritten: {}", String::from_utf8_lossy(rewritten));
        }
        panic!("the rewritten stream does not decode ({mode:?}): {err}");
    }
    assert_eq!(
        again.out, rewritten,
        "the rewritten stream does not re-encode"
    );
    let Some(Frame::DeviceState(state)) = again
        .frames
        .iter()
        .find(|f| matches!(f, Frame::DeviceState(_)))
    else {
        panic!("the rewritten stream has no device state");
    };
    let cpus: Vec<Vec<(u64, u64)>> = state.cpus().into_iter().map(|c| c.registers).collect();
    assert_eq!(
        cpus, expected,
        "the rewritten stream carries other registers"
    );
    assert_eq!(
        subsections(state),
        kept,
        "the rewritten stream carries other subsections"
    );
}

/// Walk the package with the reference, rewrite it, and walk the rewritten record again.
fn check_package(
    record: &Bytes,
    offset: u64,
    description: &str,
    tail: PackageTail,
    undamaged: bool,
    setup: Option<&RewriteSetup>,
    u: &mut Unstructured<'_>,
) {
    let limits = limits();
    let mut package =
        match PackageDeviceState::walk(record, offset, description.as_bytes(), &limits) {
            Ok(package) => package,
            Err(err) => {
                assert!(!undamaged, "an undamaged package does not walk: {err}");
                return;
            }
        };
    assert_eq!(
        package.to_record().expect("an unchanged package fits"),
        record,
        "an unchanged package is not written back byte for byte"
    );
    if undamaged {
        assert_eq!(
            package.waits_for_destination(),
            tail.loaded_ping,
            "the package's PING 0x42 is misread"
        );
    }
    let Some(setup) = setup else {
        return;
    };
    let Some(expected) = rewrite_cpus(package.device_state(), setup) else {
        return;
    };
    let Some(kept) = remove_subsections(u, package.device_state(), &setup.dest) else {
        return;
    };
    let Ok(rewritten) = package.to_record() else {
        return;
    };
    // The layout of the rewritten package is the rewritten description (a removed subsection
    // is gone from both): the sections, EOF, 06, be32 length, text. (Only an undamaged package
    // walked: a damaged one that still walks has the tail it was built with.)
    let sections_len = rewritten.len() - 9 - 5 - tail.len;
    let encoded = package.device_state().to_bytes();
    let new_description = encoded.get(sections_len + 6..).unwrap_or_default();
    let again = PackageDeviceState::walk(&rewritten, offset, new_description, &limits);
    let mut again = match again {
        Ok(again) => again,
        Err(err) => panic!("the rewritten package does not walk: {err}"),
    };
    let cpus: Vec<Vec<(u64, u64)>> = again
        .device_state()
        .cpus()
        .into_iter()
        .map(|c| c.registers)
        .collect();
    assert_eq!(
        cpus, expected,
        "the rewritten package carries other registers"
    );
    assert_eq!(
        subsections(again.device_state()),
        kept,
        "the rewritten package carries other subsections"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(built) = build(&mut u) else {
        return;
    };
    let reference = ReferenceDescription::parse(built.description.as_bytes()).ok();
    let mode = match u.int_in_range(0..=2u8).unwrap_or(0) {
        0 => Mode::Rewriting,
        1 => Mode::Relay,
        // Opaque devices that share a name with different sizes are no valid reference (QEMU
        // gives one vmstate one layout).
        _ if reference.is_none() => Mode::Relay,
        _ => Mode::Reference,
    };
    let mut input = built.stream;
    let mut damaged = false;
    if u.ratio(1, 4).unwrap_or(false) {
        for _ in 0..u.int_in_range(1..=2u8).unwrap_or(1) {
            if let (Ok(pos), Ok(value)) = (u.choose_index(input.len()), u.arbitrary::<u8>()) {
                damaged |= input[pos] != value;
                input[pos] = value;
            }
        }
    }
    if u.ratio(1, 8).unwrap_or(false) {
        let keep = u.choose_index(input.len()).unwrap_or(0);
        damaged |= keep < input.len();
        input.truncate(keep);
    }
    let setup = rewrite_setup(&mut u).ok().flatten();

    // Read boundaries: at every forged ending (the attack), then a few input-chosen read sizes,
    // or small reads over a window; the rest arrives in one piece.
    let mut boundaries: Vec<usize> = built.forged_ends.clone();
    if u.ratio(1, 8).unwrap_or(false) {
        // Small reads over a window (at most 512 bytes, often the description's arrival): the
        // per-read paths without thousands of reads per input.
        let step = usize::from(u.int_in_range(1..=16u8).unwrap_or(16));
        let from = if u.arbitrary().unwrap_or(true) {
            input.len().saturating_sub(512)
        } else {
            u.choose_index(input.len()).unwrap_or(0)
        };
        boundaries.extend((from..input.len().min(from + 512)).step_by(step));
    } else {
        let mut pos = 0usize;
        for _ in 0..u.int_in_range(0..=6u8).unwrap_or(0) {
            pos += usize::from(u.arbitrary::<u16>().unwrap_or(0) % 2048) + 1;
            boundaries.push(pos);
        }
    }
    boundaries.push(input.len());
    boundaries.sort_unstable();
    boundaries.dedup();

    let whole = decode(&input, &[input.len()], decoder(mode, reference.as_ref()));
    let split = decode(&input, &boundaries, decoder(mode, reference.as_ref()));
    // Page-run coalescing (as the proxy's pump decodes) changes only the cut of the frames.
    let coalescing = || feed::coalescing(decoder(mode, reference.as_ref()));
    let whole_coalesced = decode(&input, &[input.len()], coalescing());
    let split_coalesced = decode(&input, &boundaries, coalescing());
    feed::assert_same_outcome(&whole, &whole_coalesced);
    feed::assert_same_outcome(&split, &split_coalesced);

    // Re-encoding equals the input consumed, in all of them.
    for run in [&whole, &split, &whole_coalesced, &split_coalesced] {
        run.assert_reencodes_what_it_consumed(&input);
        // Constant work per received byte.
        assert!(run.work.device_phase_bytes_scanned <= input.len() as u64);
        assert!(
            run.work.descriptions_tried <= run.reads,
            "more descriptions tried than reads"
        );
        assert!(run.work.configuration_elements <= input.len() as u64);
    }
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!(
            "mode {mode:?} damaged {damaged} package {:?} len {} reads {}\n one piece: {:?} out {} done {}\n split: {:?} out {} done {}",
            built.package,
            input.len(),
            boundaries.len(),
            whole.result,
            whole.out.len(),
            whole.done,
            split.result,
            split.out.len(),
            split.done
        );
    }
    // Split reads change nothing, except that a rewriting decoder without a reference may stop
    // at a forged ending (its documented rule) after a prefix of the same bytes. (With
    // coalescing the same, since coalescing changes neither.)
    feed::assert_split_matches_whole(&whole, &split, mode == Mode::Rewriting);

    if !damaged && mode != Mode::Rewriting {
        // A guest cannot end the device phase early: the undamaged stream always completes.
        if let Err(err) = &split.result {
            panic!("undamaged stream refused in {mode:?} mode: {err}");
        }
        assert!(split.done);
        assert!(split.out == input, "the relay lost bytes");
    }
    for frame in &split.frames {
        if let Frame::DeviceState(state) = frame {
            if mode == Mode::Reference {
                assert!(state.is_confirmed(), "reference mode: unconfirmed ending");
            }
        }
    }

    // The rewrite, applied to the one-piece decode: the stream re-decodes with the new arrays.
    if let (Ok(()), false, Some(setup)) = (&whole.result, built.package.is_some(), &setup) {
        let mut frames = whole.frames;
        let Some(Frame::DeviceState(state)) = frames
            .iter_mut()
            .find(|f| matches!(f, Frame::DeviceState(_)))
        else {
            return;
        };
        let Some(expected) = rewrite_cpus(state, setup) else {
            return;
        };
        let Some(kept) = remove_subsections(&mut u, state, &setup.dest) else {
            return;
        };
        let rewritten = encode_all(&frames);
        // With the reference only where the stream had to match it (a damaged description
        // decodes without one).
        let reference = reference.as_ref().filter(|_| mode == Mode::Reference);
        check_redecodes(&rewritten, &expected, &kept, reference);
        return;
    }
    if let Some(tail) = built.package {
        let mut offset = 0u64;
        for frame in &whole.frames {
            if let Frame::Verbatim {
                kind: RecordKind::Command(MigCommand::Packaged { .. }),
                bytes,
                ..
            } = frame
            {
                check_package(
                    bytes,
                    offset,
                    &built.description,
                    tail,
                    !damaged,
                    setup.as_ref(),
                    &mut u,
                );
            }
            offset += frame.wire_len() as u64;
        }
    }
});
