//! One daemon, real-world disturbances: several migrations at once, a stray connection (a port
//! probe, a health check) before a migration, a destination that dies mid-migration, and a
//! rewriting daemon started without the source's reference description.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use migproxy_integration_tests::flows::{
    assert_destination_untouched, expect_summary, start_proxy, stray_connection, Pair, Setup,
    SUMMARY_TIMEOUT,
};
use migproxy_integration_tests::migproxy::{event_field, Daemon, SUMMARY};
use migproxy_integration_tests::ports::{free_port, tcp_uri};
use migproxy_integration_tests::qemu::Version::{V10, V72};
use migproxy_integration_tests::qmp::{migration_status, POLL_INTERVAL};
use migproxy_integration_tests::scenario::{self, a64fx, Scenario};
use migproxy_integration_tests::MIGRATION_TIMEOUT;
use serde_json::{json, Value};

/// Source bandwidth while the concurrent migrations start (bytes/s).
const THROTTLED_BANDWIDTH: u64 = 256 << 10;
/// Source bandwidth once they are all running (bytes/s).
const UNTHROTTLED_BANDWIDTH: u64 = 1 << 30;

/// What the daemon logs when it drops a connection that never identified itself.
const STRAY_CLOSED: &str = "stray connection closed, destination not contacted";

#[test]
fn three_migrations_at_once_through_one_daemon() {
    scenario::run("three_migrations_at_once", |s| {
        // Two rewriting listeners (both directions) and one checking relay, one daemon.
        // 256 KiB/s makes each first pass last seconds, so the three overlap for sure; once all
        // three are seen active together the limit is lifted and they converge.
        let throttled = |setup: Setup| {
            let mut setup = setup;
            setup.params_source["max-bandwidth"] = json!(THROTTLED_BANDWIDTH);
            setup
        };
        let setups = [
            (throttled(Setup::new(a64fx(V10), a64fx(V72))), true),
            (throttled(Setup::new(a64fx(V72), a64fx(V10))), true),
            (throttled(Setup::new(a64fx(V10), a64fx(V10))), false),
        ];
        let mut pairs = Vec::new();
        let mut config = format!("admin = \"{}\"\nlog_json = true\n", tcp_uri(free_port()?));
        let mut listen_ports = Vec::new();
        for (i, (setup, rewrite)) in setups.iter().enumerate() {
            let pair = Pair::start(s, setup, &format!("m{i}"))?;
            let listen = free_port()?;
            config.push_str(&format!(
                "\n[[listener]]\nlisten = \"{}\"\nupstream = \"{}\"\n",
                tcp_uri(listen),
                tcp_uri(pair.dest_port)
            ));
            if *rewrite {
                let dest = s.profile(&setup.dest)?;
                let source = s.profile(&setup.source)?;
                let reference = s.reference(&setup.source)?;
                config.push_str(&format!(
                    "dest_profile = \"{}\"\nsource_profile = \"{}\"\nsource_reference = \"{}\"\n",
                    dest.display(),
                    source.display(),
                    reference.display()
                ));
            }
            listen_ports.push(listen);
            pairs.push(pair);
        }
        let config_path = s.dir.join("migproxy.toml");
        std::fs::write(&config_path, &config)?;
        let daemon = Daemon::spawn_args(
            &s.dir,
            "migproxy",
            &["--config".to_owned(), config_path.display().to_string()],
            &listen_ports,
        )?;
        for (pair, port) in pairs.iter_mut().zip(&listen_ports) {
            scenario::migrate(&mut pair.source, *port)?;
        }
        wait_all_active(&mut pairs)?;
        eprintln!("  all three migrations active at once");
        for pair in &mut pairs {
            pair.source
                .qmp
                .set_parameters(json!({ "max-bandwidth": UNTHROTTLED_BANDWIDTH }))?;
        }
        for (i, pair) in pairs.iter_mut().enumerate() {
            scenario::assert_migrated(&mut pair.source, &mut pair.dest)
                .with_context(|| format!("migration {i}"))?;
        }
        let summaries = daemon.wait_events(SUMMARY, 3, SUMMARY_TIMEOUT)?;
        let mut rewritten: Vec<String> = summaries
            .iter()
            .map(|e| {
                eprintln!(
                    "  migproxy: outcome={} cpus_rewritten={}",
                    event_field(e, "outcome"),
                    event_field(e, "cpus_rewritten")
                );
                event_field(e, "cpus_rewritten")
            })
            .collect();
        if summaries
            .iter()
            .any(|e| event_field(e, "outcome") != "completed")
        {
            bail!("not every migration completed in the daemon's view: {summaries:?}");
        }
        rewritten.sort();
        if rewritten != ["0", "2", "2"] {
            bail!(
                "expected two rewriting migrations (2 vCPUs each) and one relay, got {rewritten:?}"
            );
        }
        Ok(())
    });
}

/// Both profiles but no `--source-reference`: the device phase could only end at a candidate the
/// guest can forge, so the default refuses the migration at its first bytes. The source keeps
/// running its guest, the destination is never contacted, and the refusal says how to fix it.
#[test]
fn rewriting_without_a_source_reference_is_refused_at_the_first_bytes() {
    scenario::run("rewriting_without_reference_refused_early", |s| {
        let setup = Setup::new(a64fx(V10), a64fx(V72));
        let profiles = s.profiles_only_args(&setup.source, &setup.dest)?;
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &profiles)?;
        daemon.wait_log(
            "every migration on this listener is refused",
            SUMMARY_TIMEOUT,
        )?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        scenario::assert_source_kept_running(&mut pair.source)?;
        let summary = expect_summary(&daemon, "refused")?;
        let reason = event_field(&summary, "reason");
        for needed in [
            "--source-reference",
            "--save-reference",
            "--unreferenced-device-phase allow",
            "before the destination was contacted",
        ] {
            if !reason.contains(needed) {
                bail!("the refusal does not say {needed:?}: {reason}");
            }
        }
        if event_field(&summary, "bytes_to_destination") != "0" {
            bail!("bytes reached the destination: {summary}");
        }
        assert_destination_untouched(&mut pair.dest)
    });
}

#[test]
fn stray_connections_before_a_migration_do_not_disturb_it() {
    scenario::run("stray_connection_before_migration", |s| {
        let setup = Setup::new(a64fx(V10), a64fx(V72)).return_path();
        let profiles = s.profile_args(&setup.source, &setup.dest)?;
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &profiles)?;
        // A health-check-like request and a silent port probe.
        let mut http = stray_connection(daemon.listen_port, b"GET /healthz HTTP/1.0\r\n\r\n")?;
        let _silent = stray_connection(daemon.listen_port, b"")?;
        daemon.wait_events(STRAY_CLOSED, 2, Duration::from_secs(20))?;
        expect_closed(&mut http)?;
        // One more silent probe, still open when the source connects.
        let _racing_probe = stray_connection(daemon.listen_port, b"")?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        scenario::assert_migrated(&mut pair.source, &mut pair.dest)?;
        expect_summary(&daemon, "completed")?;
        daemon.wait_events(STRAY_CLOSED, 3, Duration::from_secs(20))?;
        Ok(())
    });
}

#[test]
fn destination_killed_mid_migration_source_keeps_running() {
    scenario::run("destination_killed_mid_migration", |s| {
        // 1 MiB/s and a 1 ms downtime limit keep the migration busy for seconds.
        let setup = Setup::new(a64fx(V10), a64fx(V72)).slow(1 << 20);
        let profiles = s.profile_args(&setup.source, &setup.dest)?;
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &profiles)?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        wait_transferred(s, &mut pair, 256 * 1024)?;
        pair.dest.kill()?;
        eprintln!("  destination killed mid-migration");
        scenario::assert_source_kept_running(&mut pair.source)?;
        let summary = daemon.wait_summary(SUMMARY_TIMEOUT)?;
        let outcome = event_field(&summary, "outcome");
        eprintln!(
            "  migproxy: outcome={outcome} reason={}",
            event_field(&summary, "reason")
        );
        if outcome == "completed" {
            bail!("migproxy reports a completed migration to a killed destination");
        }
        Ok(())
    });
}

/// Poll the sources until every one reports an active migration in the same round.
fn wait_all_active(pairs: &mut [Pair]) -> Result<()> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let mut statuses = Vec::new();
        for pair in pairs.iter_mut() {
            statuses.push(migration_status(&pair.source.qmp.query_migrate()?).to_owned());
        }
        if statuses.iter().all(|s| s == "active") {
            return Ok(());
        }
        if statuses
            .iter()
            .any(|s| matches!(s.as_str(), "completed" | "failed" | "cancelled"))
            || Instant::now() >= deadline
        {
            bail!("the three migrations were never active together: {statuses:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn wait_transferred(_s: &Scenario, pair: &mut Pair, bytes: u64) -> Result<()> {
    pair.source.qmp.wait_migrate_until(
        "transferred bytes",
        MIGRATION_TIMEOUT,
        |info: &Value| {
            info.pointer("/ram/transferred")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                >= bytes
        },
    )?;
    Ok(())
}

/// The proxy closed the stray connection (EOF or reset), without answering anything.
fn expect_closed(stream: &mut std::net::TcpStream) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => bail!("the proxy answered a stray connection with {n} bytes"),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(err) if Instant::now() >= deadline => {
                return Err(err).context("stray connection still open")
            }
            Err(_) => {}
        }
    }
}
