//! `migproxy run` applies the KVM rules to the real streams of Linux 6.1, 6.12 and 7.3 (the KVM
//! lab's fixtures, `integration-tests/fixtures/kvm/`) exactly as `plan` announces them: the
//! daemon between a source socket writing a kernel's stream and a destination listener, with the
//! destination profile captured from the destination kernel's own stream.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

const SECS: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> Vec<u8> {
    let packed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../integration-tests/fixtures/kvm")
        .join(format!("{name}.xz"));
    assert!(
        packed.is_file(),
        "KVM fixture {} is missing: regenerate with `cargo run -p migproxy-integration-tests --bin capture-kvm-fixtures`",
        packed.display()
    );
    let out = Command::new("xz")
        .arg("-dc")
        .arg(&packed)
        .output()
        .expect("running xz");
    assert!(out.status.success(), "xz -dc {}", packed.display());
    out.stdout
}

/// The kernel's stream written to `dir`, and the profile captured from it.
fn kernel(dir: &TempDir, series: &str) -> (Vec<u8>, String, String) {
    let stream = fixture(&format!("kvm-{series}.stream"));
    let stream_file = dir.file(&format!("kvm-{series}.stream"));
    std::fs::write(&stream_file, &stream).unwrap();
    let profile = dir.file(&format!("kvm-{series}.json"));
    capture_profile(&stream_file, &[], &profile);
    (stream, stream_file, profile)
}

/// Push a whole stream through the daemon as a source would.
/// The daemon towards `destination` with its `profile`; `source_stream` (a fixture is the stream
/// of a fresh VM) is the source's reference description.
fn daemon_to(destination: &Destination, profile: &str, source_stream: &str) -> Daemon {
    Daemon::to(
        destination,
        &[
            "--dest-profile",
            profile,
            "--source-reference",
            source_stream,
        ],
    )
}

#[test]
fn from_6_1_the_daemon_forwards_byte_for_byte() {
    let dir = TempDir::new("kvm-daemon-61");
    let (stream, stream_file, _) = kernel(&dir, "6.1");
    for dest in ["6.12", "7.3"] {
        let (_, _, profile) = kernel(&dir, dest);
        let destination = Destination::reading();
        let daemon = daemon_to(&destination, &profile, &stream_file);
        migrate_refusable(&daemon, &stream);
        assert!(
            destination.wait_received(0, SECS) == stream,
            "6.1 -> {dest}: not forwarded byte for byte"
        );
        let summary = daemon.wait_log("migration summary", SECS);
        assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    }
}

#[test]
fn the_upgrade_6_12_to_7_3_is_carried_like_the_offline_rewrite() {
    let dir = TempDir::new("kvm-daemon-612");
    let (stream, stream_file, _) = kernel(&dir, "6.12");
    let (_, _, profile) = kernel(&dir, "7.3");
    let expected_file = dir.file("expected.stream");
    migproxy(&[
        "rewrite",
        &stream_file,
        &expected_file,
        "--dest-profile",
        &profile,
    ]);
    let expected = std::fs::read(&expected_file).unwrap();
    assert_eq!(stream.len() - expected.len(), 3 * 16);

    let destination = Destination::reading();
    let daemon = daemon_to(&destination, &profile, &stream_file);
    migrate_refusable(&daemon, &stream);
    assert!(
        destination.wait_received(0, SECS) == expected,
        "proxy output differs from migproxy rewrite"
    );
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    let dropped = summary["fields"]["dropped"].as_str().unwrap_or_default();
    for name in ["TCR2_EL1", "PIRE0_EL1", "PIR_EL1"] {
        assert!(dropped.contains(name), "{name} not in {summary}");
    }
}

#[test]
fn the_downgrades_are_refused_by_name_and_the_stream_is_cut_short() {
    let dir = TempDir::new("kvm-daemon-down");
    for (src, dest, names) in [
        (
            "7.3",
            "6.12",
            vec!["KVM_REG_ARM_PSCI_VERSION 1.3 (0x10003)"],
        ),
        (
            "6.12",
            "6.1",
            vec![
                "CCSIDR[L1 data]",
                "CCSIDR[L2 data]",
                "CLIDR_EL1",
                "ID_AA64DFR0_EL1",
            ],
        ),
        (
            "7.3",
            "6.1",
            vec!["CCSIDR[L1 instruction]", "KVM_REG_ARM_PSCI_VERSION 1.3"],
        ),
    ] {
        let (stream, stream_file, _) = kernel(&dir, src);
        let (_, _, profile) = kernel(&dir, dest);
        let destination = Destination::reading();
        let daemon = daemon_to(&destination, &profile, &stream_file);
        migrate_refusable(&daemon, &stream);
        let summary = daemon.wait_log("migration summary", SECS);
        assert_eq!(
            summary["fields"]["outcome"], "refused",
            "{src} -> {dest}: {summary}"
        );
        let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
        for name in names {
            assert!(
                reason.contains(name),
                "{src} -> {dest}: {name} not in {reason}"
            );
        }
        // Held back at the cpu section: what reached the destination is an unchanged prefix
        // that ends before the device state, and the daemon closed it.
        let received = destination.wait_received(0, SECS);
        assert!(
            received.len() < stream.len() && stream.starts_with(&received),
            "{src} -> {dest}: {} of {} bytes reached the destination",
            received.len(),
            stream.len()
        );
    }
}
