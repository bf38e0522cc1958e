//! `DecodeError`: every way a stream can fail to decode, located.

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("at byte {offset}: {message}")]
    Malformed { offset: u64, message: String },
}
