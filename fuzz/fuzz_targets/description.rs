//! Fuzz the description JSON and the walk of the device phase with it.
//!
//! The input is split into device-phase bytes and a description text; they are placed after a
//! fixed stream prefix (header, RAM START/END), followed by EOF, VMDESCRIPTION and the text's
//! length, and decoded whole. The text is also parsed as a reference description and, when
//! that works, the stream is decoded again with it. Nothing may panic; what decodes must
//! re-encode (identity rewrite) to the input.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migproxy_codec::testing::{RamRecord, StreamBuilder};
use migproxy_codec::wire::*;
use migproxy_codec::{Frame, Limits, ReferenceDescription, StreamDecoder, StreamEncoder};
use tokio_util::codec::{Decoder, Encoder};

fn decode(input: &[u8], reference: Option<ReferenceDescription>) {
    let mut decoder = StreamDecoder::new(Limits {
        max_description: 1 << 16,
        max_device_state: 1 << 16,
        ..Limits::default()
    });
    if let Some(reference) = reference {
        decoder.set_reference_description(reference);
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
                StreamEncoder.encode(frame, &mut out).expect("encoding into memory");
            }
            Ok(None) => {
                assert_eq!(&out[..], input, "re-encoding differs");
                return;
            }
            Err(_) => return,
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
    input.push(QEMU_VM_SECTION_FULL);
    input.extend_from_slice(device);
    input.extend_from_slice(&[QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]);
    input.extend_from_slice(&(json.len() as u32).to_be_bytes());
    input.extend_from_slice(json);
    decode(&input, None);
    if let Ok(reference) = ReferenceDescription::parse(json) {
        let _ = reference.devices();
        decode(&input, Some(reference));
    }
});
