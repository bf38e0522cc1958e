//! What the pure record parsers return.
//!
//! Every parser takes the bytes from the start of its record and returns `Ok(None)` for "need
//! more bytes" (never an error: the same call on a longer buffer may succeed), the parsed record,
//! or a [`RecordError`] whose position is relative to the record's first byte. The decoder turns
//! that into a [`DecodeError`](crate::DecodeError) with the stream offset and the section.

/// Result of one pure parser.
pub(crate) type Parsed<T> = Result<Option<T>, RecordError>;

/// Why a record is refused, located relative to its first byte.
#[derive(Debug)]
pub(crate) enum RecordError {
    /// The bytes at `pos` are not what QEMU writes there.
    Invalid {
        pos: usize,
        expected: String,
        found: String,
    },
    /// A length read at `pos` exceeds a limit.
    TooLong {
        pos: usize,
        what: String,
        len: u64,
        limit: usize,
    },
}

impl RecordError {
    pub(crate) fn invalid(pos: usize, expected: impl Into<String>, found: String) -> Self {
        RecordError::Invalid {
            pos,
            expected: expected.into(),
            found,
        }
    }
}
