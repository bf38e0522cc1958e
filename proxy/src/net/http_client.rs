//! A minimal `http://` GET (hyper's HTTP/1 client over one TCP connection), for `healthcheck` and
//! for fetching a destination's advertised profile. No TLS, no redirects: both talk to a migproxy
//! admin address.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::{HttpFailure, ProxyError};

/// Profiles are a few tens of KB; anything much larger is not one.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// The parts of an `http://HOST[:PORT]/PATH` URL.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub authority: String,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, HttpFailure> {
        let rest = url.strip_prefix("http://").ok_or(HttpFailure::NotHttp)?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(HttpFailure::MissingHost);
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(HttpUrl {
            authority,
            path: path.to_owned(),
        })
    }
}

/// GET `url`; returns the status code and the body.
pub async fn get(url: &str, timeout: Duration) -> Result<(u16, Bytes), ProxyError> {
    let err = |failure: HttpFailure| ProxyError::Http {
        url: url.to_owned(),
        failure,
    };
    let parsed = HttpUrl::parse(url).map_err(err)?;
    let exchange = async {
        let stream = TcpStream::connect(&parsed.authority)
            .await
            .map_err(|e| err(HttpFailure::Connect(e)))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(HttpFailure::Handshake(e)))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get(parsed.path.as_str())
            .header(hyper::header::HOST, parsed.authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| err(HttpFailure::BuildRequest(e)))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| err(HttpFailure::Request(e)))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| err(HttpFailure::Body(e)))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| err(HttpFailure::Timeout(timeout)))?
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
                path: "/healthz".into()
            })
        );
        assert_eq!(
            HttpUrl::parse("http://dest/profiles/a").ok(),
            Some(HttpUrl {
                authority: "dest:80".into(),
                path: "/profiles/a".into()
            })
        );
        assert_eq!(
            HttpUrl::parse("http://[::1]:9/x").ok().map(|u| u.authority),
            Some("[::1]:9".into())
        );
        assert!(HttpUrl::parse("https://x/").is_err());
    }
}
