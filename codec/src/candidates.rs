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
    pub(crate) fn advance(&mut self, held: &[u8], max_description: usize) -> Option<usize> {
        let new = held.get(self.scanned..).unwrap_or_default();
        if new.is_empty() {
            // Nothing arrived since the last call: any ending here has been tried already.
            return None;
        }
        for (offset, &byte) in new.iter().enumerate() {
            let i = self.scanned + offset;
            if byte == 0 {
                // A NUL inside a candidate's text: not JSON.
                self.alive.retain(|c| c.eof_pos + 6 > i);
            }
            if byte == b'{' && i >= 6 {
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
        }
        self.examined += new.len() as u64;
        self.scanned = held.len();
        let end = held.len();
        self.alive.retain(|c| c.end >= end);
        self.alive
            .iter()
            .find(|c| c.end == end)
            .map(|c| c.eof_pos + 2)
    }

    /// Bytes examined so far.
    pub(crate) fn examined(&self) -> u64 {
        self.examined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
