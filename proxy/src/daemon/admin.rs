//! The admin HTTP endpoint (`--admin`): `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (it accepts migrations: 503 while draining), and `/profiles/NAME`, the
//! register profiles this host's destination QEMUs hold.
//!
//! Profiles are read from disk at each request, so a host upgraded in place advertises its new
//! register list as soon as its profile file is replaced, without a restart here or any change on
//! the source side (which fetches the profile when each migration starts).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::time::Duration;
use tokio::sync::Semaphore;

use crate::daemon::settings::AdminLimits;
use crate::daemon::shutdown::Shutdown;
use crate::migration::metrics::{Metrics, TurnedAway};
use crate::net::listener::BoundListener;

/// What the admin endpoint serves.
#[derive(Debug)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Advertised profiles: name -> file.
    pub profiles: BTreeMap<String, PathBuf>,
    pub limits: AdminLimits,
}

/// Serve admin requests until shutdown closes everything (health must answer while draining).
///
/// The admin address is often reachable from the whole fleet, so what one client can hold is
/// bounded: at most `max_connections` open at once (further ones are closed at accept), request
/// headers within `header_timeout` (hyper's timer is set: without one it drops that timeout), and
/// a whole connection (TLS handshake, keep-alive included) within `CONNECTION_LIFETIME`.
pub async fn run(listener: BoundListener, state: Arc<AdminState>) {
    let close = state.shutdown.close_all.clone();
    let places = Arc::new(Semaphore::new(state.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = close.cancelled() => return,
        };
        let (conn, _) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "admin accept failed");
                // EMFILE and friends: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            state.metrics.turned_away(TurnedAway::AdminConnections);
            tracing::debug!("admin connection closed: --max-admin-connections reached");
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _place = place;
            let limits = state.limits.clone();
            let served = async {
                match &limits.tls {
                    Some(config) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
                        let session =
                            tokio::time::timeout(limits.header_timeout, acceptor.accept(conn))
                                .await
                                .map_err(|_| "tls handshake timed out".to_owned())?
                                .map_err(|e| e.to_string())?;
                        serve_http(session, state, &limits).await
                    }
                    None => serve_http(conn, state, &limits).await,
                }
            };
            match tokio::time::timeout(CONNECTION_LIFETIME, served).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(%err, "admin connection ended with an error"),
                Err(_) => tracing::debug!("admin connection closed at its lifetime limit"),
            }
        });
    }
}

/// The longest an admin connection may stay open, whatever it does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

async fn serve_http<T>(io: T, state: Arc<AdminState>, limits: &AdminLimits) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(route(&state, &req)) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .await
        .map_err(|e| e.to_string())
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    let path = req.uri().path();
    match path {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, state.metrics.render());
            if let Ok(value) = "text/plain; version=0.0.4".parse() {
                resp.headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, value);
            }
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if state.shutdown.is_draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        }
        "/readyz" => text(StatusCode::OK, "ready\n".into()),
        _ => match path.strip_prefix("/profiles/") {
            Some(name) => profile(state, name),
            None => text(StatusCode::NOT_FOUND, "not found\n".into()),
        },
    }
}

fn profile(state: &AdminState, name: &str) -> Response<Full<Bytes>> {
    let Some(path) = state.profiles.get(name) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no profile named {name:?}\n"),
        );
    };
    // Validate before advertising: a source must never rewrite towards a broken profile.
    let loaded = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|json| {
            migproxy_config::Profile::from_json(&json)
                .map(|_| json)
                .map_err(|e| e.to_string())
        });
    match loaded {
        Ok(json) => {
            let mut resp = Response::new(Full::new(Bytes::from(json)));
            if let Ok(value) = "application/json".parse() {
                resp.headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, value);
            }
            resp
        }
        Err(err) => {
            tracing::error!(profile = name, path = %path.display(), %err, "advertised profile is unreadable");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("profile {name:?} is unreadable: {err}\n"),
            )
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
