//! TLS migrations through migproxy: QEMU 10.0 <-> 7.2, `-M virt-7.2 -cpu a64fx`, 2 vCPUs,
//! with `tls-creds-x509` on both QEMUs and `migproxy run --tls-creds DIR` in between, which
//! terminates the source's TLS, rewrites the cpreg arrays and opens its own TLS to the destination.
//!
//! Certificates are made at test time with rcgen in QEMU's credential layout (one directory serves
//! both QEMUs and the proxy): a CA, a server pair (what the source sees, serverAuth) and a client
//! pair (what the destination sees, clientAuth), for `localhost` and 127.0.0.1. Every leaf carries
//! keyUsage digitalSignature + keyEncipherment: QEMU 10.0 refuses certificates without the
//! encryption-key usage. Keys are rcgen's ECDSA P-256 in PKCS#8 PEM, which gnutls loads.
//!
//! - 10.0 -> 7.2 and 7.2 -> 10.0, plain and with 2 multifd channels: the migration completes, the
//!   proxy rewrote both vCPUs (dropped or filled registers in its summary), and the destination
//!   continues the guest's counter. Each direction and each channel layout runs once with and once
//!   with `--tls-no-verify-peer` (the source then needs no certificate the proxy trusts).
//! - A source whose certificate comes from a CA the proxy does not trust is refused by
//!   `--tls-verify-peer` before the destination is contacted: no connection to the destination's
//!   port ever exists, the destination stays `inmigrate`, the source guest keeps running. Twice:
//!   an impostor CA bearing the trusted CA's name (the source presents its certificate and the
//!   proxy rejects the signature), and a foreign CA (gnutls withholds a certificate the proxy's
//!   request does not ask for, and the proxy refuses a source without one).
//! - 10.0 -> 7.2 with `postcopy-ram`: never switched (completes rewritten), and switched after
//!   precopy rounds (the package is rewritten inside TLS, the migration completes).

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use migproxy_integration_tests::flows::{
    allow_unrecoverable_postcopy_args, migration_through_proxy_rewrites_by, start_proxy,
    switched_migration_through_proxy, Pair, Setup,
};
use migproxy_integration_tests::migproxy::event_field;
use migproxy_integration_tests::qemu::Version::{self, V10, V72};
use migproxy_integration_tests::qmp::migration_status;
use migproxy_integration_tests::scenario::{self, a64fx, Scenario};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::json;

/// Multifd connections besides the main channel.
const MULTIFD_CHANNELS: u32 = 2;
/// The id of the `tls-creds-x509` object on every QEMU.
const TLS_OBJECT: &str = "tls0";
/// The name every leaf certificate carries and every TLS client checks.
const TLS_HOSTNAME: &str = "localhost";
/// The common name of the CA every trusted certificate chains to.
const TRUSTED_CA_NAME: &str = "migproxy test ca";
/// What the proxy logs when it refused the source's certificate.
const SOURCE_HANDSHAKE_REFUSED: &str =
    "tls handshake with the source failed (no or untrusted client certificate?): closed, destination not contacted";
/// How long the refusal may take to show in the proxy's log.
const SUMMARY_WAIT: Duration = Duration::from_secs(30);

/// A certificate authority: its certificate and the key that signs leaves.
struct Authority {
    cert: Certificate,
    key: KeyPair,
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "migproxy integration tests");
    name.push(DnType::CommonName, common_name);
    name
}

/// A self-signed CA. Its name is also what a TLS server's certificate request lists, and what a
/// gnutls client matches its certificate's issuer against before presenting it.
fn authority(common_name: &str) -> Result<Authority> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    Ok(Authority { cert, key })
}

/// A leaf for `localhost` / 127.0.0.1 signed by `ca`, written as `ROLE-cert.pem` / `ROLE-key.pem`.
fn write_leaf(
    dir: &Path,
    ca: &Authority,
    role: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> Result<()> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![TLS_HOSTNAME.to_owned(), "127.0.0.1".to_owned()])?;
    params.distinguished_name = distinguished_name(&format!("{TLS_HOSTNAME} {role}"));
    // QEMU 10.0 rejects certificates without the key-encipherment ("encryption_key") usage.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![purpose];
    // Names the signing key: an impostor CA may share the trusted CA's name.
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    write(dir, &format!("{role}-cert.pem"), &cert.pem())?;
    write(dir, &format!("{role}-key.pem"), &key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The shared credential directory `dir`: ca-cert.pem, server and client pairs from one CA.
/// Returns the CA (a rogue source directory still needs it to trust the proxy).
fn make_creds(dir: &Path) -> Result<Authority> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = authority(TRUSTED_CA_NAME)?;
    write(dir, "ca-cert.pem", &ca.cert.pem())?;
    write_leaf(dir, &ca, "server", ExtendedKeyUsagePurpose::ServerAuth)?;
    write_leaf(dir, &ca, "client", ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(ca)
}

/// A source credential directory whose client certificate comes from a CA named `rogue_name`
/// that nobody else trusts. Its ca-cert.pem holds the rogue CA too (QEMU validates its own
/// certificate against it at start) and the trusted one (to accept the proxy's certificate).
fn make_rogue_source_creds(dir: &Path, trusted: &Authority, rogue_name: &str) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let rogue = authority(rogue_name)?;
    write(
        dir,
        "ca-cert.pem",
        &format!("{}{}", rogue.cert.pem(), trusted.cert.pem()),
    )?;
    write_leaf(dir, &rogue, "client", ExtendedKeyUsagePurpose::ClientAuth)
}

/// `-object tls-creds-x509,...` for one side: the source is QEMU's TLS client, the destination
/// its TLS server; both verify their peer.
fn tls_object_args(creds: &Path, endpoint: &str) -> Vec<String> {
    vec![
        "-object".to_owned(),
        format!(
            "tls-creds-x509,id={TLS_OBJECT},dir={},endpoint={endpoint},verify-peer=on",
            creds.display()
        ),
    ]
}

/// a64fx `from` -> `to`, both QEMUs migrating over TLS with their own credential directory.
fn tls_setup(from: Version, to: Version, source_creds: &Path, dest_creds: &Path) -> Setup {
    let mut source = a64fx(from);
    source.extra_args = tls_object_args(source_creds, "client");
    let mut dest = a64fx(to);
    dest.extra_args = tls_object_args(dest_creds, "server");
    let mut setup = Setup::new(source, dest);
    setup.params_both["tls-creds"] = json!(TLS_OBJECT);
    setup.params_source["tls-hostname"] = json!(TLS_HOSTNAME);
    setup
}

/// The proxy's flags: both fresh profiles, the shared credentials, optionally `--tls-verify-peer`.
fn proxy_args(
    s: &mut Scenario,
    from: Version,
    to: Version,
    creds: &Path,
    verify_peer: bool,
) -> Result<Vec<String>> {
    // Profiles of plain configurations: TLS does not change the register set.
    let mut args = s.profile_args(&a64fx(from), &a64fx(to))?;
    args.extend([
        "--tls-creds".to_owned(),
        creds.display().to_string(),
        "--tls-hostname".to_owned(),
        TLS_HOSTNAME.to_owned(),
    ]);
    // Verifying the source is the default; the other variant opts out explicitly.
    args.push(
        if verify_peer {
            "--tls-verify-peer"
        } else {
            "--tls-no-verify-peer"
        }
        .to_owned(),
    );
    Ok(args)
}

/// The channel layout of a TLS migration.
#[derive(Clone, Copy)]
enum Channels {
    Main,
    Multifd(u32),
    /// `postcopy-ram` on (never switched), which migproxy is told to let through for these
    /// older sources (`--unrecoverable-postcopy allow`).
    PostcopyCapable,
}

/// One TLS migration through the proxy: completes, rewritten, guest continues on the destination.
fn tls_migration_succeeds(
    s: &mut Scenario,
    from: Version,
    to: Version,
    channels: Channels,
    verify_peer: bool,
) -> Result<()> {
    let creds = s.dir.join("creds");
    make_creds(&creds)?;
    let mut setup = tls_setup(from, to, &creds, &creds);
    let mut args = proxy_args(s, from, to, &creds, verify_peer)?;
    match channels {
        Channels::Main => {}
        Channels::Multifd(count) => setup = setup.multifd(count),
        Channels::PostcopyCapable => {
            setup = setup.postcopy();
            args.extend(["--unrecoverable-postcopy".to_owned(), "allow".to_owned()]);
        }
    }
    let (summary, daemon) = migration_through_proxy_rewrites_by(s, &setup, &args)?;
    if let Channels::Multifd(count) = channels {
        // The default raw relay is splice, which needs plain sockets: TLS channels are copied.
        let used: Vec<String> = daemon
            .events_named("raw relay")
            .iter()
            .map(|event| event_field(event, "relay"))
            .collect();
        if used.len() != count as usize || used.iter().any(|relay| relay != "copy") {
            bail!("expected {count} TLS multifd channels through the copying relay, the daemon used {used:?}");
        }
    }
    if matches!(channels, Channels::PostcopyCapable)
        && event_field(&summary, "postcopy") != "unrecoverable"
    {
        bail!("the summary does not report the postcopy decision taken at ADVISE: {summary}");
    }
    if event_field(&summary, "dropped").is_empty() && event_field(&summary, "filled").is_empty() {
        bail!("the summary shows neither dropped nor filled registers: the cpreg rewrite did nothing: {summary}");
    }
    Ok(())
}

#[test]
fn tls_a64fx_10_to_72() {
    scenario::run("tls_a64fx_10_to_72", |s| {
        tls_migration_succeeds(s, V10, V72, Channels::Main, false)
    });
}

#[test]
fn tls_a64fx_10_to_72_postcopy_capable() {
    scenario::run("tls_a64fx_10_to_72_postcopy_capable", |s| {
        tls_migration_succeeds(s, V10, V72, Channels::PostcopyCapable, false)
    });
}

/// TLS 10.0 -> 7.2 switched to postcopy after precopy rounds with a dirtying guest: the proxy,
/// given the source's reference description, rewrites the package inside TLS; the migration
/// completes, the guest runs on the destination, and the source sent pages in postcopy.
#[test]
fn tls_a64fx_10_to_72_postcopy_switch_package_rewritten() {
    scenario::run(
        "tls_a64fx_10_to_72_postcopy_switch_package_rewritten",
        |s| {
            let creds = s.dir.join("creds");
            make_creds(&creds)?;
            // 4 MiB/s with a 1 ms downtime limit: precopy cannot converge while the guest dirties.
            let setup = tls_setup(V10, V72, &creds, &creds).postcopy().slow(4 << 20);
            let mut args = proxy_args(s, V10, V72, &creds, false)?;
            args.extend(allow_unrecoverable_postcopy_args());
            let (summary, _) = switched_migration_through_proxy(s, &setup, &args)?;
            if event_field(&summary, "cpus_rewritten") != "2" {
                bail!("the package's vCPUs were not rewritten: {summary}");
            }
            Ok(())
        },
    );
}

#[test]
fn tls_a64fx_72_to_10_verify_peer() {
    scenario::run("tls_a64fx_72_to_10_verify_peer", |s| {
        tls_migration_succeeds(s, V72, V10, Channels::Main, true)
    });
}

#[test]
fn tls_a64fx_10_to_72_multifd_verify_peer() {
    scenario::run("tls_a64fx_10_to_72_multifd_verify_peer", |s| {
        tls_migration_succeeds(s, V10, V72, Channels::Multifd(MULTIFD_CHANNELS), true)
    });
}

#[test]
fn tls_a64fx_72_to_10_multifd() {
    scenario::run("tls_a64fx_72_to_10_multifd", |s| {
        tls_migration_succeeds(s, V72, V10, Channels::Multifd(MULTIFD_CHANNELS), false)
    });
}

/// Every TCP socket (listening ones aside) with `port` at either end, from /proc/net/tcp{,6}:
/// a connection made to the port, even one closed since, stays listed (TIME_WAIT) for a minute.
fn connections_with_port(port: u16) -> Vec<String> {
    const TCP_LISTEN: &str = "0A";
    let wanted = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|table| {
            fs::read_to_string(table)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            match cols.get(1..4) {
                Some([local, remote, state]) => {
                    *state != TCP_LISTEN && (local.ends_with(&wanted) || remote.ends_with(&wanted))
                }
                _ => false,
            }
        })
        .collect()
}

/// A source whose client certificate comes from a CA named `rogue_name`, which the proxy does
/// not trust, migrates through `migproxy run --tls-verify-peer`: the source's migration fails and
/// its guest keeps running, the proxy names the source's handshake (its reason must contain
/// `expected_reason`), and nothing reached the destination: no connection to its port ever
/// existed, it stays `inmigrate` with no incoming migration under way.
fn untrusted_source_refused(
    s: &mut Scenario,
    rogue_name: &str,
    expected_reason: &str,
) -> Result<()> {
    let creds = s.dir.join("creds");
    let trusted = make_creds(&creds)?;
    let rogue = s.dir.join("rogue");
    make_rogue_source_creds(&rogue, &trusted, rogue_name)?;
    let setup = tls_setup(V10, V72, &rogue, &creds);
    let args = proxy_args(s, V10, V72, &creds, true)?;
    let mut pair = Pair::start(s, &setup, "")?;
    let daemon = start_proxy(s, pair.dest_port, &args)?;
    scenario::migrate(&mut pair.source, daemon.listen_port)?;
    let info = scenario::assert_source_kept_running(&mut pair.source)?;
    eprintln!(
        "  source: {}",
        info.get("error-desc")
            .and_then(|d| d.as_str())
            .unwrap_or("(no error-desc)")
    );

    // The refusal happens before the connection has identified itself, so no migration exists
    // (no summary): the proxy logs the failed source handshake and closes, and nothing of it
    // was counted as a channel.
    let refusals = daemon.wait_events(SOURCE_HANDSHAKE_REFUSED, 1, SUMMARY_WAIT)?;
    if !refusals
        .iter()
        .any(|e| event_field(e, "err").contains(expected_reason))
    {
        bail!("the proxy did not refuse the source's tls handshake with {expected_reason:?}: {refusals:?}");
    }
    let migrations = daemon.events_named("migration summary");
    if !migrations.is_empty() {
        bail!("a refused source became a migration: {migrations:?}");
    }
    // The refusal is logged once the refused connection is gone: had the proxy dialed the
    // destination, the socket would be listed now (in TIME_WAIT at least).
    let touching = connections_with_port(pair.dest_port);
    if !touching.is_empty() {
        bail!(
            "the destination's port {} saw connections: {touching:?}",
            pair.dest_port
        );
    }
    let dest_state = pair.dest.qmp.status()?;
    let dest_migration = pair.dest.qmp.query_migrate()?;
    eprintln!(
        "  destination: run state {dest_state}, incoming migration {}",
        migration_status(&dest_migration)
    );
    if dest_state != "inmigrate" {
        bail!("the destination left inmigrate ({dest_state}) although nothing reached it");
    }
    if !matches!(migration_status(&dest_migration), "none" | "setup") {
        bail!("the destination's incoming migration moved: {dest_migration}");
    }
    Ok(())
}

/// An impostor CA with the trusted CA's name: the proxy's certificate request names that CA, so
/// the source presents its certificate, and the proxy rejects its signature.
#[test]
fn tls_impostor_source_certificate_refused_before_destination() {
    scenario::run("tls_impostor_source_refused", |s| {
        untrusted_source_refused(s, TRUSTED_CA_NAME, "invalid peer certificate")
    });
}

/// A foreign CA: gnutls withholds a certificate whose issuer is not among the CAs the proxy's
/// request names, and the proxy refuses a source without one.
#[test]
fn tls_foreign_ca_source_refused_before_destination() {
    scenario::run("tls_foreign_ca_source_refused", |s| {
        untrusted_source_refused(s, "rogue ca", "peer sent no certificates")
    });
}
