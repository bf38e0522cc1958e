//! Helpers shared by the codec's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use migproxy_codec::{DecodeError, Frame, Limits, StreamDecoder, StreamEncoder};
use tokio_util::codec::{Decoder, Encoder};

/// Decode `input` fed in chunks of the sizes `chunk_len` returns, re-encoding every frame.
pub fn decode_chunked(
    input: &[u8],
    limits: Limits,
    chunk_len: impl FnMut() -> usize,
    on_frame: impl FnMut(&mut Frame),
) -> Result<(Vec<u8>, StreamDecoder), DecodeError> {
    decode_chunked_with(StreamDecoder::new(limits), input, chunk_len, on_frame)
}

/// [`decode_chunked`] with a decoder the caller has configured (a reference, a cache, ...).
pub fn decode_chunked_with(
    mut decoder: StreamDecoder,
    input: &[u8],
    mut chunk_len: impl FnMut() -> usize,
    mut on_frame: impl FnMut(&mut Frame),
) -> Result<(Vec<u8>, StreamDecoder), DecodeError> {
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut pos = 0;
    while pos < input.len() {
        let n = chunk_len().clamp(1, input.len() - pos);
        buf.extend_from_slice(&input[pos..pos + n]);
        pos += n;
        while let Some(mut frame) = decoder.decode(&mut buf)? {
            on_frame(&mut frame);
            StreamEncoder.encode(frame, &mut out).unwrap();
        }
    }
    while let Some(mut frame) = decoder.decode_eof(&mut buf)? {
        on_frame(&mut frame);
        StreamEncoder.encode(frame, &mut out).unwrap();
    }
    Ok((out.to_vec(), decoder))
}

/// Decode the whole input at once.
pub fn decode_all(input: &[u8]) -> Result<(Vec<u8>, StreamDecoder), DecodeError> {
    decode_chunked(input, Limits::default(), || usize::MAX, |_| {})
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
