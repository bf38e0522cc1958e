//! TLS listeners with raw sockets: certificates made at test time in QEMU's credential
//! layout, a rustls source and a rustls destination that requires a client certificate.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const SECS: Duration = Duration::from_secs(20);

/// `ca-cert.pem`, `server-*.pem`, `client-*.pem` in `dir`, all for `localhost` / 127.0.0.1.
fn make_pki(dir: &TempDir) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.file("ca-cert.pem"), ca.pem()).unwrap();
    for (role, purpose) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        // QEMU 10.0 rejects certificates without the key-encipherment usage.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.file(&format!("{role}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.file(&format!("{role}-key.pem")), key.serialize_pem()).unwrap();
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(dir: &TempDir) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.file("ca-cert.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

fn certs(path: String) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

/// What one TLS destination connection received, and whether the proxy showed a client certificate.
type Received = Arc<Mutex<Vec<(Vec<u8>, bool)>>>;

/// A destination QEMU stand-in: TLS server that requires a client certificate from the CA.
fn tls_destination(dir: &TempDir) -> (SocketAddr, Received) {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certs(dir.file("server-cert.pem")),
                PrivateKeyDer::from_pem_file(dir.file("server-key.pem")).unwrap(),
            )
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let record = Arc::clone(&received);
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { break };
            // Counted at accept, so a connection that should never have come shows at once.
            record.lock().unwrap().push((Vec::new(), false));
            let index = record.lock().unwrap().len() - 1;
            let mut tls = rustls::StreamOwned::new(
                rustls::ServerConnection::new(Arc::clone(&config)).unwrap(),
                tcp,
            );
            let mut data = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => data.extend_from_slice(&buf[..n]),
                }
            }
            let client_cert = tls.conn.peer_certificates().is_some();
            record.lock().unwrap()[index] = (data, client_cert);
        }
    });
    (addr, received)
}

/// A TLS client that trusts the CA and, with `client_cert`, shows `client-cert.pem` (as a QEMU
/// source with that file in its credential directory does).
fn source_config(dir: &TempDir, client_cert: bool) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(dir));
    Arc::new(if client_cert {
        builder
            .with_client_auth_cert(
                certs(dir.file("client-cert.pem")),
                PrivateKeyDer::from_pem_file(dir.file("client-key.pem")).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    })
}

/// What the destination received on its first connection, and whether the proxy showed it a
/// client certificate, once something arrived.
fn first_forwarded(received: &Received) -> (Vec<u8>, bool) {
    wait_until("the destination to finish", SECS, || {
        received
            .lock()
            .unwrap()
            .first()
            .cloned()
            .filter(|(data, _)| !data.is_empty())
    })
}

fn assert_never_dialed(received: &Received) {
    assert_eq!(
        received.lock().unwrap().len(),
        0,
        "the destination was dialed"
    );
}

/// A TLS session to the proxy as a source opens it: trusting the CA, naming `localhost`, with
/// its client certificate when `client_cert`; the handshake runs with the first write.
fn source_session(
    dir: &TempDir,
    proxy: SocketAddr,
    client_cert: bool,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let tcp = connect(proxy);
    let name = ServerName::try_from("localhost").unwrap();
    rustls::StreamOwned::new(
        rustls::ClientConnection::new(source_config(dir, client_cert), name).unwrap(),
        tcp,
    )
}

/// A source QEMU stand-in: TLS client that trusts the CA, shows its client certificate, sends
/// `stream`, closes with close_notify.
fn tls_source(dir: &TempDir, proxy: SocketAddr, stream: &[u8]) {
    let mut tls = source_session(dir, proxy, true);
    tls.write_all(stream).unwrap();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
}

/// A TLS destination, and a daemon with a fresh PKI in front of it (`--tls-creds`, plus
/// `extra` flags).
struct TlsRig {
    pki: TempDir,
    daemon: Daemon,
    received: Received,
}

impl TlsRig {
    fn start(name: &str, extra: &[&str]) -> TlsRig {
        let pki = TempDir::new(name);
        make_pki(&pki);
        let (destination, received) = tls_destination(&pki);
        let creds = pki.0.to_string_lossy().into_owned();
        let upstream = format!("tcp:{destination}");
        let mut args = vec!["--upstream", &upstream, "--tls-creds", &creds];
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&args);
        TlsRig {
            pki,
            daemon,
            received,
        }
    }
}

#[test]
fn tls_on_both_legs_relays_the_stream_and_refuses_plaintext() {
    let TlsRig {
        pki,
        daemon,
        received,
    } = TlsRig::start("tls", &["--tls-hostname", "localhost"]);
    let stream = vector("q72-a64fx.bin");

    tls_source(&pki, daemon.listen, &stream);
    let (got, client_cert) = first_forwarded(&received);
    assert!(got == stream, "forwarded plaintext differs");
    assert!(
        client_cert,
        "no client certificate shown to the destination"
    );
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");

    // A plaintext source on the TLS listener is closed without reaching the destination.
    let mut plain = connect(daemon.listen);
    let _ = plain.write_all(&stream[..4096]);
    read_until_closed(&mut plain);
    daemon.wait_log(
        "no tls client hello (plaintext on a tls listener?): closed, destination not contacted",
        SECS,
    );
    assert_eq!(received.lock().unwrap().len(), 1);
}

/// Finding 2: without `--tls-verify-peer`, any ClientHello used to make migproxy dial the
/// destination and authenticate there with its own client certificate. Verifying the source is
/// now the default: a source without a certificate fails its handshake and the destination is
/// never contacted.
#[test]
fn a_source_without_a_certificate_never_reaches_the_destination_by_default() {
    let TlsRig {
        pki,
        daemon,
        received,
    } = TlsRig::start("tls-nocert", &[]);
    let mut tls = source_session(&pki, daemon.listen, false);
    // TLS 1.3: the client's handshake "completes" before the server has judged it; the refusal
    // shows as the connection closing, and nothing reaching the destination.
    let _ = tls.write_all(b"QEVM\x00\x00\x00\x03");
    let _ = tls.flush();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    daemon.wait_log("tls handshake with the source failed (no or untrusted client certificate?): closed, destination not contacted", SECS);
    assert_eq!(daemon.turned_away("tls_handshake"), Some(1));
    assert_never_dialed(&received);
}

/// Finding 2, opted out: with `--tls-no-verify-peer` a completed handshake alone is still not
/// enough; the destination is dialed only for a channel that sent `QEVM` (or a multifd magic).
#[test]
fn without_verification_a_handshake_that_sends_no_qevm_never_reaches_the_destination() {
    let TlsRig {
        pki,
        daemon,
        received,
    } = TlsRig::start(
        "tls-noqevm",
        &["--tls-no-verify-peer", "--identify-timeout", "300"],
    );
    for probe in [&b""[..], b"GET / HTTP/1.0\r\n\r\n"] {
        let mut tls = source_session(&pki, daemon.listen, false);
        tls.write_all(probe).unwrap();
        tls.flush().unwrap();
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest);
    }
    assert_eq!(
        daemon.metric("migproxy_connections_total{kind=\"stray\"}"),
        Some(2)
    );
    assert_never_dialed(&received);
}

/// Finding 3: the source's handshake had no deadline after its ClientHello; a stalled handshake
/// was held indefinitely. Now it is closed at the identification deadline, and a real source
/// from the same address migrates afterwards.
#[test]
fn a_stalled_tls_handshake_is_closed_at_the_deadline_and_the_real_source_still_migrates() {
    let TlsRig {
        pki,
        daemon,
        received,
    } = TlsRig::start(
        "tls-stall",
        &["--tls-hostname", "localhost", "--identify-timeout", "300"],
    );
    // A real ClientHello, then nothing: the handshake never completes.
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(source_config(&pki, true), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let mut stalled = connect(daemon.listen);
    stalled.write_all(&hello).unwrap();
    read_until_closed(&mut stalled);
    assert_eq!(daemon.turned_away("tls_handshake"), Some(1));
    assert_never_dialed(&received);

    let stream = vector("q72-a64fx.bin");
    tls_source(&pki, daemon.listen, &stream);
    let (got, _) = first_forwarded(&received);
    assert!(got == stream, "forwarded plaintext differs");
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "completed", "{summary}");
}

/// A destination that accepts the TCP connection and never answers the TLS handshake: the dial
/// deadline (`--dial-timeout`) ends the migration, the source's connection is closed, and the
/// daemon does not wait for the kernel to give up.
#[test]
fn a_destination_that_never_completes_the_tls_handshake_fails_at_the_dial_deadline() {
    let pki = TempDir::new("tls-silent-dest");
    make_pki(&pki);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("tcp:{}", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        // Accept and hold (never read, never write) until the proxy gives up and closes.
        let (mut conn, _) = silent.accept().unwrap();
        let mut sink = Vec::new();
        let _ = conn.read_to_end(&mut sink);
    });
    let creds = pki.0.to_string_lossy().into_owned();
    let daemon = Daemon::start(&[
        "--upstream",
        &upstream,
        "--tls-creds",
        &creds,
        "--tls-hostname",
        "localhost",
        "--dial-timeout",
        "300",
    ]);
    let mut tls = source_session(&pki, daemon.listen, true);
    let stream = vector("q72-a64fx.bin");
    let _ = tls.write_all(&stream[..4096]);
    let _ = tls.flush();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    let summary = daemon.wait_log("migration summary", SECS);
    assert_eq!(summary["fields"]["outcome"], "failed", "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "connecting to {upstream}: not connected within 300 ms (--dial-timeout)"
        )),
        "{reason}"
    );
    assert_eq!(
        daemon.metric("migproxy_migrations_total{outcome=\"failed\"}"),
        Some(1)
    );
    held.join().unwrap();
}
