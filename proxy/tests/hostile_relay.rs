//! A guest-forged device-phase ending through the real daemon over loopback (docs/hostile-input.md).
//!
//! The guest's bytes (a footer, EOF, VMDESCRIPTION and a description naming only the first
//! section) sit inside the first device section; the source pauses right after them, so the
//! daemon's read ends there and the forged description verifies. A checking relay must carry the
//! migration through anyway. A rewriting relay must carry it through when it has the source's
//! reference description, refuse the migration at its first bytes (destination not contacted)
//! when it has none, and, with `--unreferenced-device-phase allow`, shows the exposure that flag
//! accepts: the forged ending ends the phase and the migration fails (DESIGN.md, "How the end of
//! the phase is recognised").

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use migproxy_codec::testing::{forged_description_ending, RamRecord, StreamBuilder};

const SECS: Duration = Duration::from_secs(20);

/// The startup warning of a rewriting listener without a reference.
const UNREFERENCED_WARNING: &str = "rewriting without --source-reference: every migration on this listener is refused at its first bytes (a guest could end the device phase early); give --source-reference FILE (made with `migproxy profile capture --save-reference FILE`) or --unreferenced-device-phase allow";

const GUEST_OFFSET: usize = 16;
const GUEST_BYTES: usize = 256;

/// A stream whose first device section carries `guest` (GUEST_BYTES long) as its payload, and
/// the offset where that payload starts.
fn stream_with_guest_bytes(guest: &[u8]) -> (Vec<u8>, usize) {
    assert_eq!(guest.len(), GUEST_BYTES);
    let mut b = StreamBuilder::new("virt-10.0");
    b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
    // FULL 04, be32 id, counted "guestregs", be32 instance, be32 version, then the payload.
    let payload_start = b.len() + 1 + 4 + 1 + "guestregs".len() + 8;
    b.device("guestregs", 0, guest, None);
    b.cpu(0, &[(0x6030_0000_0013_c000, 1)], 1);
    (b.finish(), payload_start)
}

/// The stream and the offset where the forged description ends.
fn stream_with_forged_ending() -> (Vec<u8>, usize) {
    let forged = forged_description_ending(1, "guestregs", GUEST_OFFSET);
    let mut payload = vec![0x5a; GUEST_OFFSET];
    payload.extend_from_slice(&forged);
    assert!(
        payload.len() + 40 <= GUEST_BYTES,
        "the forged bytes must sit inside the payload"
    );
    payload.resize(GUEST_BYTES, 0x5a);
    let (stream, payload_start) = stream_with_guest_bytes(&payload);
    (stream, payload_start + GUEST_OFFSET + forged.len())
}

/// What a never-started VM of the same configuration sends: the same layout, no forged bytes.
fn fresh_stream_bytes() -> Vec<u8> {
    stream_with_guest_bytes(&[0; GUEST_BYTES]).0
}

/// Send `stream` pausing right after the forged ending, so the daemon's read ends exactly there;
/// returns what the source read back before the daemon closed the connection.
fn send_pausing_at_the_forged_ending(daemon: &Daemon, stream: &[u8], forged_end: usize) {
    let mut source = connect(daemon.listen);
    source.set_nodelay(true).unwrap();
    source.write_all(&stream[..forged_end]).unwrap();
    // Let the daemon read up to exactly the forged ending before anything else arrives.
    std::thread::sleep(Duration::from_millis(500));
    // The daemon may already have closed the connection (that is what some tests expect).
    let _ = source.write_all(&stream[forged_end..]);
    let _ = source.shutdown(Shutdown::Write);
    read_until_closed(&mut source);
}

/// What `profile_and_reference` made.
struct Captured {
    profile: String,
    /// The saved stream of the "fresh VM".
    fresh_stream: String,
    /// Its description, as `--save-reference` writes it.
    reference_json: String,
}

/// A destination profile (the fresh stream's own registers: the rewrite changes nothing) and
/// the source reference in both forms. Made with this build's `profile capture
/// --save-reference` even when `MIGPROXY_TEST_BINARY` replays the daemon of another build.
fn profile_and_reference(dir: &TempDir) -> Captured {
    let fresh_stream = dir.file("fresh.bin");
    std::fs::write(&fresh_stream, fresh_stream_bytes()).unwrap();
    let (profile, reference_json) = (dir.file("profile.json"), dir.file("reference.json"));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_migproxy"))
        .args([
            "profile",
            "capture",
            "--from-stream",
            &fresh_stream,
            "--accel",
            "tcg",
        ])
        .args(["--save-reference", &reference_json, "-o", &profile])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Captured {
        profile,
        fresh_stream,
        reference_json,
    }
}

#[test]
fn a_forged_ending_in_guest_bytes_does_not_stop_a_checking_relay() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &[]);
    let (stream, forged_end) = stream_with_forged_ending();
    send_pausing_at_the_forged_ending(&daemon, &stream, forged_end);
    assert_eq!(
        destination.wait_received(0, SECS),
        stream,
        "the destination did not get the whole stream"
    );
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
}

#[test]
fn with_a_source_reference_a_forged_ending_does_not_stop_a_rewriting_relay() {
    let dir = TempDir::new("forged-reference");
    let captured = profile_and_reference(&dir);
    // Both forms of a reference: a saved fresh stream, and the description alone.
    for reference in [&captured.fresh_stream, &captured.reference_json] {
        let destination = Destination::reading();
        let daemon = Daemon::to(
            &destination,
            &[
                "--dest-profile",
                &captured.profile,
                "--source-reference",
                reference,
            ],
        );
        let (stream, forged_end) = stream_with_forged_ending();
        send_pausing_at_the_forged_ending(&daemon, &stream, forged_end);
        let summary = daemon.wait_log("migration summary", SECS);
        assert_eq!(
            summary["fields"]["outcome"], "completed",
            "{reference}: {summary}"
        );
        // The profile is the stream's own: the rewrite keeps every byte.
        assert_eq!(
            destination.wait_received(0, SECS),
            stream,
            "{reference}: the destination did not get the whole stream"
        );
    }
}

#[test]
fn without_a_source_reference_a_rewriting_relay_refuses_at_the_first_bytes() {
    let dir = TempDir::new("forged-unreferenced");
    let profile = profile_and_reference(&dir).profile;
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &["--dest-profile", &profile]);
    let warning = daemon.wait_log(UNREFERENCED_WARNING, SECS);
    assert_eq!(warning["level"], "WARN", "{warning}");
    let (stream, _) = stream_with_forged_ending();
    let mut source = connect(daemon.listen);
    // Only the header and the first record: the refusal comes before any RAM would move.
    let _ = source.write_all(&stream[..64]);
    read_until_closed(&mut source);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "refused", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    for needed in [
        "--source-reference",
        "--save-reference",
        "--unreferenced-device-phase allow",
        "before the destination was contacted",
    ] {
        assert!(reason.contains(needed), "{needed:?} missing: {reason}");
    }
    assert_eq!(destination.accepted(), 0, "the destination was contacted");
}

#[test]
fn with_the_opt_out_a_forged_ending_still_fails_a_rewriting_relay_and_nothing_else() {
    let dir = TempDir::new("forged-allowed");
    let profile = profile_and_reference(&dir).profile;
    let destination = Destination::reading();
    let daemon = Daemon::to(
        &destination,
        &[
            "--dest-profile",
            &profile,
            "--unreferenced-device-phase",
            "allow",
        ],
    );
    let (stream, forged_end) = stream_with_forged_ending();
    send_pausing_at_the_forged_ending(&daemon, &stream, forged_end);
    // What the flag accepts: the guest's forged ending ends the phase, the bytes after it are
    // refused, and both sides are closed. The destination never gets the real end.
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "failed", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("data after the end of the stream"),
        "{reason}"
    );
    let received = destination.wait_received(0, SECS);
    assert!(
        received.len() < stream.len(),
        "the whole stream went through"
    );
}
