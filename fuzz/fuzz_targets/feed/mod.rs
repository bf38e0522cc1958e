//! Feeding a stream to the decoder in input-chosen reads and re-encoding what it emits, and the
//! comparisons of such decodes: shared by the `decode` and `decode_structured` targets, which
//! check different things of the result.

// Each target reads the fields it checks.
#![allow(dead_code)]

use bytes::BytesMut;
use migproxy_codec::{DecodeError, DecodeWork, Frame, StreamDecoder, StreamEncoder};
use tokio_util::codec::{Decoder, Encoder};

/// What one decode of an input did.
pub struct Decoded {
    pub frames: Vec<Frame>,
    /// Every frame re-encoded unchanged.
    pub out: Vec<u8>,
    pub result: Result<(), String>,
    /// `TrailingData` (the stream went on after the device state ended).
    pub trailing: bool,
    pub done: bool,
    pub offset: u64,
    pub reads: u64,
    pub work: DecodeWork,
}

impl Decoded {
    /// What the decoder emitted re-encodes to exactly the bytes of `input` it consumed.
    pub fn assert_reencodes_what_it_consumed(&self, input: &[u8]) {
        let consumed = usize::try_from(self.offset).unwrap_or(usize::MAX);
        assert!(consumed <= input.len());
        assert_eq!(
            self.out.len(),
            consumed,
            "emitted bytes differ from the bytes consumed"
        );
        assert!(
            self.out[..] == input[..consumed],
            "re-encoding differs from the input"
        );
    }
}

/// `decoder` with page-run coalescing on, as the proxy's pump decodes
/// (`StreamDecoder::set_coalesce_ram_records`).
pub fn coalescing(mut decoder: StreamDecoder) -> StreamDecoder {
    decoder.set_coalesce_ram_records(true);
    decoder
}

/// Coalescing page records changes only how the frames are cut: the same bytes released in the
/// same order, the same result (the error text, with its offset), the same end state.
pub fn assert_same_outcome(plain: &Decoded, coalesced: &Decoded) {
    assert_eq!(
        coalesced.result, plain.result,
        "coalescing page records changes the result"
    );
    assert_eq!(
        coalesced.offset, plain.offset,
        "coalescing page records changes the offset reached"
    );
    assert!(
        coalesced.out == plain.out,
        "coalescing page records changes the bytes released"
    );
    assert_eq!(coalesced.done, plain.done);
    assert_eq!(coalesced.trailing, plain.trailing);
}

/// The same stream fed in pieces (`split`) and whole: the same result (error text included) and
/// end state, and the same bytes when it succeeded. A failed stream may have released more with
/// split reads (a checking relay forwards a false ending before the phase goes on): both are
/// prefixes of the input, which `assert_reencodes_what_it_consumed` checks. `may_stop_early`: a
/// rewriting decoder without a reference may instead stop earlier, at a forged ending, with
/// `TrailingData` after a prefix of the same bytes (its documented rule).
pub fn assert_split_matches_whole(whole: &Decoded, split: &Decoded, may_stop_early: bool) {
    if may_stop_early && split.result != whole.result {
        assert!(
            split.trailing,
            "split reads: {:?}, one piece: {:?}",
            split.result, whole.result
        );
        return;
    }
    assert_eq!(split.result, whole.result, "split reads change the result");
    if whole.result.is_ok() {
        assert!(split.out == whole.out, "split reads change the bytes");
    }
    assert_eq!(split.done, whole.done, "split reads change the end state");
}

/// Re-encode `frame` unchanged onto `out`; a device state must take exactly `wire_len()` bytes.
pub fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    let copy = match frame {
        Frame::DeviceState(state) => {
            let before = out.len();
            state.encode(out);
            assert_eq!(
                out.len() - before,
                state.wire_len(),
                "wire_len differs from encode"
            );
            return;
        }
        Frame::Verbatim {
            kind,
            section_id,
            bytes,
        } => Frame::Verbatim {
            kind: kind.clone(),
            section_id: *section_id,
            bytes: bytes.clone(),
        },
        Frame::Payload { section_id, bytes } => Frame::Payload {
            section_id: *section_id,
            bytes: bytes.clone(),
        },
    };
    StreamEncoder
        .encode(copy, out)
        .expect("encoding into memory");
}

/// Decode `input` fed up to each of `boundaries` in turn (ascending; the input's end last), then
/// at EOF; every frame is re-encoded with `encode`.
pub fn decode(
    input: &[u8],
    boundaries: &[usize],
    mut decoder: StreamDecoder,
    encode: impl Fn(&Frame, &mut BytesMut),
) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut out = BytesMut::new();
    let mut fed = 0usize;
    let mut reads = 0u64;
    let mut result = Ok(());
    let mut trailing = false;
    let mut keep = |frame: Frame, out: &mut BytesMut| {
        encode(&frame, out);
        frames.push(frame);
    };
    'feed: for &end in boundaries {
        let end = end.min(input.len());
        if end <= fed {
            continue;
        }
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        reads += 1;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => keep(frame, &mut out),
                Ok(None) => break,
                Err(err) => {
                    trailing = matches!(err, DecodeError::TrailingData { .. });
                    result = Err(err.to_string());
                    break 'feed;
                }
            }
        }
    }
    if result.is_ok() {
        loop {
            match decoder.decode_eof(&mut buf) {
                Ok(Some(frame)) => keep(frame, &mut out),
                Ok(None) => break,
                Err(err) => {
                    trailing = matches!(err, DecodeError::TrailingData { .. });
                    result = Err(err.to_string());
                    break;
                }
            }
        }
    }
    Decoded {
        frames,
        out: out.to_vec(),
        result,
        trailing,
        done: decoder.is_done(),
        offset: decoder.offset(),
        reads,
        work: decoder.work(),
    }
}
