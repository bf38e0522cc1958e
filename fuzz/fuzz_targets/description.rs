//! Fuzz the description JSON and the walk of the device phase with it.
//!
//! The input is split into device-phase bytes and a description text; they are placed after a
//! fixed stream prefix (header, RAM START/END), followed by EOF, VMDESCRIPTION and the text's
//! length, and decoded whole. The text is also parsed as a reference description and, when
//! that works, the stream is decoded again with it. Nothing may panic; what decodes must
//! re-encode (identity rewrite) to the input. Each decode runs three times: without a description
//! cache, and twice with one cache (a miss, then a hit if the first was accepted, or with the
//! reference, a cache seeded with the text); all three must end the same way.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migproxy_codec::testing::{walk_by_lookup_and_plan, RamRecord, StreamBuilder};
use migproxy_codec::wire::*;
use migproxy_codec::{
    DescriptionCache, Frame, Limits, ReferenceDescription, StreamDecoder, StreamEncoder,
};
use tokio_util::codec::{Decoder, Encoder};

/// How a decode ended: the error's text, or nothing (it re-encoded to the input).
fn decode(
    input: &[u8],
    reference: Option<&ReferenceDescription>,
    cache: Option<&DescriptionCache>,
) -> Option<String> {
    let mut decoder = StreamDecoder::new(Limits {
        max_description: 1 << 16,
        max_device_state: 1 << 16,
        ..Limits::default()
    });
    if let Some(reference) = reference {
        decoder.set_reference_description(reference.clone());
    }
    if let Some(cache) = cache {
        decoder.set_description_cache(cache.clone());
    }
    let mut buf = BytesMut::from(input);
    let mut out = BytesMut::new();
    loop {
        match decoder.decode_eof(&mut buf) {
            Ok(Some(mut frame)) => {
                if let Frame::DeviceState(state) = &mut frame {
                    for cpu in state.cpus() {
                        let _ = state.set_cpregs(cpu.instance, &cpu.registers);
                    }
                    let _ = state.description_json();
                }
                StreamEncoder
                    .encode(frame, &mut out)
                    .expect("encoding into memory");
            }
            Ok(None) => {
                assert_eq!(&out[..], input, "re-encoding differs");
                return None;
            }
            Err(err) => return Some(err.to_string()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let device_len = usize::from(split).min(rest.len());
    let (device, json) = rest.split_at(device_len);
    let mut b = StreamBuilder::new("virt-10.0");
    b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
    let mut input = b.into_bytes();
    let device_phase_start = input.len();
    input.push(QEMU_VM_SECTION_FULL);
    input.extend_from_slice(device);
    input.extend_from_slice(&[QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]);
    input.extend_from_slice(&(json.len() as u32).to_be_bytes());
    input.extend_from_slice(json);
    let plain = decode(&input, None, None);
    // The walk with the plan compiled from the text (what a cache hit uses) against the walk by
    // lookup: the same layout or the same error.
    if let Some((lookup, planned)) = walk_by_lookup_and_plan(
        &input[device_phase_start..],
        0,
        1 + device.len() + 2,
        &Limits::default(),
    ) {
        assert_eq!(lookup, planned, "plan walk");
    }
    let cache = DescriptionCache::new();
    assert_eq!(
        decode(&input, None, Some(&cache)),
        plain,
        "first with a cache"
    );
    assert_eq!(
        decode(&input, None, Some(&cache)),
        plain,
        "again with the cache"
    );
    if let Ok(reference) = ReferenceDescription::parse(json) {
        let _ = reference.devices();
        let plain = decode(&input, Some(&reference), None);
        let seeded = DescriptionCache::new();
        if seeded.seed(json, &reference).is_ok() {
            assert_eq!(
                decode(&input, Some(&reference), Some(&seeded)),
                plain,
                "seeded"
            );
        }
        assert_eq!(
            decode(&input, Some(&reference), Some(&cache)),
            plain,
            "cache of no reference"
        );
    }
});
