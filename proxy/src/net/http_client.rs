//! A minimal `http://` / `https://` GET (hyper's HTTP/1 client over one TCP connection), for
//! `healthcheck` and for fetching a destination's advertised profile. No redirects: both talk to a
//! migproxy admin address. `https://` needs a connector with a pinned CA (`net/tls.rs`): the
//! system's roots are never consulted.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{HttpFailure, ProxyError};

/// Profiles are a few tens of KB; anything much larger is not one (`--max-profile`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;

/// What one GET may take: a deadline for the whole exchange (connect, TLS handshake, request,
/// body) and a size budget for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchBudget {
    pub timeout: Duration,
    pub max_body: usize,
}

/// `--profile-fetch-timeout`'s default, in milliseconds.
pub const DEFAULT_FETCH_TIMEOUT_MS: u64 = 5000;

impl Default for FetchBudget {
    fn default() -> FetchBudget {
        FetchBudget {
            timeout: Duration::from_millis(DEFAULT_FETCH_TIMEOUT_MS),
            max_body: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// The parts of an `http://HOST[:PORT]/PATH` URL.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub authority: String,
    pub path: String,
    /// `https://`: the host name checked in the server's certificate.
    pub tls_host: Option<String>,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, HttpFailure> {
        let (rest, secure) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (rest, false),
            (None, Some(rest)) => (rest, true),
            (None, None) => return Err(HttpFailure::NotHttp),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(HttpFailure::MissingHost);
        }
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'));
        let host = if has_port {
            authority
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(authority)
        } else {
            authority
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let authority = if has_port {
            authority.to_owned()
        } else if secure {
            format!("{authority}:443")
        } else {
            format!("{authority}:80")
        };
        Ok(HttpUrl {
            authority,
            path: path.to_owned(),
            tls_host: secure.then_some(host),
        })
    }
}

/// GET `url`; returns the status code and the body. `tls` is required for `https://` URLs.
pub async fn get(
    url: &str,
    budget: FetchBudget,
    tls: Option<&TlsConnector>,
) -> Result<(u16, Bytes), ProxyError> {
    let FetchBudget { timeout, max_body } = budget;
    let err = |failure: HttpFailure| ProxyError::Http {
        url: url.to_owned(),
        failure,
    };
    let parsed = HttpUrl::parse(url).map_err(err)?;
    let exchange = async {
        let stream = TcpStream::connect(&parsed.authority)
            .await
            .map_err(|e| err(HttpFailure::Connect(e)))?;
        match &parsed.tls_host {
            None => exchange(stream, &parsed, max_body).await.map_err(err),
            Some(host) => {
                let connector = tls.ok_or_else(|| err(HttpFailure::HttpsWithoutCa))?;
                let name = ServerName::try_from(host.clone())
                    .map_err(|_| err(HttpFailure::ServerName(host.clone())))?;
                let session = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| err(HttpFailure::Tls(e)))?;
                exchange(session, &parsed, max_body).await.map_err(err)
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| err(HttpFailure::Timeout(timeout)))?
}

async fn exchange<T>(io: T, url: &HttpUrl, max_body: usize) -> Result<(u16, Bytes), HttpFailure>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(HttpFailure::Handshake)?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(url.path.as_str())
        .header(hyper::header::HOST, url.authority.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(HttpFailure::BuildRequest)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(HttpFailure::Request)?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                HttpFailure::BodyTooLarge(max_body)
            } else {
                HttpFailure::Body(e)
            }
        })?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            HttpUrl::parse("http://127.0.0.1:9444/healthz").ok(),
            Some(HttpUrl {
                authority: "127.0.0.1:9444".into(),
                path: "/healthz".into(),
                tls_host: None,
            })
        );
        assert_eq!(
            HttpUrl::parse("http://dest/profiles/a").ok(),
            Some(HttpUrl {
                authority: "dest:80".into(),
                path: "/profiles/a".into(),
                tls_host: None,
            })
        );
        assert_eq!(
            HttpUrl::parse("http://[::1]:9/x").ok().map(|u| u.authority),
            Some("[::1]:9".into())
        );
        assert_eq!(
            HttpUrl::parse("https://dest.example/profiles/a").ok(),
            Some(HttpUrl {
                authority: "dest.example:443".into(),
                path: "/profiles/a".into(),
                tls_host: Some("dest.example".into()),
            })
        );
        assert_eq!(
            HttpUrl::parse("https://[::1]:9444/x")
                .ok()
                .and_then(|u| u.tls_host),
            Some("::1".into())
        );
        assert!(HttpUrl::parse("ftp://x/").is_err());
    }
}
