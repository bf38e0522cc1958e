//! Everything that happens to one accepted connection: identification, joining a migration,
//! dialing the destination and carrying the channel until it ends or the migration fails.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::ProxyError;
use crate::migration::identify::{read_first_bytes, ChannelKind, FirstBytes};
use crate::migration::metrics::Metrics;
use crate::migration::profile_source::{RewriteConfig, RewriteSetup};
use crate::migration::pump::{self, ChannelSettings};
use crate::migration::registry::{GroupKey, Migration, Registry};
use crate::net::addr::{AcceptedInfo, Upstream};
use crate::net::conn::{Conn, ConnRead, ConnWrite};
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
    /// TLS on both legs (issue 8); None: plain.
    pub tls: Option<Arc<ListenerTls>>,
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
            ctx.metrics
                .connections_stray
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, listen = %ctx.listen, %err, "no upstream for this connection: closed");
            return;
        }
    };
    let key = GroupKey {
        source: info.peer.map(|p| p.ip()),
        upstream,
    };
    if let Some(tls) = &ctx.tls {
        let tls = Arc::clone(tls);
        return handle_tls_connection(conn, key, peer, ctx, tls).await;
    }
    let (mut read, write) = conn.into_split();
    let first = tokio::select! {
        first = read_first_bytes(&mut read, ctx.identify_timeout) => first,
        () = ctx.close_all.cancelled() => return,
    };
    let joined = match &first {
        FirstBytes::Identified(ChannelKind::Main, _) => {
            let migration = ctx.registry.start(key, &ctx.metrics, &ctx.close_all);
            Some((migration, ChannelKind::Main))
        }
        FirstBytes::Identified(kind, _) => ctx
            .registry
            .wait_for(&key, ctx.identify_timeout, Migration::accepts_channels)
            .await
            .map(|m| (m, *kind)),
        FirstBytes::Unknown(_) => ctx
            .registry
            .wait_for(&key, ctx.identify_timeout, |m| {
                m.accepts_channels() && m.postcopy_advised.load(Ordering::Acquire)
            })
            .await
            .map(|m| (m, ChannelKind::Preempt)),
        // The 7.2 preempt channel is silent until postcopy ends: see module docs.
        FirstBytes::Silent(_) => ctx
            .registry
            .find(&key, |m| {
                m.accepts_channels() && m.postcopy_advised.load(Ordering::Acquire)
            })
            .map(|m| (m, ChannelKind::Preempt)),
        FirstBytes::Closed(_) => None,
    };
    let Some((migration, kind)) = joined else {
        ctx.metrics
            .connections_stray
            .fetch_add(1, Ordering::Relaxed);
        let why = match &first {
            FirstBytes::Identified(..) => "multifd channel without a migration from its host",
            FirstBytes::Unknown(_) => {
                "unrecognised first bytes and no postcopy migration from its host"
            }
            FirstBytes::Silent(_) => "sent nothing within the identification deadline",
            FirstBytes::Closed(_) => "closed before identifying itself",
        };
        tracing::info!(%peer, listen = %ctx.listen, reason = why, "stray connection closed, destination not contacted");
        return;
    };
    migration.add_channel(kind);
    let span = tracing::info_span!(parent: &migration.span, "conn", kind = kind.as_str(), %peer);
    let prefix = first.prefix().to_vec();
    let work = run_channel(
        Arc::clone(&migration),
        kind,
        read,
        write,
        prefix,
        Arc::clone(&ctx),
    );
    async move {
        tracing::info!(upstream = %migration.key.upstream, "channel identified");
        let result = tokio::select! {
            result = work => result,
            () = migration.cancel.cancelled() => Ok(()),
        };
        match result {
            Ok(()) => {
                if kind == ChannelKind::Main {
                    migration.main_completed.store(true, Ordering::Release);
                }
                tracing::debug!("channel finished");
            }
            Err(err) => migration.fail(&err),
        }
    }
    .instrument(span)
    .await;
}

async fn run_channel(
    migration: Arc<Migration>,
    kind: ChannelKind,
    read: ConnRead,
    write: ConnWrite,
    prefix: Vec<u8>,
    ctx: Arc<ListenerCtx>,
) -> Result<(), ProxyError> {
    // Fetched when the migration starts, before the destination is contacted: a host upgraded in
    // place advertises its new register list, and a fetch failure costs the destination nothing.
    let rewrite = if kind == ChannelKind::Main {
        ctx.rewrite.resolve().await?
    } else {
        None
    };
    let destination = migration.dial_upstream(kind, None).await?;
    carry_channel(
        &migration,
        kind,
        (read, write),
        &prefix,
        destination,
        rewrite.as_ref(),
        &ctx,
    )
    .await
}

/// Carry one identified channel to its dialed destination: the main channel through the decoder
/// (and the rewrite, when a profile is configured), every other channel as a raw relay.
async fn carry_channel(
    migration: &Migration,
    kind: ChannelKind,
    (read, write): (ConnRead, ConnWrite),
    prefix: &[u8],
    destination: Conn,
    rewrite: Option<&RewriteSetup>,
    ctx: &ListenerCtx,
) -> Result<(), ProxyError> {
    if kind == ChannelKind::Main {
        if rewrite.is_none() {
            tracing::info!("checking relay: no destination profile, registers are not rewritten");
        }
        return pump::run(
            read,
            prefix,
            write,
            destination,
            rewrite,
            migration,
            &ctx.channel,
        )
        .await;
    }
    let (to_destination, to_source) = migration.counters();
    relay::relay_channel(
        (read, write),
        destination.into_split(),
        prefix,
        &to_destination,
        &to_source,
        kind.as_str(),
    )
    .await
}

/// A connection on a TLS listener (issue 8): identified by its ClientHello, grouped by order (the
/// first one from a host is the main channel), dialed and handshaken upstream before our own
/// handshake completes, then confirmed by its first plaintext bytes.
async fn handle_tls_connection(
    conn: Conn,
    key: GroupKey,
    peer: String,
    ctx: Arc<ListenerCtx>,
    tls: Arc<ListenerTls>,
) {
    let lazy = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), conn);
    let hello = tokio::select! {
        hello = tokio::time::timeout(ctx.identify_timeout, lazy) => hello,
        () = ctx.close_all.cancelled() => return,
    };
    let start = match hello {
        Ok(Ok(start)) => start,
        Ok(Err(err)) => {
            ctx.metrics
                .connections_stray
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, listen = %ctx.listen, %err, "no tls client hello (plaintext on a tls listener?): closed, destination not contacted");
            return;
        }
        Err(_) => {
            ctx.metrics
                .connections_stray
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, listen = %ctx.listen, reason = "no tls client hello within the identification deadline", "stray connection closed, destination not contacted");
            return;
        }
    };
    // design-decisions §3: under TLS, channels are told apart by order.
    let (migration, by_order) = match ctx.registry.find(&key, Migration::accepts_channels) {
        Some(migration) => (migration, ChannelKind::Multifd),
        None => (
            ctx.registry.start(key, &ctx.metrics, &ctx.close_all),
            ChannelKind::Main,
        ),
    };
    let span = tracing::info_span!(parent: &migration.span, "conn", tls = true, %peer);
    let work = async {
        let rewrite = if by_order == ChannelKind::Main {
            ctx.rewrite.resolve().await?
        } else {
            None
        };
        let handshake = |start: tokio_rustls::StartHandshake<Conn>| async {
            start
                .into_stream(Arc::clone(&tls.server))
                .await
                .map_err(|e| ProxyError::io("tls handshake with the source", e))
        };
        let (session, destination) = if tls.verify_peer {
            let session = handshake(start).await?;
            (
                session,
                migration.dial_upstream(by_order, Some(&tls)).await?,
            )
        } else {
            let destination = migration.dial_upstream(by_order, Some(&tls)).await?;
            (handshake(start).await?, destination)
        };
        let (mut read, write) = Conn::Tls(Box::new(session)).into_split();
        let first = read_first_bytes(&mut read, ctx.identify_timeout).await;
        let kind = match (by_order, &first) {
            (ChannelKind::Main, FirstBytes::Identified(ChannelKind::Main, _)) => ChannelKind::Main,
            (ChannelKind::Main, other) => {
                return Err(ProxyError::Aborted(format!(
                    "the first tls connection is the main channel by order, but it sent {:02x?} instead of QEVM",
                    other.prefix()
                )))
            }
            (_, FirstBytes::Identified(ChannelKind::Main, _)) => {
                return Err(ProxyError::Aborted(
                    "a second main channel in one migration".into(),
                ))
            }
            (_, FirstBytes::Identified(ChannelKind::Multifd, _)) => ChannelKind::Multifd,
            _ => ChannelKind::Preempt,
        };
        migration.add_channel(kind);
        tracing::info!(kind = kind.as_str(), upstream = %migration.key.upstream, "channel identified");
        let prefix = first.prefix().to_vec();
        carry_channel(
            &migration,
            kind,
            (read, write),
            &prefix,
            destination,
            rewrite.as_ref(),
            &ctx,
        )
        .await
        .map(|()| kind)
    };
    async {
        let result = tokio::select! {
            result = work => result,
            () = migration.cancel.cancelled() => return,
        };
        match result {
            Ok(ChannelKind::Main) => migration.main_completed.store(true, Ordering::Release),
            Ok(_) => {}
            Err(err) => migration.fail(&err),
        }
    }
    .instrument(span)
    .await;
}
