//! The walk with a compiled plan (what a description-cache hit uses) against the walk that looks
//! every description key up: the same layout, or the same error at the same offset with the same
//! message, on the device phase of every real capture in `tests/vectors` (see its README) and on
//! damaged copies of each (flipped, removed and inserted bytes in the sections, the sections cut short; changed digits
//! in the description).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use migproxy_codec::testing::walk_by_lookup_and_plan;
use migproxy_codec::{Frame, Limits};

mod common;

/// Where a held device phase sits in the stream, for the errors' offsets (any value will do:
/// both walks get the same).
const BASE_OFFSET: u64 = 1_000;

/// Positions to damage in `len` bytes: `count` spread evenly, and every byte of the first 64.
fn positions(len: usize, count: usize) -> Vec<usize> {
    let step = (len / count).max(1);
    let mut out: Vec<usize> = (0..len.min(64)).collect();
    out.extend((0..len).step_by(step).skip(1));
    out
}

/// Counts of what the comparisons found, so that the test fails if it compared nothing.
#[derive(Default, Debug)]
struct Compared {
    layouts: usize,
    errors: usize,
}

impl Compared {
    fn check(&mut self, what: &str, held: &[u8], desc_len_pos: usize) {
        let Some((lookup, planned)) =
            walk_by_lookup_and_plan(held, BASE_OFFSET, desc_len_pos, &Limits::default())
        else {
            return;
        };
        assert_eq!(lookup, planned, "{what}");
        if lookup.starts_with("Ok(") {
            self.layouts += 1;
        } else {
            self.errors += 1;
        }
    }
}

/// Every device phase of the real captures: (vector name, held bytes, description length position).
fn device_phases() -> Vec<(String, Vec<u8>, usize)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .collect();
    names.sort();
    let mut phases = Vec::new();
    for path in names {
        let input = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut found = Vec::new();
        common::decode_chunked(
            &input,
            Limits::default(),
            || usize::MAX,
            |frame| {
                if let Frame::DeviceState(state) = frame {
                    let held = state.to_bytes().to_vec();
                    let desc_len_pos = held.len() - state.description_json().len() - 4;
                    found.push((held, desc_len_pos));
                }
            },
        )
        .unwrap_or_else(|err| panic!("{name}: {err}"));
        phases.extend(found.into_iter().map(|(h, p)| (name.clone(), h, p)));
    }
    phases
}

#[test]
fn plan_and_lookup_walk_every_capture_the_same() {
    let phases = device_phases();
    // Postcopy streams carry theirs in a package; every other capture has one.
    assert!(phases.len() >= 15, "only {} device phases", phases.len());
    let mut compared = Compared::default();
    for (name, held, desc_len_pos) in &phases {
        compared.check(name, held, *desc_len_pos);
    }
    assert_eq!(compared.layouts, phases.len(), "{compared:?}");
}

#[test]
fn plan_and_lookup_refuse_damaged_sections_the_same() {
    let mut compared = Compared::default();
    for (name, held, desc_len_pos) in device_phases() {
        let sections_end = desc_len_pos - 2;
        for pos in positions(sections_end, 150) {
            let mut flipped = held.clone();
            flipped[pos] ^= 0xff;
            compared.check(
                &format!("{name}: byte {pos} flipped"),
                &flipped,
                desc_len_pos,
            );

            let mut removed = held.clone();
            removed.remove(pos);
            compared.check(
                &format!("{name}: byte {pos} removed"),
                &removed,
                desc_len_pos - 1,
            );

            // The sections cut short at `pos`: the walk runs out inside a field or header.
            let mut truncated = held[..pos].to_vec();
            truncated.extend_from_slice(&held[sections_end..]);
            compared.check(
                &format!("{name}: sections cut at {pos}"),
                &truncated,
                pos + 2,
            );

            let mut inserted = held.clone();
            inserted.insert(pos, 0x05);
            compared.check(
                &format!("{name}: byte inserted at {pos}"),
                &inserted,
                desc_len_pos + 1,
            );
        }
    }
    // Every damage above changes what the walk reads; most must be refused, by both alike.
    assert!(compared.errors > 1_000, "{compared:?}");
}

#[test]
fn plan_and_lookup_walk_changed_descriptions_the_same() {
    let mut compared = Compared::default();
    for (name, held, desc_len_pos) in device_phases() {
        let json_start = desc_len_pos + 4;
        let digits: Vec<usize> = (json_start..held.len())
            .filter(|&pos| held[pos].is_ascii_digit())
            .collect();
        let step = (digits.len() / 60).max(1);
        for &pos in digits.iter().step_by(step) {
            for replacement in [b'0', b'9'] {
                if held[pos] == replacement {
                    continue;
                }
                let mut changed = held.clone();
                changed[pos] = replacement;
                compared.check(
                    &format!(
                        "{name}: description digit at {pos} -> {}",
                        replacement as char
                    ),
                    &changed,
                    desc_len_pos,
                );
            }
        }
    }
    // A changed size or count moves every later field: refused, by both alike; a changed
    // instance or version number of a device not checked that way may still walk.
    assert!(compared.errors > 100, "{compared:?}");
    assert!(compared.layouts > 0, "{compared:?}");
}
