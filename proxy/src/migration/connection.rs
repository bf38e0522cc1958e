//! Everything that happens to one accepted connection: identification, joining a migration,
//! dialing the destination and carrying the channel until it ends or the migration fails.
//!
//! ```text
//! accepted ─┬─ plain: first 4 bytes ─▶ join or start a migration ─▶ dial ──────────────┐
//!           └─ tls: ClientHello ─▶ join by order ─▶ dial + both handshakes ─▶ first   │
//!                                                   4 plaintext bytes confirm the kind │
//!        (ChannelKind, PrefixedIo) + destination ◀────────────────────────────────────┘
//!          └─▶ carry: main channel through the pump, any other channel as a raw relay
//! ```
//!
//! A connection that does not identify itself within the deadline never reaches the destination
//! (the destination QEMU has exactly one incoming migration, and a port probe reaching it would
//! make that migration fail). Both paths end in the same tail, `supervise`: the first failure of
//! any channel closes every connection of the migration.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::ProxyError;
use crate::migration::identify::{self, ChannelKind, FirstBytes};
use crate::migration::metrics::Metrics;
use crate::migration::profile_source::{RewriteConfig, RewriteSetup};
use crate::migration::pump::{self, ChannelSettings};
use crate::migration::registry::{GroupKey, Migration, Registry};
use crate::net::addr::{AcceptedInfo, Upstream};
use crate::net::conn::Conn;
use crate::net::prefixed::PrefixedIo;
use crate::net::relay;
use crate::net::tls::ListenerTls;

/// Everything a listener's connections need.
pub struct ListenerCtx {
    /// The listen address as configured, for logs.
    pub listen: String,
    pub upstream: Upstream,
    pub rewrite: RewriteConfig,
    pub channel: ChannelSettings,
    /// How long a new connection may take to send its first 4 bytes.
    pub identify_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the daemon closes every remaining connection (parent of every
    /// migration's token).
    pub close_all: CancellationToken,
    pub registry: Registry,
    /// TLS on both legs; None: plain.
    pub tls: Option<Arc<ListenerTls>>,
}

impl ListenerCtx {
    fn stray(&self) {
        self.metrics
            .connections_stray
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything that happens to one accepted connection.
pub async fn handle_connection(conn: Conn, info: AcceptedInfo, ctx: Arc<ListenerCtx>) {
    conn.tune();
    let peer = info
        .peer
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unix".to_owned());
    let upstream = match ctx.upstream.resolve(&info) {
        Ok(upstream) => upstream,
        Err(err) => {
            ctx.stray();
            tracing::warn!(%peer, listen = %ctx.listen, %err, "no upstream for this connection: closed");
            return;
        }
    };
    let key = GroupKey {
        source: info.peer.map(|p| p.ip()),
        upstream,
    };
    match &ctx.tls {
        Some(tls) => accept_tls(conn, key, peer, &ctx, tls).await,
        None => accept_plain(conn, key, peer, &ctx).await,
    }
}

/// A plain connection identifies itself by its first 4 bytes (see `identify.rs`).
async fn accept_plain(conn: Conn, key: GroupKey, peer: String, ctx: &ListenerCtx) {
    let (first, source) = tokio::select! {
        identified = identify::read_first_bytes(conn, ctx.identify_timeout) => identified,
        () = ctx.close_all.cancelled() => return,
    };
    let joined = match first {
        FirstBytes::Identified(ChannelKind::Main) => {
            let migration = ctx.registry.start(key, &ctx.metrics, &ctx.close_all);
            Some((migration, ChannelKind::Main))
        }
        FirstBytes::Identified(kind) => ctx
            .registry
            .wait_for(&key, ctx.identify_timeout, Migration::accepts_channels)
            .await
            .map(|m| (m, kind)),
        FirstBytes::Unknown => ctx
            .registry
            .wait_for(&key, ctx.identify_timeout, |m| {
                m.accepts_channels() && m.state.postcopy_advised()
            })
            .await
            .map(|m| (m, ChannelKind::Preempt)),
        // The 7.2 preempt channel is silent until postcopy ends: see `identify.rs`.
        FirstBytes::Silent => ctx
            .registry
            .find(&key, |m| m.accepts_channels() && m.state.postcopy_advised())
            .map(|m| (m, ChannelKind::Preempt)),
        FirstBytes::Closed => None,
    };
    let Some((migration, kind)) = joined else {
        ctx.stray();
        let why = match first {
            FirstBytes::Identified(..) => "multifd channel without a migration from its host",
            FirstBytes::Unknown => {
                "unrecognised first bytes and no postcopy migration from its host"
            }
            FirstBytes::Silent => "sent nothing within the identification deadline",
            FirstBytes::Closed => "closed before identifying itself",
        };
        tracing::info!(%peer, listen = %ctx.listen, reason = why, "stray connection closed, destination not contacted");
        return;
    };
    migration.add_channel(kind);
    let span = tracing::info_span!(parent: &migration.span, "conn", kind = kind.as_str(), %peer);
    let work = async {
        tracing::info!(upstream = %migration.key.upstream, "channel identified");
        let rewrite = resolve_rewrite(kind, ctx).await?;
        let destination = migration
            .dial
            .dial(kind, &migration.key.upstream, None)
            .await?;
        carry(&migration, kind, source, destination, rewrite.as_ref(), ctx).await?;
        Ok(kind)
    };
    supervise(&migration, work).instrument(span).await;
}

/// A connection on a TLS listener: identified by its ClientHello, grouped by order (the first one
/// from a host is the main channel), dialed and handshaken upstream before our own handshake
/// completes, then confirmed by its first plaintext bytes (order and `verify_peer`: see
/// `net/tls.rs`).
async fn accept_tls(conn: Conn, key: GroupKey, peer: String, ctx: &ListenerCtx, tls: &ListenerTls) {
    let lazy = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), conn);
    let hello = tokio::select! {
        hello = tokio::time::timeout(ctx.identify_timeout, lazy) => hello,
        () = ctx.close_all.cancelled() => return,
    };
    let start = match hello {
        Ok(Ok(start)) => start,
        Ok(Err(err)) => {
            ctx.stray();
            tracing::warn!(%peer, listen = %ctx.listen, %err, "no tls client hello (plaintext on a tls listener?): closed, destination not contacted");
            return;
        }
        Err(_) => {
            ctx.stray();
            tracing::info!(%peer, listen = %ctx.listen, reason = "no tls client hello within the identification deadline", "stray connection closed, destination not contacted");
            return;
        }
    };
    // Under TLS the first bytes are encrypted: channels are told apart by order.
    let (migration, by_order) = match ctx.registry.find(&key, Migration::accepts_channels) {
        Some(migration) => (migration, ChannelKind::Multifd),
        None => (
            ctx.registry.start(key, &ctx.metrics, &ctx.close_all),
            ChannelKind::Main,
        ),
    };
    let span = tracing::info_span!(parent: &migration.span, "conn", tls = true, %peer);
    let work = async {
        let rewrite = resolve_rewrite(by_order, ctx).await?;
        let upstream = &migration.key.upstream;
        let handshake = |start: tokio_rustls::StartHandshake<Conn>| async {
            start
                .into_stream(Arc::clone(&tls.server))
                .await
                .map(|session| Conn::Tls(Box::new(session)))
                .map_err(|e| ProxyError::io("tls handshake with the source", e))
        };
        let (session, destination) = if tls.verify_peer {
            let session = handshake(start).await?;
            (
                session,
                migration.dial.dial(by_order, upstream, Some(tls)).await?,
            )
        } else {
            let destination = migration.dial.dial(by_order, upstream, Some(tls)).await?;
            (handshake(start).await?, destination)
        };
        let (kind, source) =
            identify::confirm_tls_channel(session, by_order, ctx.identify_timeout).await?;
        migration.add_channel(kind);
        tracing::info!(kind = kind.as_str(), upstream = %upstream, "channel identified");
        carry(&migration, kind, source, destination, rewrite.as_ref(), ctx).await?;
        Ok(kind)
    };
    supervise(&migration, work).instrument(span).await;
}

/// The profiles of a migration are fetched when its main channel arrives, before the destination
/// is contacted: a host upgraded in place advertises its new register list, and a fetch failure
/// costs the destination nothing.
async fn resolve_rewrite(
    kind: ChannelKind,
    ctx: &ListenerCtx,
) -> Result<Option<RewriteSetup>, ProxyError> {
    if kind == ChannelKind::Main {
        ctx.rewrite.resolve().await
    } else {
        Ok(None)
    }
}

/// Carry one identified channel to its dialed destination: the main channel through the decoder
/// (and the rewrite, when a profile is configured), every other channel as a raw relay.
async fn carry(
    migration: &Migration,
    kind: ChannelKind,
    source: PrefixedIo<Conn>,
    destination: Conn,
    rewrite: Option<&RewriteSetup>,
    ctx: &ListenerCtx,
) -> Result<(), ProxyError> {
    if kind == ChannelKind::Main {
        if rewrite.is_none() {
            tracing::info!("checking relay: no destination profile, registers are not rewritten");
        }
        return pump::run(
            source.into_split(),
            destination.into_split(),
            rewrite,
            &migration.state,
            &ctx.channel,
        )
        .await;
    }
    relay::relay_channel(
        source.into_split(),
        destination.into_split(),
        &migration.state.to_destination(),
        &migration.state.to_source(),
        kind.as_str(),
    )
    .await
}

/// The tail every channel shares: run `work` until it ends or the migration is closed. A main
/// channel that carried its whole stream completes the migration; any failure closes all of it.
async fn supervise(
    migration: &Migration,
    work: impl Future<Output = Result<ChannelKind, ProxyError>>,
) {
    let result = tokio::select! {
        result = work => result,
        () = migration.cancel.cancelled() => return,
    };
    match result {
        Ok(kind) => {
            if kind == ChannelKind::Main {
                migration.note_main_completed();
            }
            tracing::debug!("channel finished");
        }
        Err(err) => migration.fail(&err),
    }
}
