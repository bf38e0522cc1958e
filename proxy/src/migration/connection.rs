//! Everything that happens to one accepted connection: identification, joining a migration,
//! dialing the destination and carrying the channel until it ends or the migration fails.
//!
//! ```text
//! accepted (budgets) ─▶ upstream is not our own listener ─┬─ plain ─────────────────────────┐
//!                                                         └─ tls: source handshake (deadline)┤
//!   first 4 plaintext bytes (deadline) ─▶ join or start a migration ─▶ dial (+ tls) ◀───────┘
//!     └─▶ carry: main channel through the pump, any other channel as a raw relay
//! ```
//!
//! A connection that does not identify itself within the deadline never reaches the destination
//! (the destination QEMU has exactly one incoming migration, and a port probe reaching it would
//! make that migration fail). Under TLS, "identified" means a completed source handshake (with
//! the source's certificate verified, by default) and then the same first plaintext bytes as a
//! plain connection: the destination is never dialed for a bare ClientHello. Both paths end in the same tail, `supervise`: the first failure of
//! any channel closes every connection of the migration.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cli::UnreferencedDevicePhase;
use crate::error::{ProxyError, Refusal};
use crate::migration::admission::{Admission, ConnectionSlot};
use crate::migration::identify::{self, ChannelKind, FirstBytes};
use crate::migration::log_budget::TurnedAwayLog;
use crate::migration::metrics::{Metrics, TurnedAway};
use crate::migration::profile_source::{RewriteConfig, RewriteSetup};
use crate::migration::pump::{self, ChannelSettings};
use crate::migration::registry::{GroupKey, Migration, Registry};
use crate::net::addr::{AcceptedInfo, Upstream};
use crate::net::conn::Conn;
use crate::net::own_addresses::{is_local_ip, OwnAddresses};
use crate::net::prefixed::PrefixedIo;
use crate::net::relay::{self, RawRelay};
use crate::net::tls::ListenerTls;

/// Everything a listener's connections need.
pub struct ListenerCtx {
    /// The listen address as configured, for logs.
    pub listen: String,
    pub upstream: Upstream,
    pub rewrite: RewriteConfig,
    pub channel: ChannelSettings,
    /// How multifd, preempt and return-path channels are relayed.
    pub raw_relay: RawRelay,
    /// How long a new connection may take to send its first 4 bytes.
    pub identify_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the daemon closes every remaining connection (parent of every
    /// migration's token).
    pub close_all: CancellationToken,
    pub registry: Registry,
    /// TLS on both legs; None: plain.
    pub tls: Option<Arc<ListenerTls>>,
    /// The daemon-wide budgets (shared by every listener).
    pub admission: Arc<Admission>,
    /// Every listener address of the daemon: no upstream may be one of them.
    pub own: Arc<OwnAddresses>,
    /// Bounds the log lines about connections closed before anything was dialed.
    pub turned_away_log: TurnedAwayLog,
}

impl ListenerCtx {
    /// Whether a connection turned away before anything was dialed gets its own log line (at
    /// most a few per window; the metrics count every one).
    pub fn log_turned_away(&self) -> bool {
        self.turned_away_log.should_log(&self.listen)
    }

    fn stray(&self) {
        self.metrics
            .connections_stray
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything that happens to one accepted connection; `slot` is its place in the connection
/// budgets, held until it ends.
pub async fn handle_connection(
    conn: Conn,
    info: AcceptedInfo,
    ctx: Arc<ListenerCtx>,
    slot: ConnectionSlot,
) {
    let _slot = slot;
    conn.tune();
    let peer = info
        .peer
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unix".to_owned());
    let upstream = match ctx.upstream.resolve(&info) {
        Ok(upstream) => upstream,
        Err(err) => {
            ctx.stray();
            if ctx.log_turned_away() {
                tracing::warn!(%peer, listen = %ctx.listen, %err, "no upstream for this connection: closed");
            }
            return;
        }
    };
    if ctx.own.contains(&upstream) {
        // A connection made straight to the listener under original-dst/tproxy: dialing it would
        // chain migproxy to itself until no file descriptor is left (`net/own_addresses.rs`).
        ctx.metrics.turned_away(TurnedAway::SelfLoop);
        if ctx.log_turned_away() {
            tracing::warn!(%peer, listen = %ctx.listen, %upstream, reason = TurnedAway::SelfLoop.as_str(), "upstream is one of migproxy's own listeners (a connection made straight to the listener, not redirected?): closed, destination not contacted");
        }
        return;
    }
    let key = GroupKey {
        source: info.peer.map(|p| p.ip()),
        upstream,
    };
    // Asked once per connection (each answer binds UDP sockets): a channel joins the migration
    // of the same key, so the answer holds for its destination leg too.
    let on_source_host = key.on_source_host(is_local_ip);
    if on_source_host {
        conn.tune_as_local_source();
    }
    let source = match &ctx.tls {
        Some(tls) => match tls_handshake(conn, &peer, &ctx, tls).await {
            Some(session) => session,
            None => return,
        },
        None => conn,
    };
    identify_and_carry(source, key, on_source_host, peer, &ctx, ctx.tls.as_deref()).await;
}

/// The source's TLS handshake, ClientHello to Finished, within the identification deadline
/// (a stalled handshake must not hold a connection, or a place in its host's budget, for
/// long). With `verify_peer` (the default) a source without a certificate from the CA fails
/// here. Nothing has been dialed yet: the destination is only contacted once the channel has
/// also sent its first plaintext bytes.
async fn tls_handshake(
    conn: Conn,
    peer: &str,
    ctx: &ListenerCtx,
    tls: &ListenerTls,
) -> Option<Conn> {
    enum Failed {
        NoHello(std::io::Error),
        Handshake(std::io::Error),
    }
    let handshake = async {
        let lazy = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), conn);
        let start = lazy.await.map_err(Failed::NoHello)?;
        start
            .into_stream(Arc::clone(&tls.server))
            .await
            .map(|session| Conn::Tls(Box::new(session)))
            .map_err(Failed::Handshake)
    };
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(ctx.identify_timeout, handshake) => outcome,
        () = ctx.close_all.cancelled() => return None,
    };
    match outcome {
        Ok(Ok(session)) => Some(session),
        Ok(Err(Failed::NoHello(err))) => {
            ctx.stray();
            if ctx.log_turned_away() {
                tracing::warn!(%peer, listen = %ctx.listen, %err, "no tls client hello (plaintext on a tls listener?): closed, destination not contacted");
            }
            None
        }
        Ok(Err(Failed::Handshake(err))) => {
            ctx.metrics.turned_away(TurnedAway::TlsHandshake);
            if ctx.log_turned_away() {
                tracing::warn!(%peer, listen = %ctx.listen, %err, reason = TurnedAway::TlsHandshake.as_str(), "tls handshake with the source failed (no or untrusted client certificate?): closed, destination not contacted");
            }
            None
        }
        Err(_) => {
            ctx.metrics.turned_away(TurnedAway::TlsHandshake);
            if ctx.log_turned_away() {
                tracing::info!(%peer, listen = %ctx.listen, reason = "tls handshake not completed within the identification deadline", "stray connection closed, destination not contacted");
            }
            None
        }
    }
}

/// A connection (plain, or a TLS session whose handshake has completed) identifies itself by its
/// first 4 plaintext bytes (see `identify.rs`), joins or starts a migration, and only then is its
/// destination dialed (and, under TLS, handshaken) in the migration's dial order.
async fn identify_and_carry(
    conn: Conn,
    key: GroupKey,
    on_source_host: bool,
    peer: String,
    ctx: &ListenerCtx,
    tls: Option<&ListenerTls>,
) {
    let (first, source) = tokio::select! {
        identified = identify::read_first_bytes(conn, ctx.identify_timeout) => identified,
        () = ctx.close_all.cancelled() => return,
    };
    let joined = match first {
        FirstBytes::Identified(ChannelKind::Main) => {
            match ctx
                .registry
                .start(key, &ctx.metrics, &ctx.close_all, &ctx.admission)
            {
                Ok(migration) => Some((migration, ChannelKind::Main)),
                Err(reason) => {
                    ctx.metrics.turned_away(reason);
                    let why = match reason {
                        TurnedAway::MaxMigrations => {
                            "as many migrations are in progress as --max-migrations allows"
                        }
                        _ => {
                            "a migration from this host to this destination is already in progress"
                        }
                    };
                    if ctx.log_turned_away() {
                        tracing::warn!(%peer, listen = %ctx.listen, reason = reason.as_str(), "main channel refused: {why}: closed, destination not contacted");
                    }
                    return;
                }
            }
        }
        FirstBytes::Identified(kind) => ctx
            .registry
            .join(&key, ctx.identify_timeout)
            .await
            .map(|m| (m, kind)),
        FirstBytes::Unknown => ctx
            .registry
            .join_postcopy(&key, ctx.identify_timeout)
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
        if ctx.log_turned_away() {
            tracing::info!(%peer, listen = %ctx.listen, reason = why, "stray connection closed, destination not contacted");
        }
        return;
    };
    migration.add_channel(kind);
    let span = tracing::info_span!(parent: &migration.span, "conn", kind = kind.as_str(), tls = tls.is_some(), %peer);
    let work = async {
        tracing::info!(upstream = %migration.key.upstream, on_source_host, "channel identified");
        let rewrite = resolve_rewrite(kind, ctx).await?;
        let destination = migration
            .dial
            .dial(
                kind,
                &migration.key.upstream,
                tls,
                ctx.channel.dial_timeout,
                on_source_host,
            )
            .await?;
        carry(&migration, kind, source, destination, rewrite.as_ref(), ctx).await?;
        Ok(kind)
    };
    supervise(&migration, work).instrument(span).await;
}

/// The profiles of a migration are fetched when its main channel arrives, before the destination
/// is contacted: a host upgraded in place advertises its new register list, and a fetch failure
/// costs the destination nothing. A rewrite without the source's reference description is
/// refused here, at the first bytes, unless `--unreferenced-device-phase allow`: its device
/// phase could end on a guest-forged description (DESIGN.md, "How the end of the phase is
/// recognised"), and refusing now costs neither the guest nor the destination anything.
async fn resolve_rewrite(
    kind: ChannelKind,
    ctx: &ListenerCtx,
) -> Result<Option<RewriteSetup>, ProxyError> {
    if kind != ChannelKind::Main {
        return Ok(None);
    }
    let setup = ctx.rewrite.resolve().await?;
    if let Some(setup) = &setup {
        if setup.source_reference.is_none() {
            match ctx.channel.unreferenced_device_phase {
                UnreferencedDevicePhase::Refuse => {
                    return Err(ProxyError::Refused(Refusal::UnreferencedDevicePhase))
                }
                UnreferencedDevicePhase::Allow => tracing::warn!(
                    "rewriting without a source reference (--unreferenced-device-phase allow): a guest can end the device phase early and fail its own migration"
                ),
            }
        }
    }
    Ok(setup)
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
        if matches!(destination, Conn::Tls(_)) {
            migration.state.note_destination_tls();
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
    relay::relay_raw(
        ctx.raw_relay,
        source,
        destination,
        &migration.state.to_destination(),
        &migration.state.to_source(),
        kind.as_str(),
        ctx.channel.write_stall_timeout,
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
