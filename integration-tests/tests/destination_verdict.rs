//! The destination's verdict at the end of a migration, through a checking relay (no profiles:
//! migproxy forwards the stream as it came and the destination loads it as it would a direct
//! one). QEMU 7.2 -> 10.0 with `-cpu a64fx` is refused by the destination itself: 7.2 sends
//! registers 10.0 does not know, and 10.0's `cpu` post_load fails the load at the end of the
//! device state, after migproxy has forwarded the whole stream.
//!
//! - with the return path the destination says so (`SHUT 1`) before it exits: the source keeps
//!   its guest and migproxy's summary is `failed`, naming the destination's verdict;
//! - without it the destination exits with the rest of the stream unread, which resets the
//!   connection: the source believes it completed (the guest stays paused on it), and migproxy's
//!   summary is `failed` all the same, saying the destination reset the connection.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use migproxy_integration_tests::flows::{expect_summary, start_proxy, Pair, Setup};
use migproxy_integration_tests::migproxy::event_field;
use migproxy_integration_tests::qemu::Version::{V10, V72};
use migproxy_integration_tests::scenario::{self, a64fx};

/// What 10.0 says when it refuses 7.2's a64fx registers (measured, `direct_baseline.rs`).
const DESTINATION_REFUSAL: &str = "error while loading state for instance 0x0 of device 'cpu'";
/// How long the destination may take to exit after its failed load.
const DEST_EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn destination_refused(pair: &mut Pair) -> Result<()> {
    let status = pair
        .dest
        .wait_exit(DEST_EXIT_TIMEOUT)
        .context("the destination should exit after its failed load")?;
    let log = pair.dest.log();
    if !log.contains(DESTINATION_REFUSAL) {
        bail!("destination log lacks {DESTINATION_REFUSAL:?}; it says:\n{log}");
    }
    eprintln!("  destination exited ({status}) refusing the cpu section");
    Ok(())
}

fn reason_says(summary: &serde_json::Value, expected: &[&str]) -> Result<()> {
    let reason = event_field(summary, "reason");
    if !expected.iter().any(|e| reason.contains(e)) {
        bail!("summary reason {reason:?} names none of {expected:?}: {summary}");
    }
    Ok(())
}

#[test]
fn a_destination_refusing_the_stream_at_its_end_fails_the_migration_with_return_path() {
    scenario::run("destination_refuses_at_end_return_path", |s| {
        let setup = Setup::new(a64fx(V72), a64fx(V10)).return_path();
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &[])?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        scenario::assert_source_kept_running(&mut pair.source)?;
        destination_refused(&mut pair)?;
        let summary = expect_summary(&daemon, "failed")?;
        reason_says(
            &summary,
            &["destination reported a failed load (return path SHUT 1)"],
        )
    });
}

#[test]
fn a_destination_refusing_the_stream_at_its_end_fails_the_migration_without_return_path() {
    scenario::run("destination_refuses_at_end_no_return_path", |s| {
        let setup = Setup::new(a64fx(V72), a64fx(V10));
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &[])?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        // Without a return path the source cannot hear the refusal: it believes it completed.
        let info = pair
            .source
            .qmp
            .wait_migration(&[], migproxy_integration_tests::MIGRATION_TIMEOUT)?;
        if info["status"] != "completed" {
            bail!("without a return path the source should report completed: {info}");
        }
        destination_refused(&mut pair)?;
        let summary = expect_summary(&daemon, "failed")?;
        // Where the reset lands is a race between the destination's exit and the stream's last
        // bytes: after the source's end, before it (the source closes just after its last
        // write), or on migproxy's last write.
        reason_says(
            &summary,
            &[
                "destination reset the connection after the stream ended",
                "destination reset the connection before the stream ended",
                "write to destination",
            ],
        )
    });
}
