//! Writes frames back to bytes.

use bytes::BytesMut;
use tokio_util::codec::Encoder;

use crate::frame::Frame;

/// Encodes frames exactly as they came (DeviceState re-encoded, possibly rewritten).
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamEncoder;

impl Encoder<Frame> for StreamEncoder {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        match frame {
            Frame::Verbatim { bytes, .. } | Frame::Payload { bytes, .. } => {
                dst.extend_from_slice(&bytes)
            }
            Frame::DeviceState(state) => state.encode(dst),
        }
        Ok(())
    }
}
