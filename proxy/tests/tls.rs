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

/// A source QEMU stand-in: TLS client that trusts the CA, sends `stream`, closes with close_notify.
fn tls_source(dir: &TempDir, proxy: SocketAddr, stream: &[u8]) {
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(dir))
            .with_no_client_auth(),
    );
    let tcp = TcpStream::connect(proxy).unwrap();
    tcp.set_read_timeout(Some(SECS)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls =
        rustls::StreamOwned::new(rustls::ClientConnection::new(config, name).unwrap(), tcp);
    tls.write_all(stream).unwrap();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
}

#[test]
fn tls_on_both_legs_relays_the_stream_and_refuses_plaintext() {
    let pki = TempDir::new("tls");
    make_pki(&pki);
    let (destination, received) = tls_destination(&pki);
    let creds = pki.0.to_string_lossy().into_owned();
    let daemon = Daemon::start(&[
        "--upstream",
        &format!("tcp:{destination}"),
        "--tls-creds",
        &creds,
        "--tls-hostname",
        "localhost",
    ]);
    let stream = vector("q72-a64fx.bin");

    tls_source(&pki, daemon.listen, &stream);
    let (got, client_cert) = wait_until("the destination to finish", SECS, || {
        received
            .lock()
            .unwrap()
            .first()
            .cloned()
            .filter(|(data, _)| !data.is_empty())
    });
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
