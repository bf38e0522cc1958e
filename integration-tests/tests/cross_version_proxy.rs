//! Through migproxy (both fresh profiles given): QEMU 10.0 <-> 7.2, `-M virt-7.2 -cpu a64fx`,
//! 2 vCPUs, running guest, live over TCP. Each migration completes, the destination continues the
//! guest's counter from where the source stopped, and the proxy rewrote both vCPUs. Also with
//! multifd (3 channels), with the return path, and with both. The two plain multifd scenarios
//! name the raw relay of the multifd channels: splice one way, copy the other.

use anyhow::{bail, Result};
use migproxy_integration_tests::flows::{
    migration_through_proxy_rewrites_by, proxied_rewrite_succeeds, Setup,
};
use migproxy_integration_tests::migproxy::event_field;
use migproxy_integration_tests::qemu::Version::{self, V10, V72};
use migproxy_integration_tests::scenario::{self, a64fx, Scenario};

/// Multifd connections besides the main channel ("several channels").
const MULTIFD_CHANNELS: u32 = 3;

fn setup(from: Version, to: Version) -> Setup {
    Setup::new(a64fx(from), a64fx(to))
}

#[test]
fn proxy_a64fx_10_to_72() {
    scenario::run("proxy_a64fx_10_to_72", |s| {
        proxied_rewrite_succeeds(s, &setup(V10, V72)).map(drop)
    });
}

#[test]
fn proxy_a64fx_72_to_10() {
    scenario::run("proxy_a64fx_72_to_10", |s| {
        proxied_rewrite_succeeds(s, &setup(V72, V10)).map(drop)
    });
}

/// A multifd migration through `migproxy run --raw-relay RELAY` rewrites and completes, and
/// the daemon says every multifd channel went through that relay.
fn multifd_through(scenario: &mut Scenario, setup: &Setup, relay: &str) -> Result<()> {
    let mut args = scenario.profile_args(&setup.source, &setup.dest)?;
    args.extend(["--raw-relay".to_owned(), relay.to_owned()]);
    let (_, daemon) = migration_through_proxy_rewrites_by(scenario, setup, &args)?;
    let used: Vec<String> = daemon
        .events_named("raw relay")
        .iter()
        .map(|event| event_field(event, "relay"))
        .collect();
    if used.len() != MULTIFD_CHANNELS as usize || used.iter().any(|r| r != relay) {
        bail!("expected {MULTIFD_CHANNELS} multifd channels relayed by {relay}, the daemon used {used:?}");
    }
    eprintln!("  raw relay: {relay} for {} multifd channels", used.len());
    Ok(())
}

#[test]
fn proxy_a64fx_10_to_72_multifd() {
    scenario::run("proxy_a64fx_10_to_72_multifd", |s| {
        multifd_through(s, &setup(V10, V72).multifd(MULTIFD_CHANNELS), "splice")
    });
}

#[test]
fn proxy_a64fx_72_to_10_multifd() {
    scenario::run("proxy_a64fx_72_to_10_multifd", |s| {
        multifd_through(s, &setup(V72, V10).multifd(MULTIFD_CHANNELS), "copy")
    });
}

#[test]
fn proxy_a64fx_10_to_72_return_path() {
    scenario::run("proxy_a64fx_10_to_72_return_path", |s| {
        proxied_rewrite_succeeds(s, &setup(V10, V72).return_path()).map(drop)
    });
}

#[test]
fn proxy_a64fx_72_to_10_return_path() {
    scenario::run("proxy_a64fx_72_to_10_return_path", |s| {
        proxied_rewrite_succeeds(s, &setup(V72, V10).return_path()).map(drop)
    });
}

#[test]
fn proxy_a64fx_10_to_72_multifd_return_path() {
    scenario::run("proxy_a64fx_10_to_72_multifd_return_path", |s| {
        let setup = setup(V10, V72).multifd(MULTIFD_CHANNELS).return_path();
        proxied_rewrite_succeeds(s, &setup).map(drop)
    });
}

#[test]
fn proxy_a64fx_72_to_10_multifd_return_path() {
    scenario::run("proxy_a64fx_72_to_10_multifd_return_path", |s| {
        let setup = setup(V72, V10).multifd(MULTIFD_CHANNELS).return_path();
        proxied_rewrite_succeeds(s, &setup).map(drop)
    });
}

/// Other vCPU counts: every `cpu` section is rewritten, whatever their number (profiles captured
/// from fresh VMs with the same count, as an operator would).
fn setup_smp(from: Version, to: Version, smp: u32) -> Setup {
    let mut source = a64fx(from);
    source.smp = smp;
    let mut dest = a64fx(to);
    dest.smp = smp;
    Setup::new(source, dest)
}

#[test]
fn proxy_a64fx_10_to_72_one_vcpu() {
    scenario::run("proxy_a64fx_10_to_72_one_vcpu", |s| {
        proxied_rewrite_succeeds(s, &setup_smp(V10, V72, 1)).map(drop)
    });
}

#[test]
fn proxy_a64fx_72_to_10_four_vcpus_multifd_return_path() {
    scenario::run("proxy_a64fx_72_to_10_four_vcpus_multifd_return_path", |s| {
        let setup = setup_smp(V72, V10, 4)
            .multifd(MULTIFD_CHANNELS)
            .return_path();
        proxied_rewrite_succeeds(s, &setup).map(drop)
    });
}

#[test]
fn proxy_a64fx_10_to_72_four_vcpus_multifd() {
    scenario::run("proxy_a64fx_10_to_72_four_vcpus_multifd", |s| {
        proxied_rewrite_succeeds(s, &setup_smp(V10, V72, 4).multifd(2)).map(drop)
    });
}
