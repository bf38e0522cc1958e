//! Decode stream files, re-encode them, and report whether each output is byte-identical.
//!
//! `cargo run --release -p migproxy-codec --example roundtrip -- FILE...`

use migproxy_codec::{offline, Frame, Limits, StreamDecoder, StreamEncoder};
use tokio_util::codec::Encoder;

type BoxError = Box<dyn std::error::Error>;

fn roundtrip(path: &str) -> Result<String, BoxError> {
    let input = std::fs::read(path)?;
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut out = bytes::BytesMut::with_capacity(input.len());
    let mut frames = 0usize;
    let mut cpus = 0usize;
    offline::decode_reader(&input[..], &mut decoder, |_, frame: Frame| {
        frames += 1;
        if let Frame::DeviceState(state) = &frame {
            cpus = state.cpus().len();
        }
        StreamEncoder.encode(frame, &mut out)?;
        Ok::<(), BoxError>(())
    })?;
    Ok(format!(
        "frames={frames} cpus={cpus} identical={}",
        out[..] == input[..]
    ))
}

fn main() {
    for path in std::env::args().skip(1) {
        match roundtrip(&path) {
            Ok(summary) => println!("{path}: {summary}"),
            Err(err) => println!("{path}: error: {err}"),
        }
    }
}
