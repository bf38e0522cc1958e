//! A destination profile fetched over `https://` with `--profile-ca`, end to end: the real
//! daemon fetches from a real migproxy admin address serving HTTPS (or, for misbehaving servers,
//! from a rustls server in this test), over loopback, with certificates made at test time.
//!
//! Whatever goes wrong with the fetch, the migration ends before the destination is contacted,
//! with one line naming the URL and the problem.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const SECS: Duration = Duration::from_secs(20);

/// A CA made at test time.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn write_ca(&self, dir: &TempDir) -> String {
        let path = dir.file("profile-ca.pem");
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }
}

/// What is wrong with a server certificate, if anything.
#[derive(Clone, Copy)]
enum ServerCert {
    Good,
    Expired,
    OtherHost,
}

/// `server-cert.pem` and `server-key.pem` in `dir`, signed by `ca`, as `kind` says.
fn write_server_cert(dir: &TempDir, ca: &Ca, kind: ServerCert) {
    let names = match kind {
        ServerCert::OtherHost => vec!["other.example".to_owned()],
        _ => vec!["localhost".to_owned()],
    };
    let mut params = CertificateParams::new(names).unwrap();
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if let ServerCert::Expired = kind {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    std::fs::write(dir.file("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.file("server-key.pem"), key.serialize_pem()).unwrap();
}

/// The 7.2 destination profile, captured from the real 7.2 stream.
fn dest_profile(dir: &TempDir) -> String {
    vector_profile(dir, "q72-a64fx.bin", &[], "dest72.json")
}

/// A migproxy whose admin address serves `profile` over HTTPS with `dir`'s server certificate.
fn advertiser(dir: &TempDir, profile: &str) -> Daemon {
    let creds = dir.0.to_string_lossy().into_owned();
    Daemon::start(&[
        "--upstream",
        "tcp:127.0.0.1:1",
        "--admin-tls-creds",
        &creds,
        "--serve-profile",
        &format!("a64fx-7.2={profile}"),
    ])
}

/// The daemon under test: fetches its destination profile from `url`, trusting only `ca`. The
/// source's reference is the migrated vector itself (a saved stream of its configuration).
fn fetcher(destination: &Destination, url: &str, ca: &str, extra: &[&str]) -> Daemon {
    let upstream = destination.upstream();
    let reference = vector_path("q10m72-a64fx.bin");
    let mut args = vec![
        "--upstream",
        &upstream,
        "--dest-profile",
        url,
        "--profile-ca",
        ca,
        "--source-reference",
        &reference,
    ];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

/// The migration summary of a migration that could not have its profile: failed, naming the URL
/// and `problem`, and the destination never contacted.
fn assert_fetch_refused(daemon: &Daemon, destination: &Destination, url: &str, problem: &str) {
    migrate_refusable(daemon, &vector("q10m72-a64fx.bin"));
    let summary = daemon.wait_log("migration summary", SECS);
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    assert_eq!(summary["fields"]["outcome"], "failed", "{summary}");
    assert!(
        reason.contains("destination profile unavailable"),
        "{reason}"
    );
    assert!(
        reason.contains(url),
        "the reason does not name {url}: {reason}"
    );
    assert!(
        reason.contains(problem),
        "the reason does not say {problem:?}: {reason}"
    );
    assert_eq!(
        daemon.metric("migproxy_migrations_total{outcome=\"failed\"}"),
        Some(1)
    );
    assert_eq!(destination.accepted(), 0, "the destination was contacted");
}

#[test]
fn a_profile_fetched_over_https_with_the_pinned_ca_rewrites_the_migration() {
    let dir = TempDir::new("https-good");
    let ca = Ca::new("profile CA");
    write_server_cert(&dir, &ca, ServerCert::Good);
    let profile = dest_profile(&dir);
    let advertiser = advertiser(&dir, &profile);
    let url = format!(
        "https://localhost:{}/profiles/a64fx-7.2",
        advertiser.admin.port()
    );
    let source_profile = vector_profile(&dir, "q10m72-a64fx.bin", &[], "src10.json");
    let destination = Destination::reading();
    let daemon = fetcher(
        &destination,
        &url,
        &ca.write_ca(&dir),
        &["--source-profile", &source_profile],
    );
    migrate_refusable(&daemon, &vector("q10m72-a64fx.bin"));
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
    assert_eq!(summary["fields"]["cpus_rewritten"], 2, "{summary}");
    daemon.wait_event("destination profile fetched", SECS, |e| {
        e["fields"]["url"] == url.as_str()
    });
    assert_eq!(destination.accepted(), 1);
}

/// The profile server presents `cert` signed by `signer`; the fetcher pins `pinned` (or the
/// signer's CA when `None`): the fetch must fail with `problem`, before the destination is dialed.
fn fetch_with_bad_certificate(
    name: &str,
    signer: &Ca,
    pinned: Option<&Ca>,
    cert: ServerCert,
    problem: &str,
) {
    let dir = TempDir::new(name);
    write_server_cert(&dir, signer, cert);
    let advertiser = advertiser(&dir, &dest_profile(&dir));
    let url = format!(
        "https://localhost:{}/profiles/a64fx-7.2",
        advertiser.admin.port()
    );
    let destination = Destination::reading();
    let ca = pinned.unwrap_or(signer).write_ca(&dir);
    let daemon = fetcher(&destination, &url, &ca, &[]);
    assert_fetch_refused(&daemon, &destination, &url, problem);
}

#[test]
fn a_server_certificate_from_another_ca_fails_the_fetch_before_the_destination_is_dialed() {
    fetch_with_bad_certificate(
        "https-other-ca",
        &Ca::new("another CA"),
        Some(&Ca::new("profile CA")),
        ServerCert::Good,
        "UnknownIssuer",
    );
}

#[test]
fn an_expired_server_certificate_fails_the_fetch_before_the_destination_is_dialed() {
    fetch_with_bad_certificate(
        "https-expired",
        &Ca::new("profile CA"),
        None,
        ServerCert::Expired,
        "xpired",
    );
}

#[test]
fn a_server_certificate_for_another_host_fails_the_fetch_before_the_destination_is_dialed() {
    fetch_with_bad_certificate(
        "https-other-host",
        &Ca::new("profile CA"),
        None,
        ServerCert::OtherHost,
        "certificate not valid for name \"localhost\"",
    );
}

/// A pinned CA means the operator wants authenticated profiles: a plain `http://` profile URL
/// next to it is a configuration error, not a silent downgrade.
#[test]
fn a_plain_http_profile_url_with_a_pinned_ca_is_refused_at_startup() {
    let dir = TempDir::new("https-plain");
    let ca = Ca::new("profile CA").write_ca(&dir);
    let out = Command::new(binary())
        .args([
            "run",
            "--listen",
            "tcp:127.0.0.1:0",
            "--upstream",
            "tcp:127.0.0.1:1",
            "--admin",
            "none",
            "--dest-profile",
            "http://127.0.0.1:9/profiles/a64fx-7.2",
            "--profile-ca",
            &ca,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("http://127.0.0.1:9/profiles/a64fx-7.2")
            && stderr.contains("plain http:// while --profile-ca pins a CA"),
        "{stderr}"
    );
}

/// How the test's own HTTPS server answers.
#[derive(Clone)]
enum Answer {
    /// 200 with this body.
    Body(Vec<u8>),
    /// Completes the TLS handshake, reads the request, never answers.
    Silence,
}

/// A one-connection-at-a-time HTTPS server with `dir`'s certificate, answering `answer`.
fn https_server(dir: &TempDir, answer: Answer) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.file("server-cert.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.file("server-key.pem")).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { break };
            let config = Arc::clone(&config);
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut tls =
                    rustls::StreamOwned::new(rustls::ServerConnection::new(config).unwrap(), tcp);
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                match answer {
                    Answer::Body(body) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = tls.write_all(head.as_bytes());
                        let _ = tls.write_all(&body);
                        let _ = tls.flush();
                    }
                    Answer::Silence => {
                        // Hold the connection until the client gives up.
                        let _ = tls.read(&mut buf);
                    }
                }
            });
        }
    });
    addr
}

fn misbehaving_server(name: &str, answer: Answer, extra: &[&str], problem: &str) {
    let dir = TempDir::new(name);
    let ca = Ca::new("profile CA");
    write_server_cert(&dir, &ca, ServerCert::Good);
    let server = https_server(&dir, answer);
    let url = format!("https://localhost:{}/profiles/a64fx-7.2", server.port());
    let destination = Destination::reading();
    let daemon = fetcher(&destination, &url, &ca.write_ca(&dir), extra);
    assert_fetch_refused(&daemon, &destination, &url, problem);
}

#[test]
fn a_profile_body_that_is_not_a_profile_fails_the_fetch() {
    let dir = TempDir::new("https-tampered-src");
    let mut body = std::fs::read(dest_profile(&dir)).unwrap();
    // Cut in the middle of the register list: what a truncated or altered response looks like.
    body.truncate(body.len() / 2);
    misbehaving_server("https-tampered", Answer::Body(body), &[], "invalid profile");
}

#[test]
fn a_profile_body_over_its_budget_fails_the_fetch() {
    misbehaving_server(
        "https-oversized",
        Answer::Body(vec![b' '; 1 << 20]),
        &["--max-profile", "65536"],
        "body larger than 65536 bytes (--max-profile)",
    );
}

#[test]
fn a_profile_server_that_never_answers_fails_the_fetch_at_its_deadline() {
    misbehaving_server(
        "https-silent",
        Answer::Silence,
        &["--profile-fetch-timeout", "300"],
        "no answer within 300 ms",
    );
}
