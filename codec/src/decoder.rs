//! The main-channel state machine.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::error::DecodeError;
use crate::frame::{Frame, StreamInfo};
use crate::limits::Limits;

/// Decoder of the QEMU main migration channel.
pub struct StreamDecoder {
    limits: Limits,
    info: StreamInfo,
    offset: u64,
}

impl StreamDecoder {
    pub fn new(limits: Limits) -> Self {
        StreamDecoder {
            limits,
            info: StreamInfo::default(),
            offset: 0,
        }
    }

    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// Stream offset of the next byte to decode.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// EOF of a held device phase was read, the description is not complete yet.
    pub fn awaiting_description(&self) -> bool {
        false
    }

    /// Nothing more may follow (after the description / final EOF).
    pub fn is_done(&self) -> bool {
        false
    }
}

impl Decoder for StreamDecoder {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, _src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let _ = &self.limits;
        Ok(None)
    }
}
