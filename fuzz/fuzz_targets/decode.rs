//! Fuzz the main-channel decoder: any input, split into chunks chosen by the input itself, must
//! either decode or fail with a `DecodeError` - never panic, never loop - and whatever decoded
//! must re-encode to exactly the bytes consumed.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migproxy_codec::{Frame, Limits, StreamDecoder, StreamEncoder};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so the same stream is tried with many splits.
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split % 64) + 1;
    let limits = Limits {
        max_record: 1 << 16,
        max_device_state: 1 << 20,
        max_description: 1 << 16,
        max_packaged: 1 << 16,
        ..Limits::default()
    };
    let mut decoder = StreamDecoder::new(limits);
    // The split byte's top bit picks the checking relay (a forged ending does not end the stream).
    decoder.set_checking_relay(split & 0x80 != 0);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(mut frame)) => {
                    if let Frame::DeviceState(state) = &mut frame {
                        // Exercise the rewrite path with an identity rewrite.
                        for cpu in state.cpus() {
                            let _ = state.set_cpregs(cpu.instance, &cpu.registers);
                        }
                    }
                    let _ = StreamEncoder.encode(frame, &mut out);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let consumed = usize::try_from(decoder.offset()).unwrap_or(usize::MAX);
    assert_eq!(&out[..], &input[..consumed], "re-encoding differs from the input");
    let _ = decoder.decode_eof(&mut buf);
});
