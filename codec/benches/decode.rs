//! Decode + re-encode throughput on a large RAM-heavy stream, in memory, next to a plain memcpy
//! of the same bytes in the same run.
//!
//! `cargo bench -p migproxy-codec` (size: `MIGPROXY_BENCH_MIB`, default 1024). Results are
//! recorded in docs/bench-codec.md.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use migproxy_codec::testing::StreamBuilder;
use migproxy_codec::{Frame, Limits, StreamDecoder, StreamEncoder};
use tokio_util::codec::{Decoder, Encoder};

const PAGE: usize = 4096;
const READ: usize = 256 * 1024;
const ROUNDS: usize = 3;

fn build(mib: usize) -> Vec<u8> {
    let pages = (mib * 1024 * 1024 / PAGE) as u64;
    let mut b = StreamBuilder::new("virt-7.2");
    b.reserve(mib * 1024 * 1024 + (pages as usize) * 16 + (1 << 20));
    b.ram_start(pages * PAGE as u64);
    // Non-zero pages, every one different, so nothing can be skipped.
    b.ram_pages(pages, |index, page| {
        let seed = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for (i, chunk) in page.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(seed ^ i as u64).to_le_bytes());
        }
    });
    b.ram_section(true, &[]);
    device_state(&mut b);
    b.finish()
}

/// Roughly the device state of the 2-vCPU a64fx guests: ~40 KB, two cpu sections of 248 cpregs.
fn device_state(b: &mut StreamBuilder) {
    let regs: Vec<(u64, u64)> = (0..248u64)
        .map(|i| (0x6030_0000_0013_0000 + i * 8, i * 3))
        .collect();
    b.device("timer", 0, &[0u8; 24], None);
    b.cpu(0, &regs, 1);
    b.device("pad-vfp-sve", 0, &[7u8; 4700], None);
    b.cpu(1, &regs, 2);
    b.device("pad-vfp-sve", 1, &[7u8; 4700], None);
    b.device("arm_gic", 0, &[3u8; 9900], None);
    b.device("rest", 0, &[5u8; 12_000], None);
}

fn best_of(mut run: impl FnMut() -> Duration) -> Duration {
    (0..ROUNDS).map(|_| run()).min().unwrap_or_default()
}

fn gbps(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

/// Decode from a buffer holding the whole stream; `encode` says whether frames are re-encoded.
fn decode_whole(input: &[u8], out: &mut BytesMut, encode: bool) -> Duration {
    let mut buf = BytesMut::from(input);
    out.clear();
    let start = Instant::now();
    let mut decoder = StreamDecoder::new(Limits::default());
    while let Some(frame) = decoder.decode(&mut buf).expect("decode") {
        if encode {
            StreamEncoder.encode(frame, out).expect("encode");
        } else {
            black_box(&frame);
        }
    }
    let elapsed = start.elapsed();
    assert!(decoder.is_done());
    if encode {
        assert!(out[..] == input[..], "re-encoded stream differs");
    }
    elapsed
}

/// Socket-like: copy each 256 KiB read into the decoder's buffer, decode, re-encode.
fn decode_reads(input: &[u8], out: &mut BytesMut) -> Duration {
    out.clear();
    let start = Instant::now();
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = BytesMut::with_capacity(2 * READ);
    for read in input.chunks(READ) {
        buf.extend_from_slice(read);
        while let Some(frame) = decoder.decode(&mut buf).expect("decode") {
            StreamEncoder.encode(frame, out).expect("encode");
        }
    }
    let elapsed = start.elapsed();
    assert!(decoder.is_done());
    elapsed
}

/// The copy the re-encoding does, without decoding: page-record-sized pieces into a BytesMut.
fn memcpy_pages(input: &[u8], out: &mut BytesMut) -> Duration {
    out.clear();
    let start = Instant::now();
    for piece in input.chunks(4104) {
        out.extend_from_slice(piece);
    }
    black_box(&out);
    start.elapsed()
}

fn memcpy(input: &[u8], out: &mut [u8]) -> Duration {
    let start = Instant::now();
    out.copy_from_slice(input);
    black_box(&out);
    start.elapsed()
}

/// The held device phase alone: walk with the description, rewrite both cpus, encode.
fn device_phase_latency() -> (usize, Duration) {
    let mut b = StreamBuilder::new("virt-7.2");
    b.ram_start(1 << 20).ram_section(true, &[]);
    device_state(&mut b);
    let stream = b.finish();
    let regs: Vec<(u64, u64)> = (0..261u64)
        .map(|i| (0x6030_0000_0013_0000 + i * 8, i))
        .collect();
    let mut device_bytes = 0;
    let time = best_of(|| {
        let mut buf = BytesMut::from(&stream[..]);
        let mut out = BytesMut::new();
        let mut decoder = StreamDecoder::new(Limits::default());
        let mut elapsed = Duration::ZERO;
        loop {
            let start = Instant::now();
            let Some(frame) = decoder.decode(&mut buf).expect("decode") else {
                break;
            };
            if let Frame::DeviceState(mut state) = frame {
                device_bytes = state.wire_len();
                for cpu in state.cpus() {
                    state.set_cpregs(cpu.instance, &regs).expect("set_cpregs");
                }
                StreamEncoder
                    .encode(Frame::DeviceState(state), &mut out)
                    .expect("encode");
                elapsed += start.elapsed();
            }
        }
        elapsed
    });
    (device_bytes, time)
}

fn main() {
    let mib: usize = std::env::var("MIGPROXY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let input = build(mib);
    let len = input.len();
    let mut out = BytesMut::with_capacity(len);
    let mut plain = vec![0u8; len];
    println!(
        "stream: {len} bytes ({} pages of 4096 non-zero bytes, best of {ROUNDS})",
        mib * 256
    );
    // Interleave the variants round by round so that load from other processes hits them alike.
    let mut times = [Duration::MAX; 5];
    for _ in 0..ROUNDS {
        let round = [
            memcpy(&input, &mut plain),
            memcpy_pages(&input, &mut out),
            decode_whole(&input, &mut out, false),
            decode_whole(&input, &mut out, true),
            decode_reads(&input, &mut out),
        ];
        for (best, t) in times.iter_mut().zip(round) {
            *best = (*best).min(t);
        }
    }
    let labels = [
        "memcpy of the same bytes (one call)",
        "memcpy in 4104-byte pieces into BytesMut",
        "decode only (zero-copy frames)",
        "decode + re-encode into BytesMut",
        "256 KiB reads + decode + re-encode",
    ];
    for (label, time) in labels.iter().zip(times) {
        println!("{label:<42} {:6.2} GB/s", gbps(len, time));
    }
    let (device_bytes, latency) = device_phase_latency();
    println!(
        "device phase ({device_bytes} bytes, 2 cpus rewritten): walk+rewrite+encode {:.1} us",
        latency.as_secs_f64() * 1e6
    );
}
