//! Fuzz the main-channel decoder on raw bytes (seeds: real captures cut to their first KiB and to
//! their device-phase or package tails, `fuzz/seed-corpus.sh`).
//!
//! Input: a control byte (bit 7: checking relay; bits 0-2: how many be16 read sizes follow),
//! those read sizes, then the stream. The stream is decoded in one piece and in those reads (the
//! rest in one piece). Checked:
//! - never a panic or a hang; whatever decoded re-encodes to exactly the bytes consumed;
//! - split reads give the same result and end state as one piece (a rewriting decoder may only
//!   stop earlier, at an ending that verified, with `TrailingData`), and the same bytes when it
//!   succeeds;
//! - page-run coalescing (`set_coalesce_ram_records`, as the proxy's pump decodes), whole and
//!   split, changes only the cut of the frames: the same bytes in the same order, the same
//!   result and offset, the same end state;
//! - work per byte is bounded (`DecodeWork`);
//! - a device state whose first vCPU loses its last register re-encodes to `wire_len()` bytes
//!   and decodes again with that vCPU's new registers.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migproxy_codec::{Frame, Limits, StreamDecoder};

mod feed;

use feed::{encode_frame, Decoded};

fn limits() -> Limits {
    Limits {
        max_record: 1 << 16,
        max_device_state: 1 << 17,
        max_description: 1 << 17,
        max_packaged: 1 << 17,
        max_cpus: 16,
        max_cpregs: 1024,
        max_rewrite_output: 1 << 18,
        max_sections: 16,
    }
}

fn decoder(relay: bool) -> StreamDecoder {
    let mut decoder = StreamDecoder::new(limits());
    decoder.set_checking_relay(relay);
    decoder
}

fn decode(input: &[u8], boundaries: &[usize], relay: bool) -> Decoded {
    feed::decode(input, boundaries, decoder(relay), encode_frame)
}

/// As `decode`, with page-run coalescing (how the proxy's pump decodes).
fn decode_coalescing(input: &[u8], boundaries: &[usize], relay: bool) -> Decoded {
    feed::decode(
        input,
        boundaries,
        feed::coalescing(decoder(relay)),
        encode_frame,
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let relay = control & 0x80 != 0;
    let sizes = usize::from(control & 0x07);
    let Some((sizes, input)) = rest.split_at_checked(sizes * 2) else {
        return;
    };
    let mut boundaries: Vec<usize> = sizes
        .chunks_exact(2)
        .scan(0usize, |pos, size| {
            *pos += usize::from(u16::from_be_bytes([size[0], size[1]])) + 1;
            Some(*pos)
        })
        .collect();
    boundaries.push(input.len());

    let whole = decode(input, &[input.len()], relay);
    let split = decode(input, &boundaries, relay);
    let whole_coalesced = decode_coalescing(input, &[input.len()], relay);
    let split_coalesced = decode_coalescing(input, &boundaries, relay);
    feed::assert_same_outcome(&whole, &whole_coalesced);
    feed::assert_same_outcome(&split, &split_coalesced);
    for run in [&whole, &split, &whole_coalesced, &split_coalesced] {
        run.assert_reencodes_what_it_consumed(input);
        assert!(
            run.work.device_phase_bytes_scanned <= input.len() as u64,
            "a held byte scanned twice"
        );
        assert!(
            run.work.descriptions_tried <= run.reads,
            "more descriptions tried than reads"
        );
    }
    // (With coalescing the same, since coalescing changes neither.)
    feed::assert_split_matches_whole(&whole, &split, !relay);

    // A real rewrite: the first vCPU loses its last register; the stream decodes again with it.
    if whole.result.is_err() {
        return;
    }
    let mut frames = whole.frames;
    let Some(Frame::DeviceState(state)) = frames
        .iter_mut()
        .find(|f| matches!(f, Frame::DeviceState(_)))
    else {
        return;
    };
    let Some(cpu) = state.cpus().into_iter().next() else {
        return;
    };
    let mut registers = cpu.registers;
    if registers.pop().is_none() || registers.windows(2).any(|w| w[0].0 >= w[1].0) {
        return;
    }
    if state.set_cpregs(cpu.instance, &registers).is_err() {
        return;
    }
    let mut rewritten = BytesMut::new();
    for frame in &frames {
        encode_frame(frame, &mut rewritten);
    }
    let again = decode(&rewritten, &[rewritten.len()], true);
    if let Err(err) = &again.result {
        panic!("the rewritten stream does not decode: {err}");
    }
    let Some(Frame::DeviceState(state)) = again
        .frames
        .iter()
        .find(|f| matches!(f, Frame::DeviceState(_)))
    else {
        panic!("the rewritten stream has no device state");
    };
    let first = state.cpus().into_iter().next().map(|c| c.registers);
    assert_eq!(
        first,
        Some(registers),
        "the rewritten stream carries other registers"
    );
});
