#![forbid(unsafe_code)]
//! QEMU migration stream codec (placeholder: the real API lands with issue 2).

mod error;

pub use error::DecodeError;
