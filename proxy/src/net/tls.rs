//! TLS on both legs: migproxy terminates the source's TLS as a server and opens its own
//! TLS to the destination as a client, so it can read the main channel.
//!
//! Credentials come from a directory laid out as QEMU's `tls-creds-x509` expects (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`): the server pair is
//! what the source sees (it must chain to the source's CA and carry the name the source checks,
//! its `tls-hostname` or the host of its migration URI), the client pair is what the destination
//! sees (QEMU destinations verify peers by default), and `ca-cert.pem` verifies the destination
//! (and, with `verify_peer`, the source, as QEMU's `verify-peer` does).
//!
//! Order (DESIGN.md, "Connections"): the source's handshake completes first, within the
//! identification deadline, and with `verify_peer` (the default) only for a source whose client
//! certificate chains to `ca-cert.pem`; the channel then identifies itself by its first plaintext
//! bytes like a plain one, and only then is the destination dialed and handshaken. Destinations
//! take the first completed handshake as the main channel; the migration's dial sequencing keeps
//! that order (the main channel's upstream handshake completes before any other channel's).
//!
//! Two more TLS uses share the credential loading here: the admin address may serve HTTPS
//! (`admin_server`), and `https://` profile URLs are fetched trusting one pinned CA only
//! (`pinned_client`), never the system's roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::TlsConnector;

use crate::error::ProxyError;
use crate::net::addr::Address;
use crate::net::conn::Conn;

/// A listener's TLS settings, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// QEMU-style credential directory.
    pub dir: PathBuf,
    /// Require and verify the source's client certificate (the default).
    pub verify_peer: bool,
    /// Name expected in the destination's certificate (default: the upstream host).
    pub hostname: Option<String>,
}

/// Loaded TLS state of one listener.
pub struct ListenerTls {
    pub server: Arc<ServerConfig>,
    pub connector: TlsConnector,
    pub hostname: Option<String>,
    /// The source must present a certificate signed by ca-cert.pem.
    pub verify_peer: bool,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

fn invalid(path: &Path, what: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ProxyError {
    ProxyError::tls_credentials(path, what)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ProxyError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, e))?;
    if certs.is_empty() {
        return Err(invalid(path, "no certificate"));
    }
    Ok(certs)
}

/// PKCS#8, PKCS#1 (`certtool`'s and openssl's RSA keys) or SEC1.
fn key(path: &Path) -> Result<PrivateKeyDer<'static>, ProxyError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| invalid(path, e))
}

impl ListenerTls {
    pub fn load(settings: &TlsSettings) -> Result<ListenerTls, ProxyError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let dir = &settings.dir;
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for cert in certs(&ca_path)? {
            roots.add(cert).map_err(|e| invalid(&ca_path, e))?;
        }
        let roots = Arc::new(roots);

        let server_builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(dir, e))?;
        let server_builder = if settings.verify_peer {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::clone(&roots),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| invalid(&ca_path, e))?;
            server_builder.with_client_cert_verifier(verifier)
        } else {
            server_builder.with_no_client_auth()
        };
        let server_cert = dir.join("server-cert.pem");
        let mut server = server_builder
            .with_single_cert(certs(&server_cert)?, key(&dir.join("server-key.pem"))?)
            .map_err(|e| invalid(&server_cert, e))?;
        // No TLS 1.3 session tickets: a source without a return path never reads its socket, and
        // closing it with unread tickets makes its kernel send a reset, which discards the tail of
        // the stream still unread on our side (seen with 7.2 sources and multifd).
        server.send_tls13_tickets = 0;

        let client_builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(dir, e))?
            .with_root_certificates(roots);
        let client_cert = dir.join("client-cert.pem");
        let client = if client_cert.exists() {
            client_builder
                .with_client_auth_cert(certs(&client_cert)?, key(&dir.join("client-key.pem"))?)
                .map_err(|e| invalid(&client_cert, e))?
        } else {
            client_builder.with_no_client_auth()
        };
        Ok(ListenerTls {
            server: Arc::new(server),
            connector: TlsConnector::from(Arc::new(client)),
            hostname: settings.hostname.clone(),
            verify_peer: settings.verify_peer,
        })
    }

    /// Open our TLS session to the destination over `conn`, checking its certificate against
    /// `--tls-hostname` or, by default, the upstream host.
    pub async fn connect(&self, conn: Conn, upstream: &Address) -> Result<Conn, ProxyError> {
        let host = match upstream {
            Address::Tcp { host, .. } => host.as_str(),
            Address::Unix(_) => "localhost",
        };
        let session = self
            .connector
            .connect(self.server_name(host)?, conn)
            .await
            .map_err(|e| ProxyError::io(format!("tls handshake with {upstream}"), e))?;
        Ok(Conn::Tls(Box::new(session)))
    }

    /// The name checked in the destination's certificate.
    pub fn server_name(&self, upstream_host: &str) -> Result<ServerName<'static>, ProxyError> {
        let name = self.hostname.as_deref().unwrap_or(upstream_host).to_owned();
        ServerName::try_from(name.clone()).map_err(|_| ProxyError::TlsServerName(name))
    }
}

/// A client that trusts only the CA certificates in `ca` (PEM), for `https://` profile URLs: a
/// profile decides which registers are dropped or filled and with what values, so it must come
/// from a server this CA signed, not from whoever is on the path.
pub fn pinned_client(ca: &Path) -> Result<TlsConnector, ProxyError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).map_err(|e| invalid(ca, e))?;
    }
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(ca, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The admin address's TLS server: `server-cert.pem` and `server-key.pem` in `dir`.
pub fn admin_server(dir: &Path) -> Result<Arc<ServerConfig>, ProxyError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = dir.join("server-cert.pem");
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(dir, e))?
        .with_no_client_auth()
        .with_single_cert(certs(&cert)?, key(&dir.join("server-key.pem"))?)
        .map_err(|e| invalid(&cert, e))?;
    Ok(Arc::new(config))
}
