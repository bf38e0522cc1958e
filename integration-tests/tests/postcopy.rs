//! Postcopy-capable migrations through a rewriting migproxy: QEMU 10.0 <-> 7.2, `-M virt-7.2
//! -cpu a64fx`, 2 vCPUs, running guest, `postcopy-ram` on both sides (as Nova's
//! `live_migration_permit_post_copy` and `virsh migrate --postcopy` set it), never switched.
//!
//! Neither 10.0 nor 7.2 can take its guest back after a refused switch (DESIGN.md, "Postcopy"),
//! so the proxy decides at POSTCOPY_ADVISE:
//! - with `--unrecoverable-postcopy allow` the migration goes on, the proxy says at ADVISE (log
//!   and summary `postcopy=unrecoverable`) that a switch could not be undone, and the migration
//!   finishes in precopy with every vCPU rewritten; also with the preempt channel on;
//! - by default it is refused at ADVISE while the source still runs the guest, also when only a
//!   destination profile is given (the source's version is then unknown and counts as older).
//!
//! QEMU 11.1 as the source (>= 10.2, return path: it takes its guest back when the destination
//! never confirms the package) goes on by default (`postcopy=recoverable`):
//! - never switched, 11.1 -> 10.0 completes rewritten;
//! - switched to postcopy after precopy rounds with a dirtying guest, the proxy refuses the
//!   package (rewriting a package's device state is not supported) and closes at once; the
//!   source fails the migration and resumes its guest by itself, the destination never runs it.

use anyhow::{bail, Result};
use migproxy_integration_tests::flows::{
    allow_unrecoverable_postcopy_args, assert_destination_untouched, expect_summary,
    migration_through_proxy_rewrites_by, start_proxy, switch_after_precopy_rounds,
    switched_migration_through_proxy, Pair, Setup,
};
use migproxy_integration_tests::migproxy::{event_field, Daemon};
use migproxy_integration_tests::qemu::Version::{self, V10, V111, V72};
use migproxy_integration_tests::scenario::{self, a64fx, Scenario};
use serde_json::Value;

/// How long a refused destination may take to give up on its broken stream.
const DEST_EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// What the proxy logs at ADVISE when it lets an unrecoverable postcopy migration go on.
const ALLOWED_AT_ADVISE: &str = "postcopy advised and allowed";

fn postcopy_setup(from: Version, to: Version) -> Setup {
    Setup::new(a64fx(from), a64fx(to)).postcopy()
}

/// Completes through the proxy with `--unrecoverable-postcopy allow`, every vCPU rewritten; the
/// summary and the log say at ADVISE that a switch could not have been undone.
fn completes_without_switch(s: &mut Scenario, setup: &Setup) -> Result<Value> {
    let mut args = s.profile_args(&setup.source, &setup.dest)?;
    args.extend(["--unrecoverable-postcopy".to_owned(), "allow".to_owned()]);
    let summary = completes_rewritten(s, setup, &args)?;
    check_postcopy_field(&summary, "unrecoverable")?;
    Ok(summary)
}

/// Completes through the proxy with `args`, every vCPU rewritten, the channels as set up.
fn completes_rewritten(s: &mut Scenario, setup: &Setup, args: &[String]) -> Result<Value> {
    let (summary, daemon) = migration_through_proxy_rewrites_by(s, setup, args)?;
    if event_field(&summary, "postcopy") == "unrecoverable" {
        check_warned_at_advise(&daemon)?;
    }
    Ok(summary)
}

fn check_postcopy_field(summary: &Value, wanted: &str) -> Result<()> {
    let found = event_field(summary, "postcopy");
    if found != wanted {
        bail!("summary postcopy={found}, expected {wanted}: {summary}");
    }
    eprintln!("  migproxy: postcopy={found}");
    Ok(())
}

/// The ADVISE-time warning is in the daemon's log.
fn check_warned_at_advise(daemon: &Daemon) -> Result<()> {
    if !daemon.log().contains(ALLOWED_AT_ADVISE) {
        bail!(
            "no {ALLOWED_AT_ADVISE:?} warning in the migproxy log:\n{}",
            daemon.log()
        );
    }
    Ok(())
}

/// Refused at ADVISE by default: the source keeps running its guest, almost nothing reached the
/// destination, and the reason says why a switch could not have been undone.
fn refused_at_advise(s: &mut Scenario, setup: &Setup, proxy_args: &[String]) -> Result<()> {
    let mut pair = Pair::start(s, setup, "")?;
    let daemon = start_proxy(s, pair.dest_port, proxy_args)?;
    scenario::migrate(&mut pair.source, daemon.listen_port)?;
    scenario::assert_source_kept_running(&mut pair.source)?;
    let summary = expect_summary(&daemon, "refused")?;
    check_postcopy_field(&summary, "unrecoverable")?;
    let reason = event_field(&summary, "reason");
    if !reason.contains("postcopy advised") || !reason.contains("--unrecoverable-postcopy") {
        bail!("the refusal does not explain the ADVISE decision: {reason}");
    }
    // ADVISE precedes the first RAM section: only the header, the configuration and the
    // commands before it may have reached the destination.
    let forwarded: u64 = event_field(&summary, "bytes_to_destination")
        .parse()
        .unwrap_or(u64::MAX);
    if forwarded > 4096 {
        bail!("{forwarded} bytes reached the destination before the refusal at ADVISE");
    }
    let _ = pair.dest.wait_exit(DEST_EXIT_TIMEOUT);
    assert_destination_untouched(&mut pair.dest)
}

#[test]
fn postcopy_capable_a64fx_10_to_72_no_switch() {
    scenario::run("postcopy_capable_a64fx_10_to_72_no_switch", |s| {
        completes_without_switch(s, &postcopy_setup(V10, V72)).map(drop)
    });
}

#[test]
fn postcopy_capable_a64fx_72_to_10_no_switch() {
    scenario::run("postcopy_capable_a64fx_72_to_10_no_switch", |s| {
        completes_without_switch(s, &postcopy_setup(V72, V10)).map(drop)
    });
}

#[test]
fn postcopy_preempt_capable_a64fx_10_to_72_no_switch() {
    scenario::run("postcopy_preempt_capable_a64fx_10_to_72_no_switch", |s| {
        let mut setup = postcopy_setup(V10, V72);
        setup.caps_both.push(("postcopy-preempt", true));
        let summary = completes_without_switch(s, &setup)?;
        eprintln!("  channels: {}", event_field(&summary, "channels"));
        Ok(())
    });
}

#[test]
fn postcopy_older_source_refused_at_advise_by_default() {
    scenario::run("postcopy_older_source_refused_at_advise_by_default", |s| {
        let setup = postcopy_setup(V10, V72);
        let args = s.profile_args(&setup.source, &setup.dest)?;
        refused_at_advise(s, &setup, &args)
    });
}

#[test]
fn postcopy_without_source_profile_refused_at_advise() {
    scenario::run("postcopy_without_source_profile_refused_at_advise", |s| {
        let setup = postcopy_setup(V72, V10);
        let dest_profile = s.profile(&setup.dest)?;
        let args = vec![
            "--dest-profile".to_owned(),
            dest_profile.display().to_string(),
            "--source-reference".to_owned(),
            s.reference(&setup.source)?.display().to_string(),
        ];
        refused_at_advise(s, &setup, &args)
    });
}

#[test]
fn postcopy_capable_a64fx_111_to_10_no_switch_by_default() {
    scenario::run("postcopy_capable_a64fx_111_to_10_no_switch", |s| {
        let setup = postcopy_setup(V111, V10);
        let args = s.profile_args(&setup.source, &setup.dest)?;
        let summary = completes_rewritten(s, &setup, &args)?;
        check_postcopy_field(&summary, "recoverable")
    });
}

/// 11.1 -> 10.0 switched after precopy rounds with a dirtying guest, through a proxy given
/// `extra` flags after both profiles (and the source reference when `with_reference`): the
/// package is refused with a reason containing `because`, the source fails the migration and
/// resumes its guest by itself, the destination never runs it.
fn switch_111_refused(
    s: &mut Scenario,
    with_reference: bool,
    extra: &[&str],
    because: &str,
) -> Result<()> {
    // 4 MiB/s with a 1 ms downtime limit: precopy cannot converge while the guest dirties.
    let setup = postcopy_setup(V111, V10).slow(4 << 20);
    let mut args = if with_reference {
        s.profile_args(&setup.source, &setup.dest)?
    } else {
        s.profiles_only_args(&setup.source, &setup.dest)?
    };
    args.extend(extra.iter().map(|flag| (*flag).to_owned()));
    let mut pair = Pair::start(s, &setup, "")?;
    let daemon = start_proxy(s, pair.dest_port, &args)?;
    scenario::migrate(&mut pair.source, daemon.listen_port)?;
    let precopy = switch_after_precopy_rounds(&mut pair.source)?;
    eprintln!("  switched after {precopy} precopy bytes");
    // The source fails the migration and resumes its guest by itself.
    scenario::assert_source_kept_running(&mut pair.source)?;
    let summary = expect_summary(&daemon, "refused")?;
    check_postcopy_field(&summary, "recoverable")?;
    let reason = event_field(&summary, "reason");
    // The refusal is at the package: the source really switched.
    if !reason.contains("postcopy package")
        || !reason.contains(because)
        || !reason.contains("resumes its guest")
    {
        bail!("expected the package refused ({because:?}) with the source resuming: {reason}");
    }
    let _ = pair.dest.wait_exit(DEST_EXIT_TIMEOUT);
    assert_destination_untouched(&mut pair.dest)
}

#[test]
fn postcopy_switch_111_to_10_without_reference_refused_source_resumes() {
    scenario::run("postcopy_switch_111_to_10_without_reference_refused", |s| {
        // The package refusal of a proxy without a reference: such a proxy refuses at the first
        // bytes by default, so this scenario opts out to reach the package.
        switch_111_refused(
            s,
            false,
            &["--unreferenced-device-phase", "allow"],
            "no --source-reference",
        )
    });
}

/// A real refusal inside a package that walks: `--on-extra refuse` towards the older
/// destination, which lacks registers the 11.1 source has.
#[test]
fn postcopy_switch_111_to_10_on_extra_refuse_refused_source_resumes() {
    scenario::run("postcopy_switch_111_to_10_on_extra_refuse", |s| {
        switch_111_refused(s, true, &["--on-extra", "refuse"], "vcpu 0")
    });
}

/// Switched to postcopy after precopy rounds with a dirtying guest, through a proxy that has the
/// source's reference description: the package is rewritten, the migration completes, the guest
/// runs on the destination, and the source really sent pages in postcopy.
fn switch_completes_rewritten(s: &mut Scenario, from: Version, to: Version) -> Result<()> {
    // 4 MiB/s with a 1 ms downtime limit: precopy cannot converge while the guest dirties.
    switch_completes_rewritten_with(s, postcopy_setup(from, to).slow(4 << 20)).map(drop)
}

/// [`switch_completes_rewritten`] for any setup; returns the summary.
fn switch_completes_rewritten_with(s: &mut Scenario, setup: Setup) -> Result<Value> {
    let mut args = s.profile_args(&setup.source, &setup.dest)?;
    args.extend(allow_unrecoverable_postcopy_args());
    let (summary, daemon) = switched_migration_through_proxy(s, &setup, &args)?;
    // 11.1 takes its guest back after a failed switch; 7.2 and 10.0 do not.
    let outlook = if setup.source.version == V111 {
        "recoverable"
    } else {
        "unrecoverable"
    };
    check_postcopy_field(&summary, outlook)?;
    let rewritten = event_field(&summary, "cpus_rewritten");
    if rewritten != setup.source.smp.to_string() {
        bail!(
            "migproxy rewrote {rewritten} vCPU(s) in the package, expected all {}",
            setup.source.smp
        );
    }
    if daemon
        .events_named("postcopy package rewritten with the source reference description")
        .is_empty()
    {
        bail!("migproxy did not log the package rewrite");
    }
    Ok(summary)
}

#[test]
fn postcopy_switch_a64fx_10_to_72_package_rewritten() {
    scenario::run("postcopy_switch_a64fx_10_to_72_package_rewritten", |s| {
        switch_completes_rewritten(s, V10, V72)
    });
}

#[test]
fn postcopy_switch_a64fx_72_to_10_package_rewritten() {
    scenario::run("postcopy_switch_a64fx_72_to_10_package_rewritten", |s| {
        switch_completes_rewritten(s, V72, V10)
    });
}

#[test]
fn postcopy_preempt_switch_a64fx_10_to_72_package_rewritten() {
    scenario::run(
        "postcopy_preempt_switch_a64fx_10_to_72_package_rewritten",
        |s| {
            let mut setup = postcopy_setup(V10, V72).slow(4 << 20);
            setup.caps_both.push(("postcopy-preempt", true));
            let summary = switch_completes_rewritten_with(s, setup)?;
            let channels = event_field(&summary, "channels");
            if channels != "main+preempt" {
                bail!("expected the preempt channel relayed, channels {channels}");
            }
            Ok(())
        },
    );
}

#[test]
fn postcopy_switch_a64fx_111_to_10_package_rewritten() {
    scenario::run("postcopy_switch_a64fx_111_to_10_package_rewritten", |s| {
        switch_completes_rewritten(s, V111, V10)
    });
}
