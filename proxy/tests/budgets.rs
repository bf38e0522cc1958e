//! Every stream budget of the codec, hit through the real daemon: with the budget set just below
//! what a real captured stream needs, the migration fails closed with one line naming the budget,
//! the failure is counted, and the destination never receives the whole stream. (The connection
//! budgets are in `hostile.rs`, the deadlines next to what they guard: `daemon.rs`, `tls.rs`,
//! `profile_https.rs`.)

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

const SECS: Duration = Duration::from_secs(20);

/// One budget: its flag, a value the stream exceeds, the vector, and what the reason must say.
struct Case {
    flag: &'static str,
    value: &'static str,
    vector: &'static str,
    rewrite: bool,
    /// `failed` for a broken budget; `refused` where it shows as a refusal at a deadline.
    outcome: &'static str,
    says: &'static str,
}

const CASES: &[Case] = &[
    Case {
        flag: "--max-record",
        value: "64",
        vector: "q72-a64fx.bin",
        rewrite: false,
        outcome: "failed",
        says: "exceeds the limit of 64 bytes",
    },
    Case {
        flag: "--max-device-state",
        value: "1000",
        vector: "q72-a64fx.bin",
        rewrite: false,
        outcome: "failed",
        says: "exceeds the limit of 1000 bytes",
    },
    Case {
        flag: "--max-description",
        value: "1000",
        vector: "q72-a64fx.bin",
        rewrite: false,
        outcome: "refused",
        says: "a description over --max-description",
    },
    Case {
        flag: "--max-packaged",
        value: "1000",
        vector: "q72-postcopy-main.bin",
        rewrite: false,
        outcome: "failed",
        says: "exceeds the limit of 1000 bytes",
    },
    Case {
        flag: "--max-cpus",
        value: "1",
        vector: "q72-a64fx.bin",
        rewrite: false,
        // Checked in the walk that verifies an ending: the phase never verifies.
        outcome: "refused",
        says: "(limit max_cpus)",
    },
    Case {
        flag: "--max-cpregs",
        value: "16",
        vector: "q72-a64fx.bin",
        rewrite: false,
        outcome: "refused",
        says: "exceed the limit of 16 registers per vCPU",
    },
    Case {
        flag: "--max-rewrite-output",
        value: "1000",
        vector: "q10m72-a64fx.bin",
        rewrite: true,
        outcome: "failed",
        says: "over the limit of 1000 bytes",
    },
    Case {
        flag: "--max-sections",
        value: "1",
        vector: "q72-block.bin",
        rewrite: false,
        outcome: "failed",
        says: "(limit max_sections)",
    },
];

#[test]
fn every_stream_budget_fails_the_migration_closed_with_one_line_naming_it() {
    let dir = TempDir::new("budgets");
    let dest_profile = vector_profile(&dir, "q72-a64fx.bin", &[], "dest72.json");
    let source_profile = vector_profile(&dir, "q10m72-a64fx.bin", &[], "src10.json");
    for case in CASES {
        let destination = Destination::reading();
        let upstream = destination.upstream();
        let reference = vector_path(case.vector);
        let mut args = vec!["--upstream", &upstream, case.flag, case.value];
        if case.rewrite {
            // The reference is the stream itself: a saved stream of the source's configuration.
            args.extend(rewriting_args(&dest_profile, &source_profile, &reference));
        }
        // A short description deadline: the budget that shows at it need not wait 2 s.
        args.extend(["--description-timeout", "500"]);
        let daemon = Daemon::start(&args);
        let stream = vector(case.vector);
        let mut source = connect(daemon.listen);
        // The proxy closes the source as soon as the budget is hit.
        let _ = source.write_all(&stream);
        read_until_closed(&mut source);
        let summary = daemon.wait_log("migration summary", SECS);
        let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
        assert_eq!(
            summary["fields"]["outcome"], case.outcome,
            "{} {}: {summary}",
            case.flag, case.value
        );
        assert!(
            reason.contains(case.says) && !reason.contains('\n'),
            "{} {}: the reason does not say {:?}: {reason}",
            case.flag,
            case.value,
            case.says
        );
        assert_eq!(
            daemon.metric(&format!(
                "migproxy_migrations_total{{outcome=\"{}\"}}",
                case.outcome
            )),
            Some(1),
            "{} {}",
            case.flag,
            case.value
        );
        let received = destination.wait_received(0, SECS);
        assert!(
            received.len() < stream.len(),
            "{} {}: the destination received the whole stream",
            case.flag,
            case.value
        );
    }
}

/// `--max-connections` (all sources together): with a per-source budget above it, the
/// connection over the total is closed at accept and counted by its reason.
#[test]
fn connections_over_the_total_budget_are_refused_by_name() {
    let destination = Destination::reading();
    let daemon = Daemon::to(
        &destination,
        &[
            "--max-connections",
            "2",
            "--max-connections-per-source",
            "10",
            "--identify-timeout",
            "10000",
        ],
    );
    // Two connections that have not identified themselves yet hold the budget.
    let _first = connect(daemon.listen);
    let _second = connect(daemon.listen);
    let mut third = connect(daemon.listen);
    read_until_closed(&mut third);
    daemon.wait_log(
        "connection refused: budget exceeded (--max-connections): closed, destination not contacted",
        SECS,
    );
    assert_eq!(
        daemon.metric("migproxy_turned_away_total{reason=\"max_connections\"}"),
        Some(1)
    );
    assert_eq!(destination.accepted(), 0);
}

/// A stream at the vCPU budget, each vCPU with `per_vcpu` registers a one-register destination
/// lacks, all holding `value`.
fn many_vcpus(per_vcpu: u64, value: u64) -> Vec<u8> {
    use migproxy_codec::testing::{RamRecord, StreamBuilder};
    let mut builder = StreamBuilder::new("virt-7.2");
    builder.ram_start(1 << 20);
    builder.ram_section(true, &[RamRecord::Zero]);
    let registers: Vec<(u64, u64)> = (0..per_vcpu)
        .map(|n| (0x6030_0000_0013_0000 | n, value))
        .collect();
    for vcpu in 0..512 {
        builder.cpu(vcpu, &registers, 0x11);
    }
    builder.finish()
}

/// One migration of 512 vCPUs x 100 registers through the daemon: the daemon, the migration
/// summary, and how many log lines there were before it started.
fn migrate_many_vcpus(value: u64) -> (Daemon, serde_json::Value, usize) {
    let dir = TempDir::new("many-vcpus");
    let profile = dir.file("one-register.json");
    std::fs::write(
        &profile,
        r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [{"id": "0x603000000013c080", "value": "0x30d00980"}]}"#,
    )
    .unwrap();
    // The stream is its own source reference (the same configuration).
    let stream = many_vcpus(100, value);
    let reference = dir.file("reference.bin");
    std::fs::write(&reference, &stream).unwrap();
    let destination = Destination::reading();
    let daemon = Daemon::to(
        &destination,
        &["--dest-profile", &profile, "--source-reference", &reference],
    );
    let before = daemon.log_count();
    migrate_refusable(&daemon, &stream);
    let summary = daemon.wait_log("migration summary", SECS);
    (daemon, summary, before)
}

#[test]
fn refusing_512_vcpus_logs_one_bounded_line_not_one_per_vcpu() {
    let (daemon, summary, before) = migrate_many_vcpus(0x42);
    assert_eq!(summary["fields"]["outcome"], "refused", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("refused: vcpu 0-511 (512 vcpus): ")
            && reason.ends_with("and 92 more refused registers"),
        "{reason}"
    );
    assert!(reason.len() < 2048, "{} bytes", reason.len());
    let lines = daemon.log_count() - before;
    assert!(lines < 16, "{lines} log lines for one migration");
}

#[test]
fn rewriting_512_vcpus_logs_a_bounded_number_of_lines() {
    // Zero: unused since reset, every register dropped on every vCPU.
    let (daemon, summary, before) = migrate_many_vcpus(0);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    assert_eq!(summary["fields"]["cpus_rewritten"], 512, "{summary}");
    let dropped = summary["fields"]["dropped"].as_str().unwrap_or_default();
    assert!(dropped.ends_with(" and 36 more"), "{dropped}");
    let rewritten = daemon.wait_log("cpu registers rewritten", SECS);
    assert_eq!(
        rewritten["fields"]["vcpus"], "vcpu 0-511 (512 vcpus)",
        "{rewritten}"
    );
    assert_eq!(rewritten["fields"]["dropped"], 100, "{rewritten}");
    assert_eq!(daemon.count_logs("cpu registers rewritten"), 1);
    let lines = daemon.log_count() - before;
    assert!(lines < 16, "{lines} log lines for one migration");
}

/// The idle `cpu/wfxt-timer` of every vCPU of a real 11.1 stream, removed for a 10.0
/// destination: one "cpu subsection removed" event naming all the vCPUs, not one per vCPU.
#[test]
fn removing_a_subsection_from_every_vcpu_is_logged_once() {
    let dir = TempDir::new("wfxt-once");
    let dest_profile = vector_profile(
        &dir,
        "q10m72-a64fx.bin",
        &["--qemu-version", "10.0.2"],
        "dest10.json",
    );
    let source_profile = vector_profile(
        &dir,
        "q111m72-a64fx.bin",
        &["--qemu-version", "11.1.0"],
        "src111.json",
    );
    let destination = Destination::reading();
    let reference = vector_path("q111m72-a64fx.bin");
    let daemon = Daemon::to(
        &destination,
        &rewriting_args(&dest_profile, &source_profile, &reference),
    );
    migrate(&daemon, &vector("q111m72-a64fx.bin"));
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    assert_eq!(
        summary["fields"]["subsections_removed"], "cpu/wfxt-timer",
        "{summary}"
    );
    let removed = daemon.wait_log("cpu subsection removed", SECS);
    assert_eq!(
        removed["fields"]["vcpus"], "vcpu 0-1 (2 vcpus)",
        "{removed}"
    );
    assert_eq!(
        removed["fields"]["subsection"], "cpu/wfxt-timer",
        "{removed}"
    );
    assert_eq!(daemon.count_logs("cpu subsection removed"), 1);
}
