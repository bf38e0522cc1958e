//! QEMU 10.0 -> 10.0 through migproxy: with a destination profile equal to the source the proxy
//! forwards the registers untouched; without a profile (checking relay) even a postcopy
//! migration goes through, its device-state package carried as an opaque blob.

use anyhow::bail;
use migproxy_integration_tests::flows::{expect_summary, start_proxy, Pair, Setup};
use migproxy_integration_tests::migproxy::event_field;
use migproxy_integration_tests::qemu::Version::V10;
use migproxy_integration_tests::qmp::migration_status;
use migproxy_integration_tests::scenario::{self, a64fx};
use migproxy_integration_tests::MIGRATION_TIMEOUT;
use serde_json::{json, Value};

/// What the daemon logs for a migration it relays without a profile.
const CHECKING_RELAY: &str = "checking relay: no destination profile, registers are not rewritten";

#[test]
fn proxy_10_to_10_equal_profile_changes_nothing() {
    scenario::run("proxy_10_to_10_equal_profile", |s| {
        let setup = Setup::new(a64fx(V10), a64fx(V10)).return_path();
        let profiles = s.profile_args(&setup.source, &setup.dest)?;
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &profiles)?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        scenario::assert_migrated(&mut pair.source, &mut pair.dest)?;
        let summary = expect_summary(&daemon, "completed")?;
        let rewritten = event_field(&summary, "cpus_rewritten");
        let dropped = event_field(&summary, "dropped");
        let filled = event_field(&summary, "filled");
        if rewritten != "0" || !dropped.is_empty() || !filled.is_empty() {
            bail!("equal profiles, yet migproxy changed registers: rewritten {rewritten}, dropped [{dropped}], filled [{filled}]");
        }
        if !daemon.events_named("cpu registers rewritten").is_empty() {
            bail!("migproxy logged a register rewrite for equal profiles");
        }
        Ok(())
    });
}

#[test]
fn checking_relay_10_to_10_postcopy_completes() {
    scenario::run("checking_relay_10_to_10_postcopy", |s| {
        // 4 MiB/s with a 1 ms downtime limit: precopy cannot converge, postcopy must finish it.
        let setup = Setup::new(a64fx(V10), a64fx(V10)).postcopy().slow(4 << 20);
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &[])?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        pair.source.qmp.wait_migrate_until(
            "an active migration",
            MIGRATION_TIMEOUT,
            |info: &Value| {
                migration_status(info) == "active"
                    && info
                        .pointer("/ram/transferred")
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        > 0
            },
        )?;
        pair.source
            .qmp
            .execute("migrate-start-postcopy", json!({}))?;
        scenario::assert_migrated(&mut pair.source, &mut pair.dest)?;
        let info = pair.source.qmp.query_migrate()?;
        let postcopy_bytes = info
            .pointer("/ram/postcopy-bytes")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if postcopy_bytes == 0 {
            bail!("the migration completed without entering postcopy: {info}");
        }
        eprintln!("  {postcopy_bytes} bytes sent in postcopy");
        let summary = expect_summary(&daemon, "completed")?;
        if daemon.events_named(CHECKING_RELAY).is_empty() {
            bail!("migproxy did not say it ran as a checking relay ({CHECKING_RELAY:?})");
        }
        if event_field(&summary, "cpus_rewritten") != "0" {
            bail!("a checking relay rewrote registers: {summary}");
        }
        Ok(())
    });
}
