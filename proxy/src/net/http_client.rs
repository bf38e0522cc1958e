//! A minimal `http://` GET (hyper's HTTP/1 client over one TCP connection), for `healthcheck` and
//! for fetching a destination's advertised profile. No TLS, no redirects: both talk to a migproxy
//! admin address.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::ProxyError;

/// Profiles are a few tens of KB; anything much larger is not one.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// The parts of an `http://HOST[:PORT]/PATH` URL.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub authority: String,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, ProxyError> {
        let bad = |reason: &str| ProxyError::Http {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(bad("missing host"));
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
    let err = |reason: String| ProxyError::Http {
        url: url.to_owned(),
        reason,
    };
    let parsed = HttpUrl::parse(url)?;
    let exchange = async {
        let stream = TcpStream::connect(&parsed.authority)
            .await
            .map_err(|e| err(format!("connect: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(format!("handshake: {e}")))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get(parsed.path.as_str())
            .header(hyper::header::HOST, parsed.authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| err(format!("request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| err(format!("request: {e}")))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| err(format!("body: {e}")))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| err(format!("no answer within {} ms", timeout.as_millis())))?
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
