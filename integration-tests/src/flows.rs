//! The migrations the scenarios run, as reusable steps: start a source/destination pair with
//! capabilities, put a `migproxy run` between them, and check outcomes on all three.

use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::migproxy::{event_field, Daemon};
use crate::ports;
use crate::qemu::{Vm, VmConfig};
use crate::qmp::migration_status;
use crate::scenario::{self, Scenario};

/// How long the daemon may take to log its summary after QEMU reported the outcome.
pub const SUMMARY_TIMEOUT: Duration = Duration::from_secs(30);

/// One migration's configuration.
#[derive(Debug, Clone)]
pub struct Setup {
    pub source: VmConfig,
    pub dest: VmConfig,
    /// Capabilities both sides need (multifd, postcopy-ram).
    pub caps_both: Vec<(&'static str, bool)>,
    /// Capabilities only the source sets (return-path).
    pub caps_source: Vec<(&'static str, bool)>,
    /// Parameters both sides need (multifd-channels).
    pub params_both: Value,
    /// Parameters only the source sets (bandwidth, downtime).
    pub params_source: Value,
}

impl Setup {
    pub fn new(source: VmConfig, dest: VmConfig) -> Setup {
        Setup {
            source,
            dest,
            caps_both: Vec::new(),
            caps_source: Vec::new(),
            params_both: json!({}),
            params_source: json!({}),
        }
    }

    /// Multifd with `channels` connections besides the main channel, on both sides.
    pub fn multifd(mut self, channels: u32) -> Setup {
        self.caps_both.push(("multifd", true));
        self.params_both["multifd-channels"] = json!(channels);
        self
    }

    /// The return path (the source learns the destination's outcome).
    pub fn return_path(mut self) -> Setup {
        self.caps_source.push(("return-path", true));
        self
    }

    /// Postcopy-capable on both sides (the source still starts in precopy).
    pub fn postcopy(mut self) -> Setup {
        self.caps_both.push(("postcopy-ram", true));
        self
    }

    /// Keep the source iterating: a 1 ms downtime limit at `bandwidth` bytes/s never converges
    /// while the guest dirties its window, so the migration stays active until told otherwise.
    pub fn slow(mut self, bandwidth: u64) -> Setup {
        self.params_source["max-bandwidth"] = json!(bandwidth);
        self.params_source["downtime-limit"] = json!(1);
        self
    }
}

/// A started pair: the destination listens on `dest_port`, the source runs the guest.
pub struct Pair {
    pub source: Vm,
    pub dest: Vm,
    pub dest_port: u16,
}

impl Pair {
    /// Start the destination first (it must listen before anyone connects), then the source.
    pub fn start(scenario: &mut Scenario, setup: &Setup, label: &str) -> Result<Pair> {
        let (dest, dest_port) = scenario.start_destination(
            &format!("{label}dst"),
            &setup.dest,
            &setup.caps_both,
            setup.params_both.clone(),
        )?;
        let mut source = scenario.start_source(&format!("{label}src"), &setup.source)?;
        let mut caps = setup.caps_both.clone();
        caps.extend(setup.caps_source.iter().copied());
        source.qmp.set_capabilities(&caps)?;
        source.qmp.set_parameters(setup.params_both.clone())?;
        source.qmp.set_parameters(setup.params_source.clone())?;
        Ok(Pair {
            source,
            dest,
            dest_port,
        })
    }
}

/// `migproxy run` in front of `dest_port` with `extra` flags.
pub fn start_proxy(scenario: &Scenario, dest_port: u16, extra: &[String]) -> Result<Daemon> {
    let listen = ports::free_port()?;
    Daemon::spawn(
        &scenario.dir,
        "migproxy",
        listen,
        &ports::tcp_uri(dest_port),
        extra,
    )
}

/// With `--source-reference` among `proxy_args`, the device phase of a precopy migration ended
/// exactly where the reference's layout says (not at a guest-forgeable candidate).
pub fn check_device_phase_ending(daemon: &Daemon, proxy_args: &[String]) -> Result<()> {
    if !proxy_args.iter().any(|arg| arg == "--source-reference") {
        return Ok(());
    }
    for event in daemon.events_named("device state forwarded") {
        let ending = event_field(&event, "ending");
        if !ending.starts_with("exact") {
            bail!("the device phase ended on a {ending:?}, not on the source reference: {event}");
        }
        eprintln!("  device phase ending: {ending}");
    }
    Ok(())
}

/// Print the proxy summary and check its outcome.
pub fn expect_summary(daemon: &Daemon, outcome: &str) -> Result<Value> {
    let summary = daemon.wait_summary(SUMMARY_TIMEOUT)?;
    eprintln!(
        "  migproxy: outcome={} reason={} channels={} return_path={} cpus_rewritten={} dropped=[{}] filled=[{}]",
        event_field(&summary, "outcome"),
        event_field(&summary, "reason"),
        event_field(&summary, "channels"),
        event_field(&summary, "return_path"),
        event_field(&summary, "cpus_rewritten"),
        event_field(&summary, "dropped"),
        event_field(&summary, "filled"),
    );
    let found = event_field(&summary, "outcome");
    if found != outcome {
        bail!("migproxy summary outcome {found}, expected {outcome}: {summary}");
    }
    Ok(summary)
}

/// Source -> migproxy (with both fresh profiles) -> destination; the migration completes, the
/// destination continues the guest, and the proxy rewrote every vCPU. Returns the summary.
pub fn proxied_rewrite_succeeds(scenario: &mut Scenario, setup: &Setup) -> Result<Value> {
    let profiles = scenario.profile_args(&setup.source, &setup.dest)?;
    migration_through_proxy_rewrites(scenario, setup, &profiles)
}

/// Source -> `migproxy run` with `proxy_args` (profiles, TLS, ...) -> destination: the migration
/// completes, the destination continues the guest, every vCPU was rewritten and the channels
/// match the setup. Returns the summary.
pub fn migration_through_proxy_rewrites(
    scenario: &mut Scenario,
    setup: &Setup,
    proxy_args: &[String],
) -> Result<Value> {
    migration_through_proxy_rewrites_by(scenario, setup, proxy_args).map(|(summary, _)| summary)
}

/// [`migration_through_proxy_rewrites`], also returning the daemon so that callers can read
/// the rest of its log.
pub fn migration_through_proxy_rewrites_by(
    scenario: &mut Scenario,
    setup: &Setup,
    proxy_args: &[String],
) -> Result<(Value, Daemon)> {
    let mut pair = Pair::start(scenario, setup, "")?;
    let daemon = start_proxy(scenario, pair.dest_port, proxy_args)?;
    scenario::migrate(&mut pair.source, daemon.listen_port)?;
    scenario::assert_migrated(&mut pair.source, &mut pair.dest)?;
    let summary = expect_summary(&daemon, "completed")?;
    check_device_phase_ending(&daemon, proxy_args)?;
    let rewritten = event_field(&summary, "cpus_rewritten");
    if rewritten != setup.source.smp.to_string() {
        bail!(
            "migproxy rewrote {rewritten} vCPU(s), expected all {}",
            setup.source.smp
        );
    }
    check_channels(&summary, setup)?;
    Ok((summary, daemon))
}

/// The proxy argument that lets an older source switch to postcopy (the reference description
/// that rewrites its package comes with `Scenario::profile_args`).
pub fn allow_unrecoverable_postcopy_args() -> Vec<String> {
    vec!["--unrecoverable-postcopy".to_owned(), "allow".to_owned()]
}

/// Source -> `migproxy run` with `proxy_args` -> destination, switched to postcopy after some
/// precopy rounds: the migration completes, the destination continues the guest and the source
/// really sent pages in postcopy. Returns the summary (outcome `completed`) and the daemon.
pub fn switched_migration_through_proxy(
    scenario: &mut Scenario,
    setup: &Setup,
    proxy_args: &[String],
) -> Result<(Value, Daemon)> {
    let mut pair = Pair::start(scenario, setup, "")?;
    let daemon = start_proxy(scenario, pair.dest_port, proxy_args)?;
    scenario::migrate(&mut pair.source, daemon.listen_port)?;
    switch_after_precopy_rounds(&mut pair.source)?;
    scenario::assert_migrated(&mut pair.source, &mut pair.dest)?;
    assert_sent_in_postcopy(&mut pair.source)?;
    let summary = expect_summary(&daemon, "completed")?;
    Ok((summary, daemon))
}

/// The summary's channel list matches the setup: `main` plus one `multifd` per channel, and
/// the return path flag.
pub fn check_channels(summary: &Value, setup: &Setup) -> Result<()> {
    let channels = event_field(summary, "channels");
    let multifd_expected = setup
        .params_both
        .get("multifd-channels")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let multifd_seen = channels.split('+').filter(|c| *c == "multifd").count();
    if u64::try_from(multifd_seen).unwrap_or(u64::MAX) != multifd_expected
        || !channels.split('+').any(|c| c == "main")
    {
        bail!("migproxy relayed channels {channels:?}, expected main + {multifd_expected} multifd");
    }
    let return_path = event_field(summary, "return_path") == "true";
    let wanted = setup
        .caps_source
        .iter()
        .any(|(c, on)| *c == "return-path" && *on)
        || setup
            .caps_both
            .iter()
            .any(|(c, on)| *c == "postcopy-ram" && *on);
    if return_path != wanted {
        bail!("migproxy saw return_path={return_path}, expected {wanted}");
    }
    Ok(())
}

/// Direct migration (no proxy) between `setup`'s configurations fails on the destination with
/// every message in `expected_errors`, and the source keeps running (return path on).
pub fn direct_fails(
    scenario: &mut Scenario,
    setup: &Setup,
    expected_errors: &[&str],
) -> Result<()> {
    let mut pair = Pair::start(scenario, setup, "")?;
    scenario::migrate(&mut pair.source, pair.dest_port)?;
    scenario::assert_source_kept_running(&mut pair.source)?;
    let status = pair
        .dest
        .wait_exit(Duration::from_secs(30))
        .context("the destination should exit after a failed incoming migration")?;
    let log = pair.dest.log();
    for expected in expected_errors {
        if !log.contains(expected) {
            bail!("destination log lacks {expected:?}; it says:\n{log}");
        }
    }
    eprintln!(
        "  destination exited ({status}) with: {}",
        log.trim().replace('\n', " | ")
    );
    Ok(())
}

/// The destination never started the guest and never loaded device state: it either exited
/// on the broken stream or is still waiting, and its log has no device-state load error.
pub fn assert_destination_untouched(dest: &mut Vm) -> Result<()> {
    if dest.exited()?.is_none() {
        let status = dest.qmp.status()?;
        if status == "running" {
            bail!("the destination runs the guest although the migration was refused");
        }
    }
    let log = dest.log();
    // A RAM-section error ("error while loading state section id N(ram)"; 11.1: "Getting RAM
    // address failed", "Failed to load vmstate version_id: 4") is the broken stream itself; a
    // device load error names the device, or the field as `Failed to load DEVICE:FIELD`.
    if log.contains("of device '") || names_a_failed_field(&log) {
        bail!("the destination loaded (and rejected) device state: {log}");
    }
    Ok(())
}

/// `Failed to load cpu:cpreg_vmstate_array_len`: vmstate's message for one field of a device.
fn names_a_failed_field(log: &str) -> bool {
    log.match_indices("Failed to load ").any(|(at, needle)| {
        log[at + needle.len()..]
            .split_whitespace()
            .next()
            .is_some_and(|word| word.contains(':') && !word.ends_with(':'))
    })
}

/// A connection that never identifies itself as a migration channel.
pub fn stray_connection(port: u16, payload: &[u8]) -> Result<TcpStream> {
    use std::io::Write;
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).context("connecting a stray client")?;
    if !payload.is_empty() {
        stream.write_all(payload).context("writing stray bytes")?;
    }
    Ok(stream)
}

/// Migration status of a VM's last `query-migrate`.
pub fn status_of(vm: &mut Vm) -> Result<String> {
    Ok(migration_status(&vm.qmp.query_migrate()?).to_owned())
}

/// Wait until the source has run two precopy rounds (its guest's window sent and dirtied again),
/// then switch it to postcopy. Returns the bytes sent in precopy.
pub fn switch_after_precopy_rounds(source: &mut Vm) -> Result<u64> {
    switch_to_postcopy_once(source, "two precopy rounds", |info| {
        info.pointer("/ram/dirty-sync-count")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            >= 2
    })
}

/// Wait until the source's migration is `active` and `ready` holds for its `query-migrate`
/// answer (`what` names the wait in a timeout), then switch it to postcopy. Returns the bytes
/// sent in precopy.
pub fn switch_to_postcopy_once(
    source: &mut Vm,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Result<u64> {
    let info = source
        .qmp
        .wait_migrate_until(what, crate::MIGRATION_TIMEOUT, |info: &Value| {
            migration_status(info) == "active" && ready(info)
        })?;
    source.qmp.execute("migrate-start-postcopy", json!({}))?;
    Ok(info
        .pointer("/ram/transferred")
        .and_then(Value::as_u64)
        .unwrap_or(0))
}

/// After a completed migration: the source sent pages while `postcopy-active`. Returns how many
/// bytes.
pub fn assert_sent_in_postcopy(source: &mut Vm) -> Result<u64> {
    let info = source.qmp.query_migrate()?;
    let bytes = info
        .pointer("/ram/postcopy-bytes")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if bytes == 0 {
        bail!(
            "the source never sent a page in postcopy (it did not reach postcopy-active): {info}"
        );
    }
    eprintln!("  {bytes} bytes sent in postcopy-active");
    Ok(bytes)
}
