//! The raw relays (`--raw-relay splice|copy`) of multifd channels through the real daemon over
//! loopback: a destination that stops reading a multifd channel slows its source down without the
//! daemon's memory growing, and every byte arrives once it reads again.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;

const SECS: Duration = Duration::from_secs(30);

/// QEMU's multifd handshake for channel `id` (zero UUID), 64 bytes.
fn multifd_handshake(id: u8) -> Vec<u8> {
    let mut packet = vec![0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1];
    packet.extend_from_slice(&[0; 16]);
    packet.push(id);
    packet.resize(64, 0);
    packet
}

fn a_stalled_multifd_destination_stalls_the_source(relay: &str) {
    let gate: Arc<(Mutex<bool>, Condvar)> = Arc::default();
    let destination = Destination::start(vec![
        Behaviour::ReadAll { reply: Vec::new() },
        Behaviour::Gated(Arc::clone(&gate)),
    ]);
    let daemon = Daemon::to(&destination, &["--raw-relay", relay]);
    let stream = vector("q72-mfd-main.bin");
    // The main channel opens the migration (its RAM part only: the device phase has a deadline).
    let mut main = connect(daemon.listen);
    main.write_all(&stream[..64]).unwrap();
    wait_until("the main channel at the destination", SECS, || {
        (destination.accepted() == 1).then_some(())
    });

    let chunk: Arc<Vec<u8>> = Arc::new((0..256 * 1024u32).map(|i| (i * 7 + 3) as u8).collect());
    let chunks = 512; // 128 MiB
    let written = Arc::new(AtomicUsize::new(0));
    let mut multifd = connect(daemon.listen);
    multifd.write_all(&multifd_handshake(0)).unwrap();
    let writer = {
        let (chunk, written) = (Arc::clone(&chunk), Arc::clone(&written));
        let mut multifd = multifd.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..chunks {
                multifd.write_all(&chunk).unwrap();
                written.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            multifd.shutdown(Shutdown::Write).unwrap();
        })
    };
    let used = daemon.wait_log("raw relay", SECS);
    assert_eq!(used["fields"]["relay"], relay, "{used}");
    let mut last = usize::MAX;
    wait_until("the multifd source to be blocked", SECS, || {
        std::thread::sleep(Duration::from_millis(500));
        let now = written.load(Ordering::Relaxed);
        let stalled = now == last;
        last = now;
        stalled.then_some(())
    });
    let offered = chunk.len() * chunks;
    assert!(
        last < offered / 4,
        "{relay}: the source was not slowed down ({last} of {offered} bytes accepted)"
    );
    let peak_kib = daemon.peak_rss_kib();
    assert!(
        peak_kib > 0 && peak_kib < 48 * 1024,
        "{relay}: daemon peak RSS {peak_kib} KiB while the destination reads nothing"
    );

    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    writer.join().unwrap();
    let got = destination.wait_received(1, SECS);
    assert_eq!(got.len(), 64 + offered, "{relay}: multifd bytes lost");
    assert_eq!(&got[..64], multifd_handshake(0).as_slice());
    assert!(
        got[64..].chunks(chunk.len()).all(|c| c == chunk.as_slice()),
        "{relay}: multifd bytes differ"
    );
    // The destination closed after EOF: the source sees its half-close too.
    assert!(read_until_closed(&mut multifd).is_empty());

    main.write_all(&stream[64..]).unwrap();
    main.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut main);
    assert!(
        destination.wait_received(0, SECS) == stream,
        "{relay}: main stream differs"
    );
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    assert_eq!(summary["fields"]["channels"], "main+multifd", "{summary}");
    assert!(daemon.peak_rss_kib() < 48 * 1024);
}

#[test]
fn splice_a_stalled_multifd_destination_stalls_the_source_not_memory() {
    a_stalled_multifd_destination_stalls_the_source("splice");
}

#[test]
fn copy_a_stalled_multifd_destination_stalls_the_source_not_memory() {
    a_stalled_multifd_destination_stalls_the_source("copy");
}

/// The relay used for one multifd channel of a short migration through a daemon whose
/// configuration file says `file_setting` (a line, or nothing) and whose flags are `flags`.
fn relay_used(file_setting: &str, flags: &[&str]) -> String {
    let destination = Destination::reading();
    let dir = TempDir::new("raw-relay");
    let config = dir.file("run.toml");
    std::fs::write(
        &config,
        format!(
            "{file_setting}\n[[listener]]\nlisten = \"tcp:127.0.0.1:0\"\nupstream = \"{}\"\n",
            destination.upstream()
        ),
    )
    .unwrap();
    let mut args = vec!["--config", config.as_str(), "--admin", "tcp:127.0.0.1:0"];
    args.extend_from_slice(flags);
    let daemon = Daemon::start_raw(&args);
    let stream = vector("q72-mfd-main.bin");
    let mut main = connect(daemon.listen);
    main.write_all(&stream[..64]).unwrap();
    wait_until("the main channel at the destination", SECS, || {
        (destination.accepted() == 1).then_some(())
    });
    let mut multifd = connect(daemon.listen);
    let mut sent = multifd_handshake(0);
    sent.extend_from_slice(b"pages");
    multifd.write_all(&sent).unwrap();
    multifd.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut multifd);
    assert_eq!(destination.wait_received(1, SECS), sent);
    main.write_all(&stream[64..]).unwrap();
    main.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut main);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    let used = daemon.wait_log("raw relay", SECS);
    used["fields"]["relay"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_raw_relay_is_splice_by_default_and_set_by_the_file_or_the_flag() {
    assert_eq!(relay_used("", &[]), "splice");
    assert_eq!(relay_used("raw_relay = \"copy\"", &[]), "copy");
    // The flag wins over the file.
    assert_eq!(
        relay_used("raw_relay = \"copy\"", &["--raw-relay", "splice"]),
        "splice"
    );
}

#[test]
fn an_unknown_raw_relay_word_in_the_file_fails_before_binding() {
    let dir = TempDir::new("raw-relay-bad");
    let bad = dir.file("bad.toml");
    std::fs::write(
        &bad,
        "raw_relay = \"zerocopy\"\n[[listener]]\nlisten = \"tcp:127.0.0.1:0\"\nupstream = \"tcp:127.0.0.1:1\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(binary())
        .args(["run", "--config", &bad, "--admin", "none"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("raw_relay") && stderr.contains("splice or copy"),
        "{stderr}"
    );
}
