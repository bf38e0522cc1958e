//! A guest-forged device-phase ending through the real daemon over loopback (docs/hostile-input.md).
//!
//! The guest's bytes (a footer, EOF, VMDESCRIPTION and a description naming only the first
//! section) sit inside the first device section; the source pauses right after them, so the
//! daemon's read ends there and the forged description verifies. A checking relay must carry the
//! migration through anyway.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use migproxy_codec::testing::{forged_description_ending, RamRecord, StreamBuilder};

const SECS: Duration = Duration::from_secs(20);

/// The stream and the offset where the forged description ends.
fn stream_with_forged_ending() -> (Vec<u8>, usize) {
    let mut b = StreamBuilder::new("virt-10.0");
    b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
    let guest_offset = 16;
    let forged = forged_description_ending(1, "guestregs", guest_offset);
    let mut payload = vec![0x5a; guest_offset];
    payload.extend_from_slice(&forged);
    payload.extend_from_slice(&[0x5a; 40]);
    // FULL 04, be32 id, counted "guestregs", be32 instance, be32 version, then the payload.
    let payload_start = b.len() + 1 + 4 + 1 + "guestregs".len() + 8;
    b.device("guestregs", 0, &payload, None);
    b.cpu(0, &[(0x6030_0000_0013_c000, 1)], 1);
    (b.finish(), payload_start + guest_offset + forged.len())
}

#[test]
fn a_forged_ending_in_guest_bytes_does_not_stop_a_checking_relay() {
    let destination = Destination::start(vec![Behaviour::ReadAll { reply: Vec::new() }]);
    let daemon = Daemon::start(&["--upstream", &destination.upstream()]);
    let (stream, forged_end) = stream_with_forged_ending();
    let mut source = connect(daemon.listen);
    source.set_nodelay(true).unwrap();
    source.write_all(&stream[..forged_end]).unwrap();
    // Let the daemon read up to exactly the forged ending before anything else arrives.
    std::thread::sleep(Duration::from_millis(500));
    source.write_all(&stream[forged_end..]).unwrap();
    source.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut source);
    assert_eq!(
        destination.wait_received(0, SECS),
        stream,
        "the destination did not get the whole stream"
    );
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
}
