//! The description cache: a description byte-for-byte equal to the cached one is not parsed (nor
//! checked against the same reference) again, and that changes nothing the decoder produces.
//! Real captures (`tests/vectors`, see its README).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use migproxy_codec::{
    DecodeError, DescriptionCache, Frame, Limits, ReferenceDescription, StreamDecoder,
};
use tokio_util::codec::Decoder;

mod common;

/// What one decode produced: the re-encoded output with the cpregs of vCPU 0 rewritten (so the
/// layout's spans are used), the layout as the decoder found it, and how many descriptions it
/// reused.
#[derive(Debug, PartialEq)]
struct Outcome {
    out: Vec<u8>,
    layout: String,
    reused: u64,
}

fn decode(input: &[u8], decoder: StreamDecoder) -> Result<Outcome, DecodeError> {
    let mut layout = String::new();
    let mut said_reused = 0;
    let on_frame = |frame: &mut Frame| {
        if let Frame::DeviceState(state) = frame {
            said_reused += u64::from(state.description_reused());
            layout = format!(
                "{:?} {:?} {:?} {}",
                state.sections(),
                state.cpus(),
                state.cpu_subsections(),
                state.is_confirmed()
            );
            let cpus = state.cpus();
            let first = cpus.first().expect("a vCPU");
            let regs: Vec<(u64, u64)> = first
                .registers
                .iter()
                .take(first.registers.len() - 1)
                .copied()
                .collect();
            state.set_cpregs(first.instance, &regs).unwrap();
        }
    };
    let (out, decoder) = common::decode_chunked_with(decoder, input, || usize::MAX, on_frame)?;
    // The device state says what the decoder counted (the proxy logs it from there).
    assert_eq!(said_reused, decoder.work().descriptions_reused);
    Ok(Outcome {
        out,
        layout,
        reused: decoder.work().descriptions_reused,
    })
}

fn vector(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The description text a stream ends with (QEMU_VM_VMDESCRIPTION's JSON: the last `{` at
/// nesting zero is where the decoder's candidate lies; found here as the decoder reports it).
fn description_of(input: &[u8]) -> Vec<u8> {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = BytesMut::from(input);
    let mut description = None;
    while let Some(frame) = decoder.decode(&mut buf).unwrap() {
        if let Frame::DeviceState(state) = frame {
            description = Some(state.description_json().to_vec());
        }
    }
    description.expect("no device state")
}

fn checking(cache: &DescriptionCache) -> StreamDecoder {
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_checking_relay(true);
    decoder.set_description_cache(cache.clone());
    decoder
}

fn referenced(reference: &ReferenceDescription, cache: Option<&DescriptionCache>) -> StreamDecoder {
    let mut decoder = StreamDecoder::new(Limits::default());
    decoder.set_reference_description(reference.clone());
    if let Some(cache) = cache {
        decoder.set_description_cache(cache.clone());
    }
    decoder
}

/// `input` with one byte of its description changed, the stream still valid: the first letter of
/// the first field name of the first device (names are not in the stream's bytes), so the layout
/// differs from the original's.
fn one_byte_differs(input: &[u8]) -> Vec<u8> {
    let description = description_of(input);
    let start = input.len() - description.len();
    let devices = find(&description, b"\"devices\"").expect("a devices array");
    let fields = devices + find(&description[devices..], b"\"fields\"").expect("a fields array");
    let name = fields + find(&description[fields..], b"\"name\":").expect("a field name");
    let quote = name + 7 + find(&description[name + 7..], b"\"").expect("its value");
    let mut changed = input.to_vec();
    let at = start + quote + 1;
    changed[at] = if changed[at] == b'X' { b'Y' } else { b'X' };
    changed
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn a_checking_relay_reuses_the_second_time_with_the_same_result() {
    for name in ["q10-a64fx.bin", "q72-a57.bin", "q10m72-max.bin"] {
        let input = vector(name);
        let plain = {
            let mut decoder = StreamDecoder::new(Limits::default());
            decoder.set_checking_relay(true);
            decode(&input, decoder).unwrap()
        };
        assert_eq!(plain.reused, 0);
        let cache = DescriptionCache::new();
        assert_eq!(
            cache.cached_len(),
            None,
            "a checking relay's cache starts empty"
        );
        let first = decode(&input, checking(&cache)).unwrap();
        assert_eq!(first.reused, 0, "{name}: the first migration parses");
        assert_eq!(cache.cached_len(), Some(description_of(&input).len()));
        let second = decode(&input, checking(&cache)).unwrap();
        assert_eq!(second.reused, 1, "{name}: the second migration reuses");
        assert!(!plain.layout.is_empty());
        assert!(
            first
                == Outcome {
                    reused: 0,
                    ..second
                },
            "{name}: hit and miss differ"
        );
        let third = decode(&input, checking(&cache)).unwrap();
        assert!(
            plain == Outcome { reused: 0, ..third },
            "{name}: cache and none differ"
        );
    }
}

#[test]
fn a_reference_seeds_the_cache_and_the_first_migration_reuses_it() {
    let input = vector("q10-a64fx.bin");
    let text = description_of(&input);
    let reference = ReferenceDescription::parse(&text).unwrap();
    let plain = decode(&input, referenced(&reference, None)).unwrap();
    let cache = DescriptionCache::new();
    cache.seed(&text, &reference).unwrap();
    let first = decode(&input, referenced(&reference, Some(&cache))).unwrap();
    assert_eq!(first.reused, 1, "the seeded description is reused at once");
    assert!(
        plain == Outcome { reused: 0, ..first },
        "hit and no cache differ"
    );
    // Another VM of the same configuration (it ran a guest): the same description text.
    let running = vector("q10-rp-main.bin");
    if description_of(&running) == text {
        let hit = decode(&running, referenced(&reference, Some(&cache))).unwrap();
        let miss = decode(&running, referenced(&reference, None)).unwrap();
        assert_eq!(hit.reused, 1);
        assert!(
            miss == Outcome { reused: 0, ..hit },
            "hit and no cache differ"
        );
    }
}

#[test]
fn a_cached_check_counts_only_for_the_reference_it_was_made_against() {
    let input = vector("q10-a64fx.bin");
    let text = description_of(&input);
    let reference = ReferenceDescription::parse(&text).unwrap();
    // Filled by a checking relay (no reference): a referenced decoder reuses the parse but must
    // still check; an equal but separately parsed reference is another reference.
    let cache = DescriptionCache::new();
    decode(&input, checking(&cache)).unwrap();
    let other = ReferenceDescription::parse(&text).unwrap();
    let hit = decode(&input, referenced(&other, Some(&cache))).unwrap();
    assert_eq!(hit.reused, 1);
    let plain = decode(&input, referenced(&reference, None)).unwrap();
    assert!(
        hit == Outcome { reused: 1, ..plain },
        "hit and no cache differ"
    );
    // A reference the description does not match refuses it by name, cache or not.
    let mut unlike = text.clone();
    let devices = find(&unlike, b"\"devices\"").unwrap();
    let at = devices + find(&unlike[devices..], b"\"size\": ").unwrap() + 8;
    unlike[at] = if unlike[at] == b'9' { b'8' } else { b'9' };
    let wrong = ReferenceDescription::parse(&unlike).unwrap();
    let cached_err = decode(&input, referenced(&wrong, Some(&cache))).unwrap_err();
    let plain_err = decode(&input, referenced(&wrong, None)).unwrap_err();
    assert_eq!(cached_err.to_string(), plain_err.to_string());
    assert!(cached_err.to_string().contains("reference"), "{cached_err}");
}

#[test]
fn a_description_one_byte_different_misses_and_replaces_the_entry() {
    let input = vector("q10-a64fx.bin");
    let changed = one_byte_differs(&input);
    assert_eq!(description_of(&changed).len(), description_of(&input).len());
    assert_ne!(description_of(&changed), description_of(&input));
    let cache = DescriptionCache::new();
    decode(&input, checking(&cache)).unwrap();
    let miss = decode(&changed, checking(&cache)).unwrap();
    assert_eq!(miss.reused, 0, "one byte differs: parsed again");
    let plain = {
        let mut decoder = StreamDecoder::new(Limits::default());
        decoder.set_checking_relay(true);
        decode(&changed, decoder).unwrap()
    };
    assert!(plain == miss, "miss and no cache differ");
    // The changed one replaced the entry: the original misses now, the changed one hits.
    assert_eq!(decode(&input, checking(&cache)).unwrap().reused, 0);
    assert_eq!(decode(&input, checking(&cache)).unwrap().reused, 1);
}

#[test]
fn a_description_that_failed_never_enters_the_cache() {
    let input = vector("q10-a64fx.bin");
    // Not JSON any more (the last `}` is gone): refused at the end, exactly as without a cache.
    let mut broken = input.clone();
    let last = broken.len() - 1;
    broken[last] = b' ';
    let cache = DescriptionCache::new();
    let err = decode(&broken, checking(&cache)).unwrap_err();
    let plain_err = {
        let mut decoder = StreamDecoder::new(Limits::default());
        decoder.set_checking_relay(true);
        decode(&broken, decoder).unwrap_err()
    };
    assert_eq!(err.to_string(), plain_err.to_string());
    assert_eq!(cache.cached_len(), None, "a failed description was cached");
    // A seeded entry survives a description that fails its reference check.
    let text = description_of(&input);
    let reference = ReferenceDescription::parse(&text).unwrap();
    cache.seed(&text, &reference).unwrap();
    let changed = one_byte_differs(&input);
    assert!(decode(&changed, referenced(&reference, Some(&cache))).is_err());
    assert_eq!(
        decode(&input, referenced(&reference, Some(&cache)))
            .unwrap()
            .reused,
        1
    );
}

#[test]
fn seeding_refuses_a_text_that_is_no_description_of_the_reference() {
    let text = description_of(&vector("q10-a64fx.bin"));
    let reference = ReferenceDescription::parse(&text).unwrap();
    let cache = DescriptionCache::new();
    assert!(cache.seed(b"{\"devices\": [", &reference).is_err());
    let other = description_of(&vector("q72-a57.bin"));
    assert!(cache.seed(&other, &reference).is_err());
    assert_eq!(cache.cached_len(), None);
}
