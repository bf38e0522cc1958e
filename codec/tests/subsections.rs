//! `cpu` subsections on a real QEMU 11.1 stream (`q111m72-a64fx.bin`: 11.1 sends
//! `cpu/wfxt-timer` for every TCG vCPU, its timer idle in a paused VM): the walk exposes them,
//! removing one takes its bytes out of the section and its object out of the description, and
//! the result is a stream that decodes exactly, with everything else unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::decode_chunked;
use migproxy_codec::{CpuRegisters, CpuSubsection, DecodeError, Frame, Limits};

const WFXT: &str = "cpu/wfxt-timer";

fn vector() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/q111m72-a64fx.bin"
    );
    std::fs::read(path).unwrap()
}

/// Decode `input`, let `edit` change the device state, and return the re-encoded stream.
fn rewrite(
    input: &[u8],
    mut edit: impl FnMut(&mut migproxy_codec::DeviceState),
) -> Result<Vec<u8>, DecodeError> {
    decode_chunked(
        input,
        Limits::default(),
        || usize::MAX,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                edit(state);
            }
        },
    )
    .map(|(out, _)| out)
}

fn layout(input: &[u8]) -> (Vec<CpuRegisters>, Vec<CpuSubsection>, String) {
    let mut found = None;
    rewrite(input, |state| {
        found = Some((state.cpus(), state.cpu_subsections()));
    })
    .unwrap();
    let (cpus, subs) = found.unwrap();
    (cpus, subs, description(input))
}

/// The description text at the end of a stream.
fn description(input: &[u8]) -> String {
    let start = (0..input.len() - 6)
        .rev()
        .find(|&k| {
            input[k] == 0
                && input[k + 1] == 6
                && u32::from_be_bytes(input[k + 2..k + 6].try_into().unwrap()) as usize
                    == input.len() - k - 6
        })
        .unwrap();
    String::from_utf8(input[start + 6..].to_vec()).unwrap()
}

fn names(subs: &[CpuSubsection], instance: u32) -> Vec<&str> {
    subs.iter()
        .filter(|s| s.instance == instance)
        .map(|s| s.name.as_str())
        .collect()
}

#[test]
fn real_11_1_cpu_sections_list_their_subsections() {
    let (cpus, subs, _) = layout(&vector());
    assert_eq!(cpus.len(), 2);
    for cpu in &cpus {
        assert_eq!(
            names(&subs, cpu.instance),
            ["cpu/vfp", "cpu/sve", "cpu/irq-line-state", WFXT]
        );
    }
    // The idle timer: timer_put writes -1 for a timer that is not pending.
    let wfxt: Vec<&CpuSubsection> = subs.iter().filter(|s| s.name == WFXT).collect();
    assert_eq!(wfxt.len(), 2);
    for sub in wfxt {
        assert_eq!(sub.version, 1);
        assert_eq!(&sub.payload[..], &[0xff; 8]);
    }
}

#[test]
fn removing_wfxt_timer_gives_an_exact_stream_without_it() {
    let input = vector();
    let (cpus, subs, desc) = layout(&input);
    let out = rewrite(&input, |state| {
        for instance in [0, 1] {
            state.remove_cpu_subsection(instance, WFXT).unwrap();
        }
        // Removed once: a second removal is a specific error.
        let again = state.remove_cpu_subsection(0, WFXT).unwrap_err();
        assert!(again.to_string().contains(WFXT), "{again}");
    })
    .unwrap();
    let (cpus_after, subs_after, desc_after) = layout(&out);
    assert_eq!(cpus_after, cpus, "cpreg arrays unchanged");
    let kept: Vec<&CpuSubsection> = subs.iter().filter(|s| s.name != WFXT).collect();
    assert_eq!(subs_after.iter().collect::<Vec<_>>(), kept);
    // Each removal: 05, counted name (1 + 14), be32 version, 8 payload bytes; plus the
    // description object and its separator.
    let wire_removed = 2 * (1 + 1 + WFXT.len() + 4 + 8);
    let desc_removed = desc.len() - desc_after.len();
    assert_eq!(input.len() - out.len(), wire_removed + desc_removed);
    assert!(desc.contains(WFXT) && !desc_after.contains(WFXT));
    assert!(!out.windows(WFXT.len()).any(|w| w == WFXT.as_bytes()));
    // The rest of the description is intact (and `layout` above walked the stream with it): the
    // kept subsections are still described once per vCPU.
    for kept in ["cpu/vfp", "cpu/sve", "cpu/irq-line-state"] {
        let quoted = format!("\"{kept}\"");
        assert_eq!(desc_after.matches(&quoted).count(), 2, "{kept}");
    }
}

#[test]
fn removal_combines_with_a_cpreg_rewrite_and_a_middle_subsection() {
    let input = vector();
    let (cpus, _, _) = layout(&input);
    let shorter: Vec<(u64, u64)> = cpus[1].registers[1..].to_vec();
    let out = rewrite(&input, |state| {
        state.set_cpregs(1, &shorter).unwrap();
        state.remove_cpu_subsection(1, WFXT).unwrap();
        // A subsection in the middle of the list (the separator logic on both sides).
        state.remove_cpu_subsection(0, "cpu/sve").unwrap();
    })
    .unwrap();
    let (cpus_after, subs_after, _) = layout(&out);
    assert_eq!(cpus_after[0], cpus[0]);
    assert_eq!(cpus_after[1].registers, shorter);
    assert_eq!(
        names(&subs_after, 0),
        ["cpu/vfp", "cpu/irq-line-state", WFXT]
    );
    assert_eq!(
        names(&subs_after, 1),
        ["cpu/vfp", "cpu/sve", "cpu/irq-line-state"]
    );
}

#[test]
fn wire_len_counts_what_encode_writes_after_every_edit() {
    // `wire_len` adds up the edits' sizes without building them: after each kind of edit it
    // must still be the length `to_bytes` produces.
    let input = vector();
    let (cpus, _, _) = layout(&input);
    let mut checked = 0;
    rewrite(&input, |state| {
        let check = |state: &migproxy_codec::DeviceState| {
            assert_eq!(state.wire_len(), state.to_bytes().len());
        };
        check(state);
        // 3 digits -> fewer (a shorter array_len number), and a longer list (more digits kept).
        state.set_cpregs(0, &cpus[0].registers[..7]).unwrap();
        check(state);
        let mut longer = cpus[1].registers.clone();
        longer.push((u64::MAX, 1));
        state.set_cpregs(1, &longer).unwrap();
        check(state);
        state.remove_cpu_subsection(0, "cpu/sve").unwrap();
        check(state);
        // Every subsection of vCPU 1: the description's array becomes empty.
        for name in ["cpu/vfp", "cpu/sve", "cpu/irq-line-state", WFXT] {
            state.remove_cpu_subsection(1, name).unwrap();
            check(state);
        }
        checked += 1;
    })
    .unwrap();
    assert_eq!(checked, 1);
}
