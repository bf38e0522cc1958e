//! `migproxy run` end to end with raw sockets: the real binary between a source socket that
//! writes a captured QEMU stream and a destination listener.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use serde_json::Value;

const SECS: Duration = Duration::from_secs(20);

#[test]
fn checking_relay_forwards_a_real_stream_unchanged_and_metrics_show_it() {
    let reply = vector("q10-rp-main.d2s");
    let destination = Destination::start(vec![Behaviour::ReadAll {
        reply: reply.clone(),
    }]);
    let daemon = Daemon::to(&destination, &[]);
    let stream = vector("q10-rp-main.bin");

    let back = migrate(&daemon, &stream);

    assert_eq!(
        destination.wait_received(0, SECS),
        stream,
        "forwarded bytes differ"
    );
    assert_eq!(back, reply, "the return path was not relayed");
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    assert_eq!(summary["fields"]["return_path"], true, "{summary}");
    assert_eq!(
        summary["fields"]["bytes_to_destination"].as_u64(),
        Some(stream.len() as u64)
    );
    assert_eq!(
        daemon.metric("migproxy_migrations_total{outcome=\"completed\"}"),
        Some(1)
    );
    assert_eq!(
        daemon.metric("migproxy_bytes_total{direction=\"to_destination\"}"),
        Some(stream.len() as u64)
    );
    assert_eq!(
        daemon.metric("migproxy_connections_total{kind=\"main\"}"),
        Some(1)
    );
    assert_eq!(daemon.get("/healthz").0, 200);
    assert_eq!(daemon.get("/readyz").0, 200);
}

/// The `description` field of every "device state forwarded" event so far, in order.
fn descriptions(daemon: &Daemon, migrations: usize) -> Vec<String> {
    let forwarded = "device state forwarded";
    wait_until("device states forwarded", SECS, || {
        (daemon.count_logs(forwarded) >= migrations).then_some(())
    });
    (0..migrations)
        .map(|n| {
            // The n-th event: wait_event finds the first that `accept`s, so count them off.
            let seen = std::cell::Cell::new(0);
            let event = daemon.wait_event(forwarded, SECS, |_| {
                seen.set(seen.get() + 1);
                seen.get() == n + 1
            });
            event["fields"]["description"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[test]
fn a_checking_relay_reuses_the_description_from_its_second_migration_on() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &[]);
    let stream = vector("q10-a64fx.bin");
    for index in 0..3 {
        migrate(&daemon, &stream);
        assert_eq!(destination.wait_received(index, SECS), stream);
    }
    // A different configuration (7.2) parses, and its description replaces the cached one.
    let other = vector("q72-a64fx.bin");
    migrate(&daemon, &other);
    assert_eq!(destination.wait_received(3, SECS), other);
    migrate(&daemon, &stream);
    assert_eq!(destination.wait_received(4, SECS), stream);
    assert_eq!(
        descriptions(&daemon, 5),
        ["parsed", "reused", "reused", "parsed", "parsed"]
    );
}

#[test]
fn a_rewriting_relay_reuses_the_source_references_description_from_its_first_migration() {
    let reference = vector_path("q72-a64fx.bin");
    let (_dir, destination, daemon) =
        rewriting_for_72("reuse", &["--source-reference", &reference]);
    let stream = vector("q72-a64fx.bin");
    for index in 0..2 {
        migrate(&daemon, &stream);
        destination.wait_received(index, SECS);
    }
    assert_eq!(descriptions(&daemon, 2), ["reused", "reused"]);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
}

#[test]
fn a_source_may_start_its_next_migration_the_moment_the_last_one_closed() {
    // The source sees its connection close only after the daemon stopped counting that
    // migration as open: an immediate next main channel is a new migration, never refused as a
    // duplicate of the one still closing its connections.
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &[]);
    let stream = vector("q10-a64fx.bin");
    const MIGRATIONS: usize = 20;
    for _ in 0..MIGRATIONS {
        migrate(&daemon, &stream);
    }
    for index in 0..MIGRATIONS {
        assert_eq!(
            destination.wait_received(index, SECS),
            stream,
            "migration {index}"
        );
    }
    assert_eq!(
        daemon.turned_away("migration_in_progress").unwrap_or(0),
        0,
        "a back-to-back migration was refused as a duplicate"
    );
    wait_until("every migration completed", SECS, || {
        let completed = daemon.metric("migproxy_migrations_total{outcome=\"completed\"}");
        (completed == Some(MIGRATIONS as u64)).then_some(())
    });
}

#[test]
fn stray_connections_never_reach_the_destination() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &["--identify-timeout", "300"]);
    // A port probe that sends nothing, and a client that speaks the wrong protocol.
    let mut silent = connect(daemon.listen);
    let mut garbage = connect(daemon.listen);
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    read_until_closed(&mut silent);
    read_until_closed(&mut garbage);
    assert_eq!(
        destination.accepted(),
        0,
        "a stray connection was dialed upstream"
    );
    assert_eq!(
        daemon.metric("migproxy_connections_total{kind=\"stray\"}"),
        Some(2)
    );

    // The migration that follows still goes through, alone.
    let stream = vector("q72-a64fx.bin");
    migrate(&daemon, &stream);
    assert_eq!(destination.wait_received(0, SECS), stream);
    assert_eq!(destination.accepted(), 1);
}

/// A destination that dies after 64 KiB of a captured stream (a few hundred KB, which the
/// kernel buffers between the proxy and it can hold): the proxy may already have written all of
/// it, and learns of the death from the destination's end of the connection, not from a write.
#[test]
fn destination_dying_mid_stream_closes_the_source_and_the_daemon_keeps_serving() {
    let destination = Destination::start(vec![
        Behaviour::DieAfter(64 * 1024),
        Behaviour::ReadAll { reply: Vec::new() },
    ]);
    let daemon = Daemon::to(&destination, &[]);
    let stream = vector("q72-a64fx.bin");

    let mut source = connect(daemon.listen);
    // The write may fail once the proxy has closed us: that is the expected outcome. The source
    // does not close its side: the proxy must not wait for it.
    let _ = source.write_all(&stream);
    read_until_closed(&mut source);
    assert!(destination.wait_received(0, SECS).len() <= 64 * 1024);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "failed", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    // Which end the proxy sees first is a race: its write failing, or the destination's reset,
    // before or after the last of the stream went out (all of it fits in the kernel's buffers).
    assert!(
        reason.starts_with("destination reset the connection")
            || reason.contains("destination closed the connection before the stream ended")
            || reason.contains("write to destination"),
        "{summary}"
    );

    migrate(&daemon, &stream);
    assert_eq!(destination.wait_received(1, SECS), stream);
}

/// A real return path (PONG 1, SHUT 0) whose SHUT says `status` instead.
fn real_return_path_ending_with(status: u8) -> Vec<u8> {
    let mut reply = vector("q10-rp-main.d2s");
    assert!(reply.ends_with(&shut(0)), "the capture ends with SHUT 0");
    let at = reply.len() - 1;
    reply[at] = status;
    reply
}

/// Run one migration of `stream` against a destination that behaves as `behaviour`; the source
/// must hear the return path byte for byte. Returns the summary.
fn end_of_migration(stream: &str, behaviour: Behaviour, reply: &[u8]) -> (Daemon, Value) {
    let destination = Destination::start(vec![behaviour]);
    let daemon = Daemon::to(&destination, &[]);
    let stream = vector(stream);
    let back = migrate(&daemon, &stream);
    assert_eq!(destination.wait_received(0, SECS), stream);
    assert_eq!(back, reply, "the return path was not relayed byte for byte");
    let summary = daemon.wait_log("migration summary", SECS);
    (daemon, summary)
}

fn assert_outcome(daemon: &Daemon, summary: &Value, outcome: &str, reason: &str) {
    assert_eq!(summary["fields"]["outcome"], outcome, "{summary}");
    assert_eq!(summary["fields"]["reason"], reason, "{summary}");
    let sample = format!("migproxy_migrations_total{{outcome=\"{outcome}\"}}");
    assert_eq!(daemon.metric(&sample), Some(1), "{sample}");
}

#[test]
fn a_clean_shut_completes_the_migration_even_when_the_destination_then_resets() {
    let reply = vector("q10-rp-main.d2s");
    let (daemon, summary) = end_of_migration(
        "q10-rp-main.bin",
        Behaviour::ReadAllThenReset {
            reply: reply.clone(),
        },
        &reply,
    );
    assert_outcome(&daemon, &summary, "completed", "");
}

#[test]
fn a_shut_with_an_error_fails_the_migration_naming_the_destination_verdict() {
    let reply = real_return_path_ending_with(1);
    let (daemon, summary) = end_of_migration(
        "q10-rp-main.bin",
        Behaviour::ReadAll {
            reply: reply.clone(),
        },
        &reply,
    );
    assert_outcome(
        &daemon,
        &summary,
        "failed",
        "destination reported a failed load (return path SHUT 1)",
    );
    assert_eq!(
        daemon.metric("migproxy_migrations_total{outcome=\"completed\"}"),
        Some(0)
    );
}

#[test]
fn a_reset_after_the_stream_ended_without_a_return_path_fails_the_migration() {
    let (daemon, summary) = end_of_migration(
        "q72-a64fx.bin",
        Behaviour::ReadAllThenReset { reply: Vec::new() },
        &[],
    );
    assert_outcome(
        &daemon,
        &summary,
        "failed",
        "destination reset the connection after the stream ended",
    );
}

#[test]
fn a_clean_close_without_a_return_path_completes_the_migration() {
    let (daemon, summary) = end_of_migration(
        "q72-a64fx.bin",
        Behaviour::ReadAll { reply: Vec::new() },
        &[],
    );
    assert_outcome(&daemon, &summary, "completed", "");
}

#[test]
fn a_return_path_closed_without_its_shut_fails_the_migration() {
    let (daemon, summary) = end_of_migration(
        "q10-rp-main.bin",
        Behaviour::ReadAll { reply: Vec::new() },
        &[],
    );
    assert_outcome(
        &daemon,
        &summary,
        "failed",
        "destination closed the connection without the return path's SHUT",
    );
}

/// The race between a failed write and the destination's verdict: a destination whose load
/// fails mid-stream sends `SHUT 1` and exits while migproxy waits to write the stream. The
/// daemon is stopped (SIGSTOP) while the destination does all of that, so its write and its
/// return-path relay wake at once, in an order the pump chooses (its unit tests cover the
/// write-first order): the verdict must name the destination's failed load
/// (with the write's error as context when the write came first), the source must hear the
/// `SHUT`, and migproxy closes it.
#[test]
fn a_failed_load_reported_while_migproxy_waits_to_write_is_named_by_the_verdict() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)> = Default::default();
    let destination = Destination::start(vec![Behaviour::FailLoadAfter {
        read: 64 * 1024,
        reply: shut(1),
        gate: Arc::clone(&gate),
    }]);
    let daemon = Daemon::to(&destination, &[]);
    // More than the kernel's buffers on both legs hold: migproxy ends up waiting in a write.
    let stream = Arc::new(with_extra_pages(&vector("q10-rp-main.bin"), 8192)); // +32 MiB
    let written = Arc::new(AtomicUsize::new(0));
    let mut source = connect(daemon.listen);
    let writer = {
        let (stream, written) = (Arc::clone(&stream), Arc::clone(&written));
        let mut source = source.try_clone().unwrap();
        std::thread::spawn(move || {
            for chunk in stream.chunks(256 * 1024) {
                // Fails once migproxy has closed the source: that is the expected end.
                if source.write_all(chunk).is_err() {
                    return;
                }
                written.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        })
    };
    let mut last = usize::MAX;
    wait_until("the source to be blocked", SECS, || {
        std::thread::sleep(Duration::from_millis(500));
        let now = written.load(Ordering::Relaxed);
        let stalled = now == last;
        last = now;
        stalled.then_some(())
    });
    assert!(last < stream.len(), "the whole stream went through");

    daemon.signal("STOP");
    open_gate(&gate);
    // The destination has sent its SHUT 1 and reset the connection while migproxy was stopped.
    let received = destination.wait_received(0, SECS);
    assert_eq!(received, stream[..received.len()], "forwarded bytes differ");
    daemon.signal("CONT");

    let back = read_until_closed(&mut source);
    writer.join().unwrap();
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "failed", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    let verdict = "destination reported a failed load (return path SHUT 1)";
    assert!(
        reason == verdict
            || reason.starts_with(&format!(
                "{verdict} (meanwhile main channel: write to destination: "
            )),
        "{summary}"
    );
    assert_eq!(
        back,
        shut(1),
        "the source did not hear the destination's SHUT"
    );
}

#[test]
fn source_dying_mid_stream_closes_the_destination_and_the_daemon_keeps_serving() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &[]);
    let stream = vector("q72-a64fx.bin");
    let half = stream.len() / 2;

    let mut source = connect(daemon.listen);
    source.write_all(&stream[..half]).unwrap();
    drop(source);
    let received = destination.wait_received(0, SECS);
    assert!(received.len() <= half, "more than the source sent");
    assert_eq!(received, stream[..received.len()], "forwarded bytes differ");
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "failed", "{summary}");

    migrate(&daemon, &stream);
    assert_eq!(destination.wait_received(1, SECS), stream);
}

#[test]
fn a_missing_description_fails_closed_after_the_deadline() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &["--description-timeout", "300"]);
    let stream = vector("q72-a64fx.bin");
    let cut = description_offset(&stream);

    // Everything up to the description, then the source waits (as with suppress-vmdesc and a
    // return path): the proxy must not hang with it.
    let mut source = connect(daemon.listen);
    source.write_all(&stream[..cut]).unwrap();
    read_until_closed(&mut source);
    let received = destination.wait_received(0, SECS);
    assert!(
        received.len() < cut,
        "held device state was released without a description"
    );
    assert_summary(&daemon, "refused", "description");
}

/// The description deadline runs from the device phase's first byte, not from the last byte:
/// pieces spaced below it but adding up to several times it are refused at the deadline (before
/// the fix any byte reset the clock, so a trickling source held both QEMUs stopped at will), and
/// the same trickle completes under a deadline configured long enough for it.
#[test]
fn a_device_phase_that_trickles_in_longer_than_the_deadline_is_refused_at_the_deadline() {
    let stream = vector("q72-a64fx.bin");
    let cut = description_offset(&stream);
    let device_start = cut.saturating_sub(8 * 1024);
    for (deadline_ms, outcome) in [("300", "refused"), ("60000", "completed")] {
        let destination = Destination::reading();
        let daemon = Daemon::to(&destination, &["--description-timeout", deadline_ms]);
        let mut source = connect(daemon.listen);
        source.write_all(&stream[..device_start]).unwrap();
        for piece in stream[device_start..].chunks(1024) {
            std::thread::sleep(Duration::from_millis(150));
            // Once refused, the proxy has closed us: the write may fail.
            if source.write_all(piece).is_err() {
                break;
            }
        }
        let _ = source.shutdown(Shutdown::Write);
        read_until_closed(&mut source);
        let summary = daemon.wait_log("migration summary", SECS);
        assert_eq!(summary["fields"]["outcome"], outcome, "{summary}");
        let received = destination.wait_received(0, SECS);
        if outcome == "completed" {
            assert_eq!(received, stream);
        } else {
            let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains("no verified description within 300 ms"),
                "{reason}"
            );
            assert!(
                received.len() < cut,
                "the device phase reached the destination"
            );
        }
    }
}

#[test]
fn sigterm_lets_a_live_migration_finish_then_exits_zero() {
    let destination = Destination::reading();
    let mut daemon = Daemon::to(&destination, &["--drain-timeout", "20"]);
    let stream = vector("q72-a64fx.bin");
    let half = stream.len() / 2;

    let mut source = connect(daemon.listen);
    source.write_all(&stream[..half]).unwrap();
    daemon.wait_log("channel identified", SECS);
    daemon.signal("TERM");
    daemon.wait_log("shutting down: no new migrations accepted", SECS);
    // Draining: no new connections, not ready, still healthy.
    wait_until("listener closed", SECS, || {
        std::net::TcpStream::connect(daemon.listen)
            .is_err()
            .then_some(())
    });
    assert_eq!(daemon.get("/readyz").0, 503);
    assert_eq!(daemon.get("/healthz").0, 200);

    source.write_all(&stream[half..]).unwrap();
    source.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut source);
    assert_eq!(destination.wait_received(0, SECS), stream);
    let status = daemon.wait_exit(SECS);
    assert_eq!(status.code(), Some(0));
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
}

#[test]
fn sigterm_closes_migrations_still_running_at_the_drain_deadline() {
    let destination = Destination::reading();
    let mut daemon = Daemon::to(&destination, &["--drain-timeout", "1"]);
    let stream = vector("q72-a64fx.bin");

    let mut source = connect(daemon.listen);
    source.write_all(&stream[..stream.len() / 2]).unwrap();
    daemon.wait_log("channel identified", SECS);
    daemon.signal("TERM");
    read_until_closed(&mut source);
    assert!(destination.wait_received(0, SECS).len() < stream.len());
    assert_eq!(daemon.wait_exit(SECS).code(), Some(0));
}

#[test]
fn invalid_configuration_fails_before_binding_with_exit_2() {
    let dir = std::env::temp_dir().join(format!("migproxy-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    std::fs::write(
        &config,
        "[[listener]]\nlisten = \"tcp:127.0.0.1:0\"\nupstream = \"tcp:127.0.0.1:1\"\nupstraem = \"x\"\n",
    )
    .unwrap();
    for args in [
        vec!["run", "--config", config.to_str().unwrap()],
        vec![
            "run",
            "--listen",
            "127.0.0.1:4444",
            "--upstream",
            "tcp:127.0.0.1:1",
        ],
        vec![
            "run",
            "--listen",
            "tcp:127.0.0.1:0",
            "--upstream",
            "tcp:127.0.0.1:1",
            "--dest-profile",
            "/nonexistent/profile.json",
        ],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_migproxy"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(!stderr.contains("listening"), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn healthcheck_reports_the_daemon_state() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &[]);
    let healthcheck = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_migproxy"))
            .args(["healthcheck", "--url", &url])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(
        healthcheck(format!("http://{}/healthz", daemon.admin)),
        Some(0)
    );
    assert_eq!(
        healthcheck(format!("http://{}/nothing", daemon.admin)),
        Some(1)
    );
    drop(daemon);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(healthcheck(format!("http://{closed}/healthz")), Some(1));
}

#[test]
fn rewrites_like_the_offline_rewrite_with_a_profile_fetched_from_the_destination_daemon() {
    let dir = TempDir::new("rewrite");
    let dest_profile = vector_profile(&dir, "q72-a64fx.bin", &[], "dest72.json");
    let source_profile = vector_profile(&dir, "q10m72-a64fx.bin", &[], "src10.json");
    let expected_file = dir.file("expected.bin");
    migproxy(&[
        "rewrite",
        &vector_path("q10m72-a64fx.bin"),
        &expected_file,
        "--dest-profile",
        &dest_profile,
        "--source-profile",
        &source_profile,
    ]);
    let expected = std::fs::read(&expected_file).unwrap();
    let stream = vector("q10m72-a64fx.bin");
    assert_ne!(expected, stream);

    // The destination host's daemon advertises its profile; the source side fetches it per migration.
    let destination = Destination::reading();
    let advertiser = Daemon::start(&[
        "--upstream",
        "tcp:127.0.0.1:1",
        "--serve-profile",
        &format!("a64fx-7.2={dest_profile}"),
    ]);
    let (status, body) = advertiser.get("/profiles/a64fx-7.2");
    assert_eq!(status, 200);
    assert_eq!(body, std::fs::read_to_string(&dest_profile).unwrap());
    assert_eq!(advertiser.get("/profiles/other").0, 404);
    let url = format!("http://{}/profiles/a64fx-7.2", advertiser.admin);
    // The source stream is a paused VM's: it is its own configuration's reference.
    let source_reference = vector_path("q10m72-a64fx.bin");
    let daemon = Daemon::to(
        &destination,
        &rewriting_args(&url, &source_profile, &source_reference),
    );
    migrate(&daemon, &stream);
    assert!(
        destination.wait_received(0, SECS) == expected,
        "proxy output differs from migproxy rewrite"
    );
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    assert_eq!(summary["fields"]["cpus_rewritten"], 2, "{summary}");
    let dropped = summary["fields"]["dropped"].as_str().unwrap_or_default();
    assert!(dropped.contains("RMR_EL1"), "{summary}");
    assert_eq!(daemon.metric("migproxy_cpus_rewritten_total"), Some(2));
}

/// A daemon rewriting for the 7.2 a64fx profile (captured from the real 7.2 stream) towards a
/// reading destination, with `args`; the directory holds the profile.
fn rewriting_for_72(name: &str, args: &[&str]) -> (TempDir, Destination, Daemon) {
    let dir = TempDir::new(name);
    let dest_profile = vector_profile(&dir, "q72-a64fx.bin", &[], "dest72.json");
    let destination = Destination::reading();
    let mut all = vec!["--dest-profile", dest_profile.as_str()];
    all.extend_from_slice(args);
    let daemon = Daemon::to(&destination, &all);
    (dir, destination, daemon)
}

#[test]
fn postcopy_is_refused_at_advise_when_rewriting() {
    // The reference of the source's configuration (a paused 7.2 a64fx VM): without one the
    // migration would be refused even earlier, at its first bytes.
    let (_dir, destination, daemon) = rewriting_for_72(
        "postcopy",
        &["--source-reference", &vector_path("q72-a64fx.bin")],
    );
    let stream = vector("q72-postcopy-main.bin");

    let mut source = connect(daemon.listen);
    let _ = source.write_all(&stream);
    read_until_closed(&mut source);
    // Nothing past the header may reach the destination: no RAM moved.
    assert!(destination.wait_received(0, SECS).len() < 4096);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "refused", "{summary}");
    assert_eq!(summary["fields"]["postcopy"], "unrecoverable", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("postcopy advised"), "{reason}");
    assert!(reason.contains("no source profile"), "{reason}");
}

/// `--unrecoverable-postcopy allow`: the ADVISE goes through, and the captured 7.2 stream's switch
/// is refused at its package (named by its offset), before any of the package reaches the
/// destination. The package is refused because no source reference gives its layout, so this
/// proxy runs without one, which it must say (`--unreferenced-device-phase allow`).
#[test]
fn an_allowed_switch_is_refused_at_the_package_when_rewriting() {
    let (_dir, destination, daemon) = rewriting_for_72(
        "postcopy-allow",
        &[
            "--unrecoverable-postcopy",
            "allow",
            "--unreferenced-device-phase",
            "allow",
        ],
    );
    let stream = vector("q72-postcopy-main.bin");
    // Where the package starts: `08 0007 0004` after the RAM the source sent before switching.
    let package = stream
        .windows(5)
        .position(|w| w == [0x08, 0x00, 0x07, 0x00, 0x04])
        .unwrap_or(stream.len());

    let mut source = connect(daemon.listen);
    let _ = source.write_all(&stream);
    read_until_closed(&mut source);
    // What was still queued when the refusal came is dropped with the connection.
    let received = destination.wait_received(0, SECS);
    assert!(received.len() <= package, "{} > {package}", received.len());
    assert!(received == stream[..received.len()]);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "refused", "{summary}");
    assert_eq!(summary["fields"]["postcopy"], "unrecoverable", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("postcopy package at byte {package}:")),
        "{reason}"
    );
    assert!(reason.contains("cannot take its guest back"), "{reason}");
}

/// The captured 7.2 stream that switched to postcopy, towards a 10.0 destination profile, with
/// the reference description of a fresh 7.2 VM of the same configuration: its package is
/// walked and rewritten, everything before it is forwarded byte for byte.
#[test]
fn a_real_package_is_rewritten_with_the_source_reference() {
    let dir = TempDir::new("postcopy-reference");
    let dest_profile = vector_profile(&dir, "q10m72-a64fx.bin", &[], "dest10.json");
    let source_profile = vector_profile(
        &dir,
        "q72-a64fx.bin",
        &["--qemu-version", "7.2.22"],
        "source72.json",
    );
    let fresh72 = vector_path("q72-a64fx.bin");
    let destination = Destination::loading();
    let mut args = rewriting_args(&dest_profile, &source_profile, &fresh72);
    args.extend(["--unrecoverable-postcopy", "allow"]);
    let daemon = Daemon::to(&destination, &args);
    let stream = vector("q72-postcopy-main.bin");
    let package = stream
        .windows(5)
        .position(|w| w == [0x08, 0x00, 0x07, 0x00, 0x04])
        .unwrap_or(stream.len());
    migrate(&daemon, &stream);
    let received = destination.wait_received(0, SECS);
    assert!(received.len() > package);
    assert!(received[..package] == stream[..package]);
    assert!(received != stream, "the package went through unchanged");
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    assert_eq!(summary["fields"]["postcopy"], "unrecoverable", "{summary}");
    assert_eq!(summary["fields"]["cpus_rewritten"], 2, "{summary}");
}

#[test]
fn postcopy_passes_a_checking_relay() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &[]);
    let stream = vector("q72-postcopy-main.bin");
    migrate(&daemon, &stream);
    assert!(destination.wait_received(0, SECS) == stream);
}

/// Once the channels opened before it have had time to reach the destination (and must not
/// have): the main channel sends its whole `stream` and half-closes. Returns it, still open.
fn send_main_channel_after_early_ones(
    daemon: &Daemon,
    destination: &Destination,
    stream: &[u8],
) -> std::net::TcpStream {
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        destination.accepted(),
        0,
        "a channel was dialed before the main channel"
    );
    let mut main = connect(daemon.listen);
    main.write_all(stream).unwrap();
    main.shutdown(Shutdown::Write).unwrap();
    main
}

#[test]
fn the_main_channel_reaches_the_destination_first_even_when_multifd_identifies_first() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &["--identify-timeout", "3000"]);
    let stream = vector("q72-mfd-main.bin");
    let multifd = |id: u8| {
        let mut handshake = vec![0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1];
        handshake.extend_from_slice(&[0; 16]);
        handshake.push(id);
        handshake.extend_from_slice(&[0; 39]);
        handshake
    };
    // Multifd channels that send their handshake before the main channel says anything.
    let mut channel1 = connect(daemon.listen);
    channel1.write_all(&multifd(1)).unwrap();
    let mut channel0 = connect(daemon.listen);
    channel0.write_all(&multifd(0)).unwrap();
    let _main = send_main_channel_after_early_ones(&daemon, &destination, &stream);
    for channel in [&mut channel0, &mut channel1] {
        channel.shutdown(Shutdown::Write).unwrap();
    }
    assert!(
        destination.wait_received(0, SECS) == stream,
        "connection 0 is not the main channel"
    );
    let mut others = [
        destination.wait_received(1, SECS),
        destination.wait_received(2, SECS),
    ];
    others.sort();
    assert_eq!(others, [multifd(0), multifd(1)]);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(
        summary["fields"]["channels"], "main+multifd+multifd",
        "{summary}"
    );
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
}

#[test]
fn a_preempt_channel_that_connects_before_the_main_channel_joins_once_postcopy_is_advised() {
    let destination = Destination::reading();
    let daemon = Daemon::to(&destination, &["--identify-timeout", "3000"]);
    let stream = vector("q72-postcopy-main.bin");
    // No known magic: only a migration that advises postcopy takes it, as its preempt channel.
    let preempt_bytes = b"preempt channel bytes".to_vec();
    let mut preempt = connect(daemon.listen);
    preempt.write_all(&preempt_bytes).unwrap();
    // The whole main stream (ADVISE among its first records) goes through at once.
    let _main = send_main_channel_after_early_ones(&daemon, &destination, &stream);
    preempt.shutdown(Shutdown::Write).unwrap();
    assert!(
        destination.wait_received(0, SECS) == stream,
        "connection 0 is not the main channel"
    );
    assert_eq!(destination.wait_received(1, SECS), preempt_bytes);
    let summary = daemon.wait_log("migration summary", SECS);
    // The outcome is not this test's: a reading destination sends no return-path SHUT.
    assert_eq!(summary["fields"]["channels"], "main+preempt", "{summary}");
}

#[test]
fn a_slow_destination_slows_the_source_instead_of_filling_memory() {
    let gate: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)> = Default::default();
    let destination = Destination::start(vec![Behaviour::Gated(std::sync::Arc::clone(&gate))]);
    let daemon = Daemon::to(&destination, &[]);
    let stream = std::sync::Arc::new(with_extra_pages(&vector("q72-a64fx.bin"), 16384)); // +64 MiB
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut source = connect(daemon.listen);
    let writer = {
        let (stream, written) = (
            std::sync::Arc::clone(&stream),
            std::sync::Arc::clone(&written),
        );
        let mut source = source.try_clone().unwrap();
        std::thread::spawn(move || {
            for chunk in stream.chunks(256 * 1024) {
                source.write_all(chunk).unwrap();
                written.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
            source.shutdown(Shutdown::Write).unwrap();
        })
    };
    // Wait until the source is blocked: nothing more accepted for half a second.
    let mut last = usize::MAX;
    wait_until("the source to be blocked", SECS, || {
        std::thread::sleep(Duration::from_millis(500));
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        let stalled = now == last;
        last = now;
        stalled.then_some(())
    });
    assert!(
        last < stream.len() / 2,
        "the source was not slowed down ({last} bytes accepted)"
    );
    let peak_kib = daemon.peak_rss_kib();
    assert!(
        peak_kib > 0 && peak_kib < 48 * 1024,
        "daemon peak RSS {peak_kib} KiB while the destination reads nothing"
    );

    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    writer.join().unwrap();
    read_until_closed(&mut source);
    assert!(
        destination.wait_received(0, SECS) == *stream,
        "forwarded bytes differ"
    );
    assert!(daemon.peak_rss_kib() < 48 * 1024);
}

#[test]
fn a_config_file_runs_several_listeners_over_tcp_and_unix() {
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = TempDir::new("config");
    let dest_socket = dir.file("dest.sock");
    let in_socket = dir.file("in.sock");
    let unix_destination = UnixListener::bind(&dest_socket).unwrap();
    let unix_received = std::thread::spawn(move || {
        let (mut conn, _) = unix_destination.accept().unwrap();
        let mut data = Vec::new();
        conn.read_to_end(&mut data).unwrap();
        data
    });
    let tcp_destination = Destination::reading();
    let config = dir.file("migproxy.toml");
    std::fs::write(
        &config,
        format!(
            "admin = \"tcp:127.0.0.1:0\"\nidentify_timeout_ms = 500\n\n\
             [[listener]]\nlisten = \"tcp:127.0.0.1:0\"\nupstream = \"unix:{dest_socket}\"\n\n\
             [[listener]]\nlisten = \"unix:{in_socket}\"\nupstream = \"{}\"\n[listener.policy]\non_extra = \"refuse\"\n",
            tcp_destination.upstream()
        ),
    )
    .unwrap();
    let daemon = Daemon::start_raw(&["--config", &config]);
    let stream = vector("q72-a64fx.bin");

    // tcp -> unix
    migrate(&daemon, &stream);
    assert!(unix_received.join().unwrap() == stream);
    // unix -> tcp
    let mut source = UnixStream::connect(&in_socket).unwrap();
    source.write_all(&stream).unwrap();
    source.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    source.read_to_end(&mut back).unwrap();
    assert!(tcp_destination.wait_received(0, SECS) == stream);
    // The summary (and its counter) comes once every connection of the migration has ended.
    wait_until("two completed migrations", SECS, || {
        (daemon.metric("migproxy_migrations_total{outcome=\"completed\"}") == Some(2)).then_some(())
    });
}

#[test]
fn decoder_limits_are_configurable_and_fail_closed() {
    let destination = Destination::reading();
    let daemon = Daemon::to(
        &destination,
        &["--max-device-state", "1000", "--max-description", "1000"],
    );
    let stream = vector("q72-a64fx.bin");
    let mut source = connect(daemon.listen);
    let _ = source.write_all(&stream);
    read_until_closed(&mut source);
    assert!(destination.wait_received(0, SECS).len() < stream.len());
    assert_summary(&daemon, "failed", "limit");
}

#[test]
fn a_silent_channel_joins_a_postcopy_migration_as_its_preempt_channel() {
    let destination = Destination::loading();
    let daemon = Daemon::to(&destination, &["--identify-timeout", "300"]);
    let stream = vector("q72-postcopy-main.bin");
    let head = 64 * 1024; // well past POSTCOPY_ADVISE, which comes right after the configuration

    let mut main = connect(daemon.listen);
    main.write_all(&stream[..head]).unwrap();
    daemon.wait_log("channel identified", SECS);
    // QEMU 7.2 opens the preempt channel at the start and keeps it silent until postcopy ends.
    let mut preempt = connect(daemon.listen);
    wait_until("the preempt channel to be dialed", SECS, || {
        (destination.accepted() == 2).then_some(())
    });
    let eos = 0x10u64.to_be_bytes(); // RAM_SAVE_FLAG_EOS, all the 7.2 preempt channel ever sent here
    preempt.write_all(&eos).unwrap();
    preempt.shutdown(Shutdown::Write).unwrap();
    main.write_all(&stream[head..]).unwrap();
    main.shutdown(Shutdown::Write).unwrap();

    assert!(
        destination.wait_received(0, SECS) == stream,
        "connection 0 is not the main channel"
    );
    assert_eq!(destination.wait_received(1, SECS), eos);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["channels"], "main+preempt", "{summary}");
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
}

/// A destination that stops reading altogether: backpressure holds the source, but only until the
/// write stall deadline (`--write-stall-timeout`); then the migration is closed on both sides.
#[test]
fn a_destination_that_stops_reading_fails_the_migration_at_the_write_stall_deadline() {
    let gate: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)> = Default::default();
    let destination = Destination::start(vec![Behaviour::Gated(std::sync::Arc::clone(&gate))]);
    let daemon = Daemon::to(&destination, &["--write-stall-timeout", "500"]);
    let stream = with_extra_pages(&vector("q72-a64fx.bin"), 16384); // +64 MiB
    let mut source = connect(daemon.listen);
    let writer = {
        let mut source = source.try_clone().unwrap();
        std::thread::spawn(move || {
            // Fails once the proxy gives up and closes: that is the point.
            let _ = source.write_all(&stream);
        })
    };
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "failed", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(
            "main channel: write to destination: the peer took no bytes for 500 ms (--write-stall-timeout)"
        ),
        "{reason}"
    );
    read_until_closed(&mut source);
    writer.join().unwrap();
    assert_eq!(
        daemon.metric("migproxy_migrations_total{outcome=\"failed\"}"),
        Some(1)
    );
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
}
