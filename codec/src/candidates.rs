//! Finding where the held device-state phase may end, with a few checks per read.
//!
//! The phase ends with `00 (EOF) | 06 (VMDESCRIPTION) | be32 len | {json of len bytes}`, and the
//! decoder only considers an ending that coincides with the end of the bytes received so far (the
//! real description is the last thing on the channel). Looking backwards from the end of the
//! buffer for a JSON object on every read would let a peer sending `}` one byte at a time cause
//! quadratic work; visiting every `{` of the held bytes costs work per `{` (the ~28 KB description
//! of four vCPUs has hundreds) while both QEMUs are stopped.
//!
//! Instead, one fact: a JSON text never contains a raw 0x00 byte, and every header starts with
//! one (the EOF byte). So for a candidate `00 06 <len> {` whose text runs to the end of the held
//! bytes, the last NUL byte held is its EOF byte or one of the four length bytes after it: no NUL
//! may follow its `{`. Hence the EOF byte of any ending that can be valid lies among the six
//! positions up to and including the last NUL. Each read does one `memrchr` over the bytes that
//! arrived to keep the last NUL current, then checks those (at most six) positions for a header
//! whose announced end is exactly the end of the held bytes; the first such one wins.
//!
//! This decides exactly what a byte-by-byte scan decides that keeps every candidate alive from
//! its `{` until a NUL follows it or its end passes (the tests keep that scan as an oracle): a
//! candidate the scan would have dropped for a NUL is outside the six positions, one dropped for
//! a passed end cannot end here, and the scan never had more alive than the six positions hold.
//! Each viable candidate's text lies between two NUL bytes, so parsing all the candidates that
//! are ever tried costs at most a small multiple of the held bytes.

use crate::wire::{QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION};

/// `00 06 <be32 len>`: the description's `{` follows this many header bytes.
const HEADER_LEN: usize = 6;
/// The shortest description text the scan considers (`{}`).
const MIN_DESCRIPTION: usize = 2;

/// Incremental candidate scanner over the held bytes (positions relative to the first held byte).
#[derive(Debug, Default)]
pub(crate) struct CandidateScanner {
    /// Held bytes already examined.
    scanned: usize,
    /// Position of the last NUL byte among them: every live candidate's EOF byte is at most
    /// five bytes before it.
    last_nul: Option<usize>,
    /// Bytes examined over the scanner's life (for the work-per-byte tests).
    examined: u64,
}

impl CandidateScanner {
    /// Examine the bytes of `held` not seen yet; if a candidate's description ends exactly at
    /// the end of `held`, return the position of its be32 length (EOF + 2).
    ///
    /// The new bytes are searched for their last NUL with `memrchr` (whole words at a time,
    /// from the end): this runs while both QEMUs are stopped.
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
        if let Some(offset) = memchr::memrchr(0, new) {
            self.last_nul = Some(start + offset);
        }
        self.examined += new.len() as u64;
        self.scanned = held.len();
        let last_nul = self.last_nul?;
        // Lowest position first: the one the byte-by-byte scan found first.
        (last_nul.saturating_sub(HEADER_LEN - 1)..=last_nul)
            .find_map(|eof_pos| ending_at(held, eof_pos, max_description))
    }

    /// Bytes examined so far.
    pub(crate) fn examined(&self) -> u64 {
        self.examined
    }
}

/// The position of the be32 length if `held` has a description header at `eof_pos` whose text
/// ends exactly at the end of `held`.
fn ending_at(held: &[u8], eof_pos: usize, max_description: usize) -> Option<usize> {
    let brace = eof_pos.checked_add(HEADER_LEN)?;
    let header = held.get(eof_pos..=brace)?;
    let &[QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, a, b, c, d, b'{'] = header else {
        return None;
    };
    let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).ok()?;
    let fits = (MIN_DESCRIPTION..=max_description).contains(&len);
    (fits && brace.checked_add(len) == Some(held.len())).then_some(eof_pos + 2)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

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
        held.push(b'}');
        assert_eq!(s.advance(&held, 1 << 20), None);
    }

    #[test]
    fn length_bytes_that_are_nul_keep_the_candidate() {
        // `00 06 00 00 00 03 {`: the last NUL is the third length byte, four after EOF.
        let held = with_description(b"\x00\x00", b"{ }");
        let mut s = CandidateScanner::default();
        assert_eq!(s.advance(&held, 1 << 20), Some(4));
    }

    #[test]
    fn a_length_whose_last_byte_is_nul_keeps_the_candidate() {
        // `00 06 00 00 01 00 {`: the last NUL is the last length byte, five after EOF.
        let held = with_description(b"", &[b'{'; 256]);
        let mut s = CandidateScanner::default();
        assert_eq!(s.advance(&held[..100], 1 << 20), None);
        assert_eq!(s.advance(&held, 1 << 20), Some(2));
    }

    #[test]
    fn an_announced_length_over_the_budget_is_not_a_candidate() {
        let held = with_description(b"", &[b'{'; 40]);
        let mut s = CandidateScanner::default();
        assert_eq!(s.advance(&held, 39), None);
        let mut s = CandidateScanner::default();
        assert_eq!(s.advance(&held, 40), Some(2));
    }

    /// The scans this module replaced, kept as the oracles the few-checks scan must agree with.
    mod oracle {
        use crate::wire::{QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION};

        #[derive(Debug, Clone, Copy)]
        struct Candidate {
            eof_pos: usize,
            end: usize,
        }

        /// Headers overlapping one NUL byte: more cannot be alive at once; a bound all the same.
        const MAX_ALIVE: usize = 8;

        /// Visits every `{` of the new bytes; each NUL drops the candidates whose `{` is before it.
        #[derive(Debug, Default)]
        pub struct BraceScanner {
            scanned: usize,
            alive: Vec<Candidate>,
        }

        impl BraceScanner {
            pub fn advance(&mut self, held: &[u8], max_description: usize) -> Option<usize> {
                let start = self.scanned;
                let new = held.get(start..).unwrap_or_default();
                if new.is_empty() {
                    return None;
                }
                let mut checked = start;
                for offset in memchr::memchr_iter(b'{', new) {
                    let i = start + offset;
                    self.kill_after_nul(&held[checked..i], checked);
                    checked = i;
                    if i < 6 {
                        continue;
                    }
                    if let [QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, a, b, c, d] = held[i - 6..i] {
                        let len = u32::from_be_bytes([a, b, c, d]) as usize;
                        if (2..=max_description).contains(&len) && self.alive.len() < MAX_ALIVE {
                            self.alive.push(Candidate {
                                eof_pos: i - 6,
                                end: i + len,
                            });
                        }
                    }
                }
                self.kill_after_nul(&held[checked..], checked);
                self.scanned = held.len();
                let end = held.len();
                self.alive.retain(|c| c.end >= end);
                self.alive
                    .iter()
                    .find(|c| c.end == end)
                    .map(|c| c.eof_pos + 2)
            }

            fn kill_after_nul(&mut self, bytes: &[u8], at: usize) {
                if let Some(offset) = memchr::memrchr(0, bytes) {
                    let nul = at + offset;
                    self.alive.retain(|c| c.eof_pos + 6 > nul);
                }
            }
        }

        /// The scan as it was written first, one byte at a time; one result per cut.
        pub fn bytewise(held: &[u8], cuts: &[usize], max_description: usize) -> Vec<Option<usize>> {
            let mut alive: Vec<Candidate> = Vec::new();
            let mut scanned = 0;
            let mut results = Vec::new();
            for &cut in cuts {
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
    }

    type Reads = Vec<Option<usize>>;

    /// The scanner and the brace-visiting oracle read by read over `held` cut at `cuts`
    /// (non-decreasing, each at most its length): (scanner's results, oracle's results).
    fn read_by_read(held: &[u8], cuts: &[usize], max_description: usize) -> (Reads, Reads) {
        let mut scanner = CandidateScanner::default();
        let mut oracle = oracle::BraceScanner::default();
        let mut got = Vec::new();
        let mut want = Vec::new();
        for &cut in cuts {
            got.push(scanner.advance(&held[..cut], max_description));
            want.push(oracle.advance(&held[..cut], max_description));
        }
        // Each byte examined once, however the reads were cut.
        assert_eq!(scanner.examined(), cuts.last().copied().unwrap_or(0) as u64);
        (got, want)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn agrees_with_both_oracles(
            // Few distinct bytes, so headers, braces and NULs meet often.
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::collection::vec(proptest::sample::select(vec![0u8, 6, 1, b'{', b'}', b'a']), 0..12),
                    (0u32..24, proptest::collection::vec(proptest::sample::select(vec![0u8, 6, b'{', b'}', b'x']), 0..24))
                        .prop_map(|(len, body)| {
                            let mut v = vec![0u8, 6];
                            v.extend_from_slice(&len.to_be_bytes());
                            v.push(b'{');
                            v.extend_from_slice(&body);
                            v
                        }),
                    // Lengths with NUL low bytes (256, 512): the last NUL five bytes after EOF.
                    (proptest::sample::select(vec![256u32, 512]), proptest::collection::vec(proptest::sample::select(vec![b'{', b'x']), 250..262), 0usize..2)
                        .prop_map(|(len, body, nul)| {
                            let mut v = vec![0u8, 6];
                            v.extend_from_slice(&len.to_be_bytes());
                            v.push(b'{');
                            v.extend_from_slice(&body);
                            v.extend(std::iter::repeat_n(0u8, nul));
                            v
                        }),
                    // Headers overlapping each other and the length bytes of the one before.
                    proptest::collection::vec(proptest::sample::select(vec![0u8, 6, 2, 3, b'{']), 6..16),
                ],
                0..16,
            ),
            // Equal cuts are reads that brought nothing.
            cuts in proptest::collection::vec(0usize..400, 0..12),
            max_description in proptest::sample::select(vec![2usize, 3, 8, 20, 1 << 20]),
        ) {
            let held: Vec<u8> = parts.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(held.len())).collect();
            cuts.push(held.len());
            cuts.sort_unstable();
            let (got, want) = read_by_read(&held, &cuts, max_description);
            proptest::prop_assert_eq!(&got, &want);
            proptest::prop_assert_eq!(&got, &oracle::bytewise(&held, &cuts, max_description));
        }
    }

    fn vectors() -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|path| (path.display().to_string(), std::fs::read(&path).unwrap()))
            .collect()
    }

    /// A small deterministic PRNG (xorshift), so failures reproduce.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Read boundaries for a whole captured stream: reads of `large` bytes up to its last 80 KiB
    /// (the device state and description), then reads of 1 to `small` bytes, now and then one
    /// that brought nothing.
    fn chunking(len: usize, large: usize, small: usize, seed: u64) -> Vec<usize> {
        let mut rng = seed | 1;
        let mut cuts = Vec::new();
        let mut at = 0;
        let tail = len.saturating_sub(80 << 10);
        while at < len {
            let r = next(&mut rng);
            let step = if at < tail {
                large
            } else {
                1 + (r % small as u64) as usize
            };
            at = (at + step).min(len);
            cuts.push(at);
            if r.is_multiple_of(7) {
                cuts.push(at);
            }
        }
        cuts
    }

    /// The real description's header: (EOF position, text length) of the ending at the very end.
    fn real_ending(stream: &[u8]) -> Option<(usize, usize)> {
        let len_pos = oracle::BraceScanner::default().advance(stream, 16 << 20)?;
        Some((len_pos - 2, stream.len() - (len_pos + 4)))
    }

    /// Damaged variants of a captured stream: its description header and text, and bytes
    /// anywhere in its last 64 KiB (device state and description).
    fn damaged(stream: &[u8], seed: u64) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some((eof, len)) = real_ending(stream) {
            let brace = eof + HEADER_LEN;
            let mut set = |what: &str, at: usize, byte: u8| {
                let mut v = stream.to_vec();
                v[at] = byte;
                out.push((what.to_string(), v));
            };
            set("length + 1", eof + 5, stream[eof + 5].wrapping_add(1));
            set("length - 1", eof + 5, stream[eof + 5].wrapping_sub(1));
            set("NUL in the text", brace + len / 2, 0);
            set("NUL as the last byte", stream.len() - 1, 0);
            set("EOF byte not NUL", eof, 1);
            set("not VMDESCRIPTION", eof + 1, 7);
            set("no brace", brace, b'[');
            set("length byte 0 not NUL", eof + 2, 1);
            let mut v = stream[..stream.len() - 1].to_vec();
            out.push(("truncated by one".into(), v.clone()));
            v.extend_from_slice(b"}}");
            out.push(("one byte too many".into(), v));
            let mut v = stream.to_vec();
            v.extend_from_slice(&[0, 6, 0, 0, 0, 2, b'{', b'}']);
            out.push(("a second ending appended".into(), v));
            // A forged header inside the text, announcing the same end as the real one.
            let mut v = stream.to_vec();
            let at = stream.len() - 40;
            v[at..at + 7].copy_from_slice(&[0, 6, 0, 0, 0, 34, b'{']);
            out.push(("a forged ending inside the text".into(), v));
        }
        let mut rng = seed | 1;
        for i in 0..16 {
            let r = next(&mut rng);
            let mut v = stream.to_vec();
            let back = 1 + (r >> 8) as usize % (64 << 10).min(stream.len());
            let at = stream.len() - back;
            v[at] = match i % 4 {
                0 => 0,
                1 => 6,
                2 => b'{',
                _ => v[at] ^ (1 << (r % 8)),
            };
            out.push((format!("byte {at} changed"), v));
        }
        out
    }

    #[test]
    fn agrees_with_the_brace_scan_on_captured_streams_and_their_damage() {
        let vectors = vectors();
        assert!(!vectors.is_empty(), "codec/tests/vectors/ holds no *.bin");
        let (mut endings_found, mut endings_expected) = (0, 0);
        for (index, (name, stream)) in vectors.iter().enumerate() {
            let seed = index as u64 * 0x9e37_79b9 + 1;
            // A postcopy stream's description travels inside its package, not at the end.
            let ends_with_description = !name.contains("postcopy");
            let mut variants = vec![("as captured".to_string(), stream.clone())];
            variants.extend(damaged(stream, seed));
            for (what, bytes) in &variants {
                // One byte per read over the last 80 KiB only as captured (the decoder's worst
                // case, and slow in a debug build); damaged variants in reads of up to 16 bytes.
                let smallest = if what == "as captured" { 1 } else { 16 };
                for (large, small) in [(1 << 16, smallest), (9000, 300), (bytes.len(), 4096)] {
                    let cuts = chunking(bytes.len(), large, small, seed);
                    let (got, want) = read_by_read(bytes, &cuts, 16 << 20);
                    assert!(got == want, "{name}, {what}, reads of {large}/{small}");
                    if what == "as captured" && ends_with_description {
                        endings_expected += 1;
                        let real = real_ending(bytes).map(|(eof, _)| eof + 2);
                        // The read that brought the last byte (a later one brought nothing).
                        let complete = cuts.iter().position(|&cut| cut == bytes.len());
                        if real.is_some() && complete.and_then(|i| got.get(i)) == Some(&real) {
                            endings_found += 1;
                        }
                    }
                }
            }
        }
        // Not vacuous: every captured stream that ends with its description was found there,
        // however it was read.
        assert_eq!(endings_found, endings_expected);
        assert!(endings_expected > 0);
    }
}
