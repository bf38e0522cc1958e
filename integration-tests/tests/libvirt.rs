//! `virsh migrate` through migproxy: a two-host libvirt lab (`migproxy_integration_tests::libvirt`,
//! host a QEMU 7.2 at 10.88.0.1, host b QEMU 10.0 at 10.88.0.2), a persistent `type='qemu'` domain
//! (`virt-7.2`, a64fx, 2 vCPUs, the counting guest) migrated live with `--p2p --persistent
//! --undefinesource`, as an operator or OpenStack Nova would, in every placement deploy/README.md
//! describes for libvirt and Nova:
//!
//! - direct (no proxy): fails both ways, the source keeps the guest (why the proxy is needed);
//! - proxy on the destination with an explicit `--migrateuri tcp://DEST:PORT --listen-address
//!   127.0.0.1`, both directions; with `--parallel` (three multifd connections); with `--tls`;
//!   refusing (`--on-extra refuse`) with the source guest still running;
//! - a proxy host and libvirt choosing the port (`--migrateuri tcp://PROXY`, Nova's
//!   `live_migration_inbound_addr`);
//! - no migration options at all: deploy/nftables/redirect.nft on the source, or
//!   deploy/nftables/redirect-prerouting.nft on the destination, with `--upstream original-dst`;
//! - without `--p2p` (virsh drives both libvirts);
//! - and what does not work: migproxy listening on the destination's own address across libvirt's
//!   migration range makes libvirt's port picker fail every migration where it chooses the port.
//!
//! Three labs: both hosts on Debian 12's libvirt 9.0 (`libvirt_*`, every scenario), and host b on
//! libvirt 11.3 from bookworm-backports while host a keeps 9.0 (`libvirt113_*`, the placements, TLS,
//! `--parallel`, the refusal and the port pitfall), as during a real upgrade. A third lab puts
//! QEMU 11.1 on host b (libvirt 11.3) and QEMU 10.0 on host a (`libvirt_q111_*`): migrations into
//! 11.1, and libvirt failing to start one out of it (QMP `migrate`'s `detach`). One lab serves all
//! its scenarios (building one costs libvirt's QEMU probing); each scenario prints its own
//! `scenario NAME: PASS`, a failing one does not stop the others, and the test fails naming every
//! failed scenario.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Output;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::Value;

use migproxy_integration_tests::flows::expect_summary;
use migproxy_integration_tests::libvirt::{Host, Lab, Libvirt, MIGRATION_PORTS};
use migproxy_integration_tests::migproxy::{event_field, Daemon};
use migproxy_integration_tests::qemu::{repo_root, Version};
use migproxy_integration_tests::scenario::{self, a64fx, Scenario};

/// The explicit migration port of the `--migrateuri` scenarios: outside libvirt's range, so the
/// destination's port picker never meets the proxy listening on it.
const EXPLICIT_PORT: u16 = 49400;
/// The transparent proxies' port (deploy/nftables defines).
const REDIRECT_PORT: u16 = 4444;
/// The uid redirect.nft exempts: the proxy runs as it, so its own connection is not redirected.
const MIGPROXY_UID: &str = "65532";
/// `--parallel-connections`: multifd channels besides the main one.
const PARALLEL_CONNECTIONS: u32 = 3;

/// The guide's virsh options for a live, persistent move.
const MIGRATE_P2P: &[&str] = &["--live", "--p2p", "--persistent", "--undefinesource"];
const MIGRATE_CLIENT_DRIVEN: &[&str] = &["--live", "--persistent", "--undefinesource"];

/// Both hosts on Debian 12's libvirt 9.0: every scenario.
#[test]
fn libvirt_9_0_both_hosts() {
    run_lab("libvirt", Libvirt::System, None);
}

/// The upgrade as it happens: host a (QEMU 7.2) keeps libvirt 9.0, host b (QEMU 10.0) runs
/// libvirt 11.3 from bookworm-backports. The placements and the refusal, both directions where the
/// plain lab runs both.
#[test]
fn libvirt_9_0_and_11_3() {
    let libvirt_11_3 = match Libvirt::v11_3() {
        Ok(libvirt) => libvirt,
        Err(err) => panic!("scenario libvirt113_lab: cannot provision libvirt 11.3: {err:#}"),
    };
    run_lab("libvirt113", libvirt_11_3, Some(MIXED));
}

/// QEMU 11.1: host a QEMU 10.0 on libvirt 9.0, host b QEMU 11.1 on libvirt 11.3. libvirt probes
/// and starts 11.1 and migrates into it through migproxy; it cannot migrate out of it: libvirt
/// (9.0 and 11.3 alike) sends QMP `migrate` with `detach`, which 11.1 rejects (deploy/README.md).
#[test]
fn libvirt_qemu_10_0_and_11_1() {
    let libvirt_11_3 = match Libvirt::v11_3() {
        Ok(libvirt) => libvirt,
        Err(err) => panic!("scenario libvirt_q111_lab: cannot provision libvirt 11.3: {err:#}"),
    };
    let lab = Lab::start_with(Version::V10, Version::V111, libvirt_11_3);
    run_scenarios("libvirt_q111", lab, WITH_11_1, None);
}

/// The 11.1 lab's scenarios (host a QEMU 10.0, host b QEMU 11.1).
const WITH_11_1: &[(&str, Body)] = &[
    ("a64fx_10_to_111_dest_proxy_migrateuri", |s, lab| {
        let proxy = dest_proxy(s, &lab.a, &lab.b, &[])?;
        proxied(
            s,
            &lab.a,
            &lab.b,
            &proxy,
            MIGRATE_P2P,
            &explicit_uri(&lab.b),
            0,
        )?;
        expect_removed(&proxy, "")
    }),
    ("a64fx_10_to_111_proxy_host_libvirt_port", |s, lab| {
        let proxy = proxy_host_libvirt_port(s, &lab.a, &lab.b)?;
        expect_removed(&proxy, "")
    }),
    (
        "a64fx_111_source_rejects_libvirt_migrate_detach",
        |s, lab| libvirt_cannot_migrate_from_11_1(s, &lab.b, &lab.a),
    ),
];

/// libvirt cannot start a migration out of QEMU 11.1: its QMP `migrate` carries `detach`, which
/// 11.1 no longer accepts; nothing reaches the proxy and the guest keeps running on the source.
/// When libvirt stops sending it this scenario fails, and 11.1 -> older joins the scenarios above.
fn libvirt_cannot_migrate_from_11_1(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let proxy = dest_proxy(s, from, to, &[])?;
    let domain = s.name.clone();
    with_domain(s, from, to, &domain, |domain| {
        let out = migrate(from, to, domain, MIGRATE_P2P, &explicit_uri(to))?;
        expect_failed(from, to, domain, &out)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("Parameter 'detach' is unexpected") {
            bail!(
                "virsh failed, but not on QMP migrate's detach: {}",
                stderr.trim()
            );
        }
        if !proxy
            .events_named(migproxy_integration_tests::migproxy::SUMMARY)
            .is_empty()
        {
            bail!("a migration reached the proxy although QEMU never started one");
        }
        Ok(())
    })
}

/// The completed migration's summary names exactly `removed` as the subsections migproxy dropped.
fn expect_removed(proxy: &Daemon, removed: &str) -> Result<()> {
    let summary = expect_summary(proxy, "completed")?;
    let actual = event_field(&summary, "subsections_removed");
    if actual != removed {
        bail!("subsections removed: {actual:?}, expected {removed:?}");
    }
    eprintln!("  subsections removed: {actual:?}");
    Ok(())
}

/// Scenario name suffixes (the lab's prefix goes in front) and bodies.
const ALL: &[(&str, Body)] = &[
    ("direct_a64fx_fails_both_ways", direct_fails_both_ways),
    ("a64fx_72_to_10_dest_proxy_migrateuri", |s, lab| {
        dest_proxy_migrateuri(s, &lab.a, &lab.b)
    }),
    ("a64fx_10_to_72_dest_proxy_migrateuri", |s, lab| {
        dest_proxy_migrateuri(s, &lab.b, &lab.a)
    }),
    ("a64fx_72_to_10_proxy_host_libvirt_port", |s, lab| {
        proxy_host_libvirt_port(s, &lab.a, &lab.b).map(drop)
    }),
    ("a64fx_10_to_72_source_redirect", |s, lab| {
        source_redirect(s, &lab.b, &lab.a)
    }),
    ("a64fx_72_to_10_dest_prerouting_redirect", |s, lab| {
        dest_prerouting_redirect(s, &lab.a, &lab.b)
    }),
    ("a64fx_10_to_72_parallel", |s, lab| {
        parallel(s, &lab.b, &lab.a)
    }),
    ("a64fx_72_to_10_tls", |s, lab| tls(s, &lab.a, &lab.b, 0)),
    ("a64fx_10_to_72_without_p2p", |s, lab| {
        without_p2p(s, &lab.b, &lab.a)
    }),
    ("a64fx_72_to_10_refused_source_keeps_running", |s, lab| {
        refused(s, &lab.a, &lab.b)
    }),
    ("a64fx_72_to_10_compressed_auto_converge", |s, lab| {
        compressed_auto_converge(s, &lab.a, &lab.b)
    }),
    ("a64fx_10_to_72_parallel_tls", |s, lab| {
        tls(s, &lab.b, &lab.a, PARALLEL_CONNECTIONS)
    }),
    ("a64fx_72_to_10_postcopy_refused", |s, lab| {
        postcopy_refused(s, &lab.a, &lab.b)
    }),
    ("a64fx_10_to_72_tunnelled_bypasses_proxy", |s, lab| {
        tunnelled_bypasses_proxy(s, &lab.b, &lab.a)
    }),
    ("dest_proxy_in_port_range_breaks_port_picker", |s, lab| {
        proxy_in_port_range_breaks_port_picker(s, &lab.a, &lab.b)
    }),
];

/// The subset the mixed-version lab runs: every placement, the refusal and the pitfall.
const MIXED: &[&str] = &[
    "direct_a64fx_fails_both_ways",
    "a64fx_72_to_10_dest_proxy_migrateuri",
    "a64fx_10_to_72_dest_proxy_migrateuri",
    "a64fx_72_to_10_proxy_host_libvirt_port",
    "a64fx_10_to_72_source_redirect",
    "a64fx_72_to_10_dest_prerouting_redirect",
    "a64fx_10_to_72_parallel",
    "a64fx_72_to_10_tls",
    "a64fx_72_to_10_refused_source_keeps_running",
    "dest_proxy_in_port_range_breaks_port_picker",
];

/// Build the 7.2/10.0 lab (host b on `b_libvirt`) and run the scenarios of [`ALL`] named in `only`.
fn run_lab(prefix: &str, b_libvirt: Libvirt, only: Option<&[&str]>) {
    if let Some(unknown) = only
        .unwrap_or_default()
        .iter()
        .find(|name| !ALL.iter().any(|(suffix, _)| suffix == *name))
    {
        panic!("scenario {prefix}_{unknown}: no such scenario");
    }
    run_scenarios(prefix, Lab::start(b_libvirt), ALL, only);
}

/// Run the scenarios of `table` named in `only` (all without it) in `lab`, each as
/// `PREFIX_NAME`, and fail naming every scenario that failed.
fn run_scenarios(prefix: &str, lab: Result<Lab>, table: &[(&str, Body)], only: Option<&[&str]>) {
    let mut lab = match lab {
        Ok(lab) => lab,
        Err(err) => panic!("scenario {prefix}_lab: cannot build the libvirt lab: {err:#}"),
    };
    let mut failed = Vec::new();
    let wanted = |suffix: &str| only.is_none_or(|names| names.contains(&suffix));
    for (suffix, body) in table.iter().filter(|(suffix, _)| wanted(suffix)) {
        let name = format!("{prefix}_{suffix}");
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            scenario::run(&name, |s| {
                let result = body(s, &lab);
                if result.is_err() {
                    lab.copy_logs(s.dir.path());
                }
                result
            })
        }));
        if outcome.is_err() {
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        lab.keep();
        panic!(
            "libvirt scenarios failed: {}; lab kept in {}",
            failed.join(", "),
            lab.dir().display()
        );
    }
}

type Body = fn(&mut Scenario, &Lab) -> Result<()>;

/// No proxy, libvirt picking the port: QEMU 7.2 and 10.0 disagree about a64fx's registers, so
/// the destination rejects the CPU state and the source keeps the guest, both ways.
fn direct_fails_both_ways(s: &mut Scenario, lab: &Lab) -> Result<()> {
    for (from, to) in [(&lab.a, &lab.b), (&lab.b, &lab.a)] {
        let domain = format!("direct-{}", from.label);
        with_domain(s, from, to, &domain, |domain| {
            let out = migrate(from, to, domain, MIGRATE_P2P, &[])?;
            expect_failed(from, to, domain, &out)
        })?;
    }
    Ok(())
}

/// deploy/README.md 4a: the destination's QEMU listens on loopback, migproxy on the host's
/// address, the source told where to go with `--migrateuri`.
fn dest_proxy_migrateuri(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let proxy = dest_proxy(s, from, to, &[])?;
    proxied(s, from, to, &proxy, MIGRATE_P2P, &explicit_uri(to), 0)
}

/// `--migrateuri tcp://DEST:PORT --listen-address 127.0.0.1`.
fn explicit_uri(to: &Host) -> Vec<String> {
    vec![
        "--migrateuri".to_owned(),
        format!("tcp://{}:{EXPLICIT_PORT}", to.ip),
        "--listen-address".to_owned(),
        "127.0.0.1".to_owned(),
    ]
}

/// migproxy on the destination host: `--listen tcp:DEST_IP:PORT --upstream tcp:127.0.0.1:PORT`.
fn dest_proxy(s: &mut Scenario, from: &Host, to: &Host, extra: &[&str]) -> Result<Daemon> {
    let mut args = vec![
        "--listen".to_owned(),
        format!("tcp:{}:{EXPLICIT_PORT}", to.ip),
        "--upstream".to_owned(),
        format!("tcp:127.0.0.1:{EXPLICIT_PORT}"),
    ];
    args.extend(profile_args(s, from, to)?);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    Daemon::spawn_wrapped(
        &s.dir,
        &format!("migproxy-{}", to.label),
        &to.netns_prefix(),
        &args,
        &[EXPLICIT_PORT],
    )
}

/// A proxy host (here the source host's address) and libvirt choosing the port: `--migrateuri
/// tcp://PROXY` without a port; the destination's libvirt picks one of its range and the source
/// QEMU connects to PROXY on it. migproxy covers the range and forwards to the same port.
/// Returns the proxy, whose summary callers may check further.
fn proxy_host_libvirt_port(s: &mut Scenario, from: &Host, to: &Host) -> Result<Daemon> {
    let (first, last) = MIGRATION_PORTS;
    let mut args = vec![
        "--listen".to_owned(),
        format!("tcp:{}:{first}-{last}", from.ip),
        "--upstream".to_owned(),
        format!("tcp:{}:{first}-{last}", to.ip),
    ];
    args.extend(profile_args(s, from, to)?);
    let proxy = Daemon::spawn_wrapped(
        &s.dir,
        "migproxy-proxyhost",
        &from.netns_prefix(),
        &args,
        &[first, last],
    )?;
    let uri = vec!["--migrateuri".to_owned(), format!("tcp://{}", from.ip)];
    proxied(s, from, to, &proxy, MIGRATE_P2P, &uri, 0)?;
    Ok(proxy)
}

/// deploy/README.md 4c: no migration options; redirect.nft on the source sends QEMU's connection
/// to the destination's migration port to the local migproxy (running as the exempted uid),
/// which dials the original destination.
fn source_redirect(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    from.load_ruleset(
        "redirect.nft",
        &[
            ("MIGPROXY_UID", MIGPROXY_UID.to_owned()),
            ("MIGPROXY_PORT", REDIRECT_PORT.to_string()),
            ("MIGRATION_PORTS", ports_define()),
            ("UPGRADED_HOSTS", format!("{{ {} }}", to.ip)),
        ],
    )?;
    let result = (|| {
        let mut wrapper = from.netns_prefix();
        wrapper.extend(
            [
                "setpriv",
                &format!("--reuid={MIGPROXY_UID}"),
                &format!("--regid={MIGPROXY_UID}"),
                "--clear-groups",
            ]
            .map(str::to_owned),
        );
        let proxy = transparent_proxy(s, from, to, from, &wrapper)?;
        proxied(s, from, to, &proxy, MIGRATE_P2P, &[], 0)
    })();
    let _ = from
        .command_in("nft")
        .args(["delete", "table", "inet", "migproxy"])
        .status();
    result
}

/// deploy/README.md 4b.1: no migration options, nothing changed in libvirt or Nova;
/// redirect-prerouting.nft on the destination sends incoming connections to its migration
/// ports to the local migproxy, which dials the local QEMU on the original port. migproxy runs
/// from deploy/systemd/config.toml as shipped, only the profile paths replaced and the source
/// reference swapped for the opt-out (see `profile_args`).
fn dest_prerouting_redirect(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    to.load_ruleset(
        "redirect-prerouting.nft",
        &[
            ("MIGPROXY_PORT", REDIRECT_PORT.to_string()),
            ("MIGRATION_PORTS", ports_define()),
        ],
    )?;
    let result = (|| {
        let config = shipped_config(s, from, to)?;
        let proxy = Daemon::spawn_wrapped(
            &s.dir,
            &format!("migproxy-{}", to.label),
            &to.netns_prefix(),
            &["--config".to_owned(), config.display().to_string()],
            &[REDIRECT_PORT],
        )?;
        proxied(s, from, to, &proxy, MIGRATE_P2P, &[], 0)
    })();
    let _ = to
        .command_in("nft")
        .args(["delete", "table", "inet", "migproxy_incoming"])
        .status();
    result
}

/// deploy/systemd/config.toml with the example profile and admin TLS paths replaced by the fresh
/// profiles and credentials made here, and without its source reference (see `profile_args`).
fn shipped_config(s: &mut Scenario, from: &Host, to: &Host) -> Result<std::path::PathBuf> {
    let path = repo_root().join("deploy/systemd/config.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let dest = s.profile(&a64fx(to.version))?;
    let source = s.profile(&a64fx(from.version))?;
    let mut config = text.clone();
    // The admin endpoint serves HTTPS from this directory (server pair, and the CA for profiles).
    let admin_tls = s.dir.join("admin-tls");
    make_tls_creds(std::slice::from_ref(&admin_tls))?;
    let example_admin_tls = "/etc/migproxy/admin-tls";
    if !config.contains(example_admin_tls) {
        bail!("{} no longer names {example_admin_tls}", path.display());
    }
    config = config.replace(example_admin_tls, &admin_tls.display().to_string());
    for (example, actual) in [
        ("/etc/migproxy/profiles/a64fx-virt-7.2-source.json", &source),
        ("/etc/migproxy/profiles/a64fx-virt-7.2.json", &dest),
    ] {
        let quoted = format!("\"{example}\"");
        if !config.contains(&quoted) {
            bail!("{} no longer names {example}", path.display());
        }
        config = config.replace(&quoted, &format!("\"{}\"", actual.display()));
    }
    // No source reference in the lab (see `profile_args`): the shipped reference line goes, and
    // the opt-out is said at the top, where the file's daemon-wide keys are.
    let reference_line =
        "source_reference = \"/etc/migproxy/profiles/a64fx-virt-7.2-source-reference.json\"\n";
    if !config.contains(reference_line) {
        bail!("{} no longer names its source reference", path.display());
    }
    config = format!(
        "unreferenced_device_phase = \"allow\"\n{}",
        config.replace(reference_line, "")
    );
    let listen = format!("listen = \"tcp:0.0.0.0:{REDIRECT_PORT}\"");
    if !config.contains(&listen) || !config.contains("upstream = \"original-dst\"") {
        bail!(
            "{} is no longer the redirect-prerouting layout",
            path.display()
        );
    }
    let written = s.dir.join("config.toml");
    std::fs::write(&written, config).with_context(|| format!("writing {}", written.display()))?;
    Ok(written)
}

fn ports_define() -> String {
    format!("{}-{}", MIGRATION_PORTS.0, MIGRATION_PORTS.1)
}

/// `migproxy run --listen tcp:0.0.0.0:4444 --upstream original-dst` on `on`, through `wrapper`.
fn transparent_proxy(
    s: &mut Scenario,
    from: &Host,
    to: &Host,
    on: &Host,
    wrapper: &[String],
) -> Result<Daemon> {
    let mut args = vec![
        "--listen".to_owned(),
        format!("tcp:0.0.0.0:{REDIRECT_PORT}"),
        "--upstream".to_owned(),
        "original-dst".to_owned(),
    ];
    args.extend(profile_args(s, from, to)?);
    Daemon::spawn_wrapped(
        &s.dir,
        &format!("migproxy-{}", on.label),
        wrapper,
        &args,
        &[REDIRECT_PORT],
    )
}

/// `--parallel --parallel-connections 3` through the destination proxy: one main and three
/// multifd connections, every one opened by the source QEMU.
fn parallel(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let proxy = dest_proxy(s, from, to, &[])?;
    let mut options = explicit_uri(to);
    options.extend([
        "--parallel".to_owned(),
        "--parallel-connections".to_owned(),
        PARALLEL_CONNECTIONS.to_string(),
    ]);
    proxied(
        s,
        from,
        to,
        &proxy,
        MIGRATE_P2P,
        &options,
        u64::from(PARALLEL_CONNECTIONS),
    )
}

/// `--tls`: libvirt gives both QEMUs `tls-creds-x509` from qemu.conf's
/// `migrate_tls_x509_cert_dir` (the source verifies the server's name against the migrate URI's
/// host, the destination requires a client certificate); migproxy terminates TLS on both legs.
/// With `parallel` connections, `--parallel` too: every multifd channel is a TLS session of its own.
fn tls(s: &mut Scenario, from: &Host, to: &Host, parallel: u32) -> Result<()> {
    let proxy_creds = s.dir.join("proxy-tls");
    make_tls_creds(&[from.tls_dir(), to.tls_dir(), proxy_creds.clone()])?;
    let creds = proxy_creds.display().to_string();
    let proxy = dest_proxy(s, from, to, &["--tls-creds", &creds, "--tls-verify-peer"])?;
    let mut options = explicit_uri(to);
    options.push("--tls".to_owned());
    if parallel > 0 {
        options.extend([
            "--parallel".to_owned(),
            "--parallel-connections".to_owned(),
            parallel.to_string(),
        ]);
    }
    proxied(
        s,
        from,
        to,
        &proxy,
        MIGRATE_P2P,
        &options,
        u64::from(parallel),
    )?;
    if !proxy.log().contains("tls") {
        bail!("migproxy's log never mentions TLS although the migration was --tls");
    }
    Ok(())
}

/// Without `--p2p`: virsh talks to both libvirts itself; the data path is the same.
fn without_p2p(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let proxy = dest_proxy(s, from, to, &[])?;
    proxied(
        s,
        from,
        to,
        &proxy,
        MIGRATE_CLIENT_DRIVEN,
        &explicit_uri(to),
        0,
    )
}

/// `--on-extra refuse`: a register the destination lacks refuses the migration; virsh fails and
/// the guest keeps running on the source, defined there still.
fn refused(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let proxy = dest_proxy(s, from, to, &["--on-extra", "refuse"])?;
    let domain = s.name.clone();
    with_domain(s, from, to, &domain, |domain| {
        let out = migrate(from, to, domain, MIGRATE_P2P, &explicit_uri(to))?;
        expect_failed(from, to, domain, &out)?;
        let summary = expect_summary(&proxy, "refused")?;
        eprintln!("  refused: {}", event_field(&summary, "reason"));
        Ok(())
    })
}

/// `--compressed` (XBZRLE pages on later passes), `--auto-converge` and a bandwidth limit: RAM
/// records migproxy decodes and forwards as they are.
fn compressed_auto_converge(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let proxy = dest_proxy(s, from, to, &[])?;
    let mut options = explicit_uri(to);
    options.extend(["--compressed", "--auto-converge", "--bandwidth", "100"].map(str::to_owned));
    proxied(s, from, to, &proxy, MIGRATE_P2P, &options, 0)
}

/// `--postcopy` (postcopy enabled, not yet switched to): with a rewrite profile migproxy refuses at
/// the postcopy advice, before any RAM moves (after the switch the source could no longer take the
/// guest back); virsh fails and the guest keeps running on the source.
fn postcopy_refused(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let proxy = dest_proxy(s, from, to, &[])?;
    let domain = s.name.clone();
    with_domain(s, from, to, &domain, |domain| {
        let mut options = explicit_uri(to);
        options.push("--postcopy".to_owned());
        let out = migrate(from, to, domain, MIGRATE_P2P, &options)?;
        expect_failed(from, to, domain, &out)?;
        let summary = expect_summary(&proxy, "refused")?;
        let reason = event_field(&summary, "reason");
        if !reason.to_lowercase().contains("postcopy") {
            bail!("migproxy refused, but not because of postcopy: {reason}");
        }
        Ok(())
    })
}

/// `--tunnelled`: the stream travels inside libvirt's own connection, so a proxy on the migration
/// address never sees it; the migration is a direct one and fails like one.
fn tunnelled_bypasses_proxy(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let proxy = dest_proxy(s, from, to, &[])?;
    let domain = s.name.clone();
    with_domain(s, from, to, &domain, |domain| {
        let out = migrate(from, to, domain, MIGRATE_P2P, &["--tunnelled".to_owned()])?;
        expect_failed(from, to, domain, &out)?;
        if proxy.log().contains("\"name\":\"conn\"") {
            bail!("a connection reached migproxy although the migration was tunnelled");
        }
        Ok(())
    })
}

/// What the old Nova recipe did, and why it was removed from the guide: migproxy listening on the
/// destination's own address across libvirt's migration range. libvirt's port picker tries to bind
/// each port on every address, finds all of them taken, and fails every migration where it
/// chooses the port; the source keeps the guest.
fn proxy_in_port_range_breaks_port_picker(s: &mut Scenario, from: &Host, to: &Host) -> Result<()> {
    let (first, last) = MIGRATION_PORTS;
    let mut args = vec![
        "--listen".to_owned(),
        format!("tcp:{}:{first}-{last}", to.ip),
        "--upstream".to_owned(),
        format!("tcp:127.0.0.1:{first}-{last}"),
    ];
    args.extend(profile_args(s, from, to)?);
    let proxy = Daemon::spawn_wrapped(
        &s.dir,
        &format!("migproxy-{}", to.label),
        &to.netns_prefix(),
        &args,
        &[first, last],
    )?;
    let domain = s.name.clone();
    with_domain(s, from, to, &domain, |domain| {
        let out = migrate(from, to, domain, MIGRATE_P2P, &[])?;
        expect_failed(from, to, domain, &out)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("Unable to find an unused port") {
            bail!(
                "virsh failed, but not in libvirt's port picker: {}",
                stderr.trim()
            );
        }
        if !proxy
            .events_named(migproxy_integration_tests::migproxy::SUMMARY)
            .is_empty()
        {
            bail!("a migration reached the proxy although libvirt found no port");
        }
        Ok(())
    })
}

/// Both fresh profiles (captured from plain QEMU with the domain's machine, CPU and vCPUs) and,
/// explicitly, no source reference: measured, the libvirt domain's device state lists 17 devices
/// where the plain QEMU VM's lists 18, so a plain reference refuses every lab migration (by name,
/// fail closed). A reference would have to be captured from the domain itself (started paused,
/// migrated to a file through libvirt), which the lab does not do yet; until then its proxies
/// keep the candidate rule, whose exposure (a guest can fail its own migration) does not change
/// what these scenarios check.
fn profile_args(s: &mut Scenario, from: &Host, to: &Host) -> Result<Vec<String>> {
    let mut args = s.profiles_only_args(&a64fx(from.version), &a64fx(to.version))?;
    args.extend(UNREFERENCED.map(str::to_owned));
    Ok(args)
}

/// The opt-out of the lab's proxies (see `profile_args`).
const UNREFERENCED: [&str; 2] = ["--unreferenced-device-phase", "allow"];

/// Start the domain on `from`, run `body`, and remove the domain from both hosts whatever happened.
fn with_domain(
    s: &mut Scenario,
    from: &Host,
    to: &Host,
    domain: &str,
    body: impl FnOnce(&str) -> Result<()>,
) -> Result<()> {
    let _ = s;
    from.start_domain(domain)?;
    let result = body(domain);
    from.remove_domain(domain);
    to.remove_domain(domain);
    result
}

/// `virsh -c FROM migrate OPTIONS DOMAIN TO_URI EXTRA...`.
fn migrate(
    from: &Host,
    to: &Host,
    domain: &str,
    options: &[&str],
    extra: &[String],
) -> Result<Output> {
    let to_uri = to.uri();
    let mut args: Vec<&str> = vec!["migrate"];
    args.extend_from_slice(options);
    args.push(domain);
    args.push(&to_uri);
    args.extend(extra.iter().map(String::as_str));
    eprintln!("  virsh -c (host {}) {} ", from.label, args.join(" "));
    from.virsh(&args)
}

/// A migration through `proxy` completes: the domain left the source (`--undefinesource`), runs
/// on the destination from where it stopped, every vCPU was rewritten, the source QEMU opened
/// the main channel plus `multifd` connections, with the return path on.
fn proxied(
    s: &mut Scenario,
    from: &Host,
    to: &Host,
    proxy: &Daemon,
    options: &[&str],
    extra: &[String],
    multifd: u64,
) -> Result<()> {
    let domain = s.name.clone();
    with_domain(s, from, to, &domain, |domain| {
        let before = from.counter(domain)?;
        let started = std::time::Instant::now();
        let out = migrate(from, to, domain, options, extra)?;
        if !out.status.success() {
            bail!(
                "virsh migrate failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        eprintln!(
            "  virsh migrate completed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if from.has_domain(domain)? {
            bail!(
                "host {}: domain still defined after --undefinesource",
                from.label
            );
        }
        let first = to.counter(domain)?;
        if first < before {
            bail!(
                "destination counter {first} is below the source's {before}: memory did not arrive"
            );
        }
        let later = to.assert_running(domain)?;
        eprintln!(
            "  guest counter {before} on host {} -> {first} -> {later} on host {}",
            from.label, to.label
        );
        let summary = expect_summary(proxy, "completed")?;
        check_summary(&summary, multifd)?;
        check_connections(proxy, from, multifd)
    })
}

fn check_summary(summary: &Value, multifd: u64) -> Result<()> {
    let rewritten = event_field(summary, "cpus_rewritten");
    if rewritten != "2" {
        bail!("migproxy rewrote {rewritten} vCPU(s), expected both");
    }
    let channels = event_field(summary, "channels");
    let multifd_seen = channels.split('+').filter(|c| *c == "multifd").count();
    if u64::try_from(multifd_seen).ok() != Some(multifd)
        || !channels.split('+').any(|c| c == "main")
    {
        bail!("migproxy relayed channels {channels:?}, expected main + {multifd} multifd");
    }
    // libvirt turns the return path on by itself: the source learns the destination's outcome.
    if event_field(summary, "return_path") != "true" {
        bail!("libvirt migrated without the return path: {summary}");
    }
    Ok(())
}

/// Who opened the migration connections: every one (main and multifd) comes from the source host,
/// i.e. from the source QEMU (libvirt itself only talks to the other libvirt); none comes from the
/// destination, which only listens.
fn check_connections(proxy: &Daemon, from: &Host, multifd: u64) -> Result<()> {
    let mut connections: Vec<(String, String)> = Vec::new();
    for event in proxy.events() {
        let Some(span) = event.get("span") else {
            continue;
        };
        if span.get("name").and_then(Value::as_str) != Some("conn") {
            continue;
        }
        let peer = span.get("peer").and_then(Value::as_str).unwrap_or("");
        let kind = span.get("kind").and_then(Value::as_str).unwrap_or("");
        let entry = (kind.to_owned(), peer.to_owned());
        if !connections.contains(&entry) {
            connections.push(entry);
        }
    }
    let listed: Vec<String> = connections
        .iter()
        .map(|(kind, peer)| format!("{kind} from {peer}"))
        .collect();
    eprintln!("  connections: {}", listed.join(", "));
    let source_prefix = format!("{}:", from.ip);
    if let Some((kind, peer)) = connections
        .iter()
        .find(|(_, peer)| !peer.starts_with(&source_prefix))
    {
        bail!(
            "a {kind} connection came from {peer}, not from the source host {}",
            from.ip
        );
    }
    let expected = multifd + 1;
    if u64::try_from(connections.len()).ok() != Some(expected) {
        bail!(
            "{} migration connections, expected {expected}: {listed:?}",
            connections.len()
        );
    }
    Ok(())
}

/// The migration failed: virsh says so, the guest still runs on the source, the destination has
/// no such domain.
fn expect_failed(from: &Host, to: &Host, domain: &str, out: &Output) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        bail!("virsh migrate succeeded, expected a failure");
    }
    eprintln!("  virsh migrate failed as expected: {}", stderr.trim());
    let value = from.assert_running(domain)?;
    eprintln!(
        "  guest still running on host {}, counter {value}",
        from.label
    );
    let state = to.domain_state(domain)?;
    if state != "absent" {
        bail!(
            "host {}: domain {domain} is {state} after the failed migration",
            to.label
        );
    }
    Ok(())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "migproxy libvirt lab");
    name.push(DnType::CommonName, common_name);
    name
}

/// One CA and a server and a client certificate valid for both lab hosts and loopback, written
/// with QEMU's file names into every directory of `dirs`.
fn make_tls_creds(dirs: &[std::path::PathBuf]) -> Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = distinguished_name("migproxy libvirt lab ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let names: Vec<String> = [
        "localhost",
        "127.0.0.1",
        &migproxy_integration_tests::libvirt::HOST_A_IP.to_string(),
        &migproxy_integration_tests::libvirt::HOST_B_IP.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut files = vec![("ca-cert.pem".to_owned(), ca.pem())];
    for (role, purpose) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name = distinguished_name(&format!("lab {role}"));
        // QEMU 10.0 rejects certificates without the key-encipherment usage.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        files.push((format!("{role}-cert.pem"), cert.pem()));
        files.push((format!("{role}-key.pem"), key.serialize_pem()));
    }
    for dir in dirs {
        write_files(dir, &files)?;
    }
    Ok(())
}

fn write_files(dir: &Path, files: &[(String, String)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
