//! Finding where the held device-state phase may end, with constant work per received byte.
//!
//! The phase ends with `00 (EOF) | 06 (VMDESCRIPTION) | be32 len | {json of len bytes}`, and the
//! decoder only considers an ending that coincides with the end of the bytes received so far (the
//! real description is the last thing on the channel). Instead of looking backwards from the end
//! of the buffer on every read (which a peer sending `}` one byte at a time turns into quadratic
//! work), the scanner looks at every held byte exactly once, as it arrives, and remembers the
//! *candidates*: positions where `00 06 <be32 len> {` starts, with the end their length announces.
//!
//! A JSON text never contains a raw 0x00 byte, so a NUL byte inside a candidate's text rules the
//! candidate out; every candidate header starts with 0x00, so at most a handful of candidates are
//! alive at any time (those whose header overlaps the last NUL). Candidates whose announced end
//! has passed without a read ending there are dropped. Each viable candidate's text lies between
//! two NUL bytes, so parsing all the candidates that are ever tried costs at most a small
//! multiple of the held bytes.

use crate::wire::{QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION};

/// A possible ending: EOF at `eof_pos`, description text up to `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    eof_pos: usize,
    end: usize,
}

/// Headers overlapping one NUL byte: more cannot be alive at once; a bound all the same.
const MAX_ALIVE: usize = 8;

/// Incremental candidate scanner over the held bytes (positions relative to the first held byte).
#[derive(Debug, Default)]
pub(crate) struct CandidateScanner {
    /// Held bytes already examined.
    scanned: usize,
    alive: Vec<Candidate>,
    /// Bytes examined over the scanner's life (for the work-per-byte tests).
    examined: u64,
}

impl CandidateScanner {
    /// Examine the bytes of `held` not seen yet; if a candidate's description ends exactly at
    /// the end of `held`, return the position of its be32 length (EOF + 2).
    ///
    /// The new bytes are searched for `{` and NUL with `memchr` (whole words at a time) rather
    /// than looked at one by one: this runs while both QEMUs are stopped. What a byte-by-byte
    /// scan would decide is kept exactly: a candidate dies at the first NUL after its `{`, and at
    /// most [`MAX_ALIVE`] are alive when one is added.
    // A function of its own in the binary: the switchover benchmark counts the hold path by
    // function (bench/tools/switchover_instructions.py), and this is one of them.
    #[inline(never)]
    pub(crate) fn advance(&mut self, held: &[u8], max_description: usize) -> Option<usize> {
        let start = self.scanned;
        let new = held.get(start..).unwrap_or_default();
        if new.is_empty() {
            // Nothing arrived since the last call: any ending here has been tried already.
            return None;
        }
        // Every NUL before `checked` has been applied to `alive`.
        let mut checked = start;
        for offset in memchr::memchr_iter(b'{', new) {
            let i = start + offset;
            self.kill_after_nul(held.get(checked..i).unwrap_or_default(), checked);
            checked = i;
            if i < 6 {
                continue;
            }
            let header = held.get(i - 6..i);
            if let Some(&[QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, a, b, c, d]) = header {
                let len = u32::from_be_bytes([a, b, c, d]);
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if (2..=max_description).contains(&len) && self.alive.len() < MAX_ALIVE {
                    self.alive.push(Candidate {
                        eof_pos: i - 6,
                        end: i + len,
                    });
                }
            }
        }
        self.kill_after_nul(held.get(checked..).unwrap_or_default(), checked);
        self.examined += new.len() as u64;
        self.scanned = held.len();
        let end = held.len();
        self.alive.retain(|c| c.end >= end);
        self.alive
            .iter()
            .find(|c| c.end == end)
            .map(|c| c.eof_pos + 2)
    }

    /// A NUL inside a candidate's text (after its `{`) rules it out: JSON has no NUL byte.
    /// `bytes` start at held position `at`; only their last NUL matters.
    fn kill_after_nul(&mut self, bytes: &[u8], at: usize) {
        if self.alive.is_empty() {
            return;
        }
        if let Some(offset) = memchr::memrchr(0, bytes) {
            let nul = at + offset;
            self.alive.retain(|c| c.eof_pos + 6 > nul);
        }
    }

    /// Bytes examined so far.
    pub(crate) fn examined(&self) -> u64 {
        self.examined
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Strategy;

    fn with_description(prefix: &[u8], json: &[u8]) -> Vec<u8> {
        let mut v = prefix.to_vec();
        v.extend_from_slice(&[0, 6]);
        v.extend_from_slice(&u32::try_from(json.len()).unwrap_or(0).to_be_bytes());
        v.extend_from_slice(json);
        v
    }

    #[test]
    fn finds_an_ending_at_the_end_only() {
        let held = with_description(b"\x04abc", br#"{"a": "}{"}"#);
        let mut s = CandidateScanner::default();
        assert_eq!(s.advance(&held[..held.len() - 1], 1 << 20), None);
        assert_eq!(s.advance(&held, 1 << 20), Some(6));
        // Examined each byte once, however it was split.
        assert_eq!(s.examined(), held.len() as u64);
    }

    #[test]
    fn a_nul_inside_the_text_rules_a_candidate_out() {
        let held = with_description(b"", b"{\x00}");
        let mut s = CandidateScanner::default();
        assert_eq!(s.advance(&held, 1 << 20), None);
    }

    #[test]
    fn a_passed_end_is_dropped() {
        let mut held = with_description(b"", b"{}");
        let mut s = CandidateScanner::default();
        held.push(b' ');
        assert_eq!(s.advance(&held, 1 << 20), None);
        assert!(s.alive.is_empty());
    }

    /// The scan as it was written first, one byte at a time: the fast scan must agree with it.
    fn bytewise(held: &[u8], splits: &[usize], max_description: usize) -> Vec<Option<usize>> {
        let mut alive: Vec<Candidate> = Vec::new();
        let mut scanned = 0;
        let mut results = Vec::new();
        for &cut in splits.iter().chain([held.len()].iter()) {
            let cut = cut.min(held.len());
            if cut <= scanned {
                results.push(None);
                continue;
            }
            for i in scanned..cut {
                let byte = held[i];
                if byte == 0 {
                    alive.retain(|c| c.eof_pos + 6 > i);
                }
                if byte == b'{' && i >= 6 {
                    if let [QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, a, b, c, d] = held[i - 6..i] {
                        let len = u32::from_be_bytes([a, b, c, d]) as usize;
                        if (2..=max_description).contains(&len) && alive.len() < MAX_ALIVE {
                            alive.push(Candidate {
                                eof_pos: i - 6,
                                end: i + len,
                            });
                        }
                    }
                }
            }
            scanned = cut;
            alive.retain(|c| c.end >= cut);
            results.push(alive.iter().find(|c| c.end == cut).map(|c| c.eof_pos + 2));
        }
        results
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_bytewise_scan(
            // Few distinct bytes, so headers, braces and NULs meet often.
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::collection::vec(proptest::sample::select(vec![0u8, 6, 1, b'{', b'}', b'a']), 0..12),
                    (0u32..24, proptest::collection::vec(proptest::sample::select(vec![0u8, b'{', b'}', b'x']), 0..24))
                        .prop_map(|(len, body)| {
                            let mut v = vec![0u8, 6];
                            v.extend_from_slice(&len.to_be_bytes());
                            v.push(b'{');
                            v.extend_from_slice(&body);
                            v
                        }),
                ],
                0..16,
            ),
            splits in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let held: Vec<u8> = parts.concat();
            let mut splits = splits;
            splits.sort_unstable();
            let want = bytewise(&held, &splits, 20);
            let mut scanner = CandidateScanner::default();
            let mut got = Vec::new();
            for &cut in splits.iter().chain([held.len()].iter()) {
                let cut = cut.min(held.len());
                got.push(scanner.advance(&held[..cut.max(scanner.scanned)], 20));
            }
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(scanner.examined(), held.len() as u64);
        }
    }
}
