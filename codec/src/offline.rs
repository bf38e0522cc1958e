//! Driving a decoder over a blocking reader (files, stdin), for offline tools and tests.

use std::io::ErrorKind;

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::decoder::StreamDecoder;
use crate::error::DecodeError;
use crate::frame::Frame;

const READ_SIZE: usize = 1 << 20;

/// Drive a decoder over a blocking reader (1 MiB reads), calling `on_frame` per frame; errors at EOF if the stream is incomplete.
pub fn decode_reader<R: std::io::Read, E: From<DecodeError> + From<std::io::Error>>(
    mut reader: R,
    decoder: &mut StreamDecoder,
    mut on_frame: impl FnMut(&StreamDecoder, Frame) -> Result<(), E>,
) -> Result<(), E> {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut chunk = vec![0u8; READ_SIZE];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(n) => n,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) => return Err(err.into()),
        };
        if n == 0 {
            while let Some(frame) = decoder.decode_eof(&mut buf)? {
                on_frame(decoder, frame)?;
            }
            return Ok(());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        while let Some(frame) = decoder.decode(&mut buf)? {
            on_frame(decoder, frame)?;
        }
    }
}
