//! One migration: grouping its connections, dialing the destination in the right order, and
//! tearing every connection down together.
//!
//! The rules (DESIGN.md, "Connections"):
//! - a connection is grouped with a migration only once it has identified itself; a main channel
//!   (`QEVM`) starts a migration, multifd and preempt channels accepted on the same listener from
//!   the same source host (and, with interception, towards the same destination) join it while it
//!   is being set up or open - the multifd UUID is all zeros without `-uuid`, so it is no key;
//! - the destination sees the main channel first (QEMU 7.2, and 10.0 with TLS or postcopy, take the
//!   first connection as the main one), then the other channels in the order they identified
//!   themselves (multifd order is irrelevant: the channel id in the handshake decides);
//! - a connection that does not identify itself never reaches the destination. A connection
//!   without a known magic is taken as a preempt channel only by a migration that advised postcopy
//!   (the preempt channel needs the postcopy-ram capability, whose ADVISE is among the first
//!   records of the main channel);
//! - any failure on any connection closes both sides of every connection of
//!   the migration, after logging what, where and why.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::addr::{AcceptedInfo, Address, Upstream};
use crate::classify::{read_first_bytes, ChannelKind, FirstBytes};
use crate::conn::{dial, Conn, ConnRead, ConnWrite};
use crate::error::ProxyError;
use crate::main_channel::{self, ChannelSettings};
use crate::metrics::{Metrics, Outcome};
use crate::profile_source::{RewriteConfig, RewriteSetup};
use crate::relay;
use crate::shutdown::Shutdown;
use crate::tls::ListenerTls;

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
    pub shutdown: Shutdown,
    pub registry: Registry,
    /// TLS on both legs; None: plain.
    pub tls: Option<Arc<ListenerTls>>,
}

/// Which connections may belong together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    /// The source host (None on unix sockets: one host by definition).
    pub source: Option<IpAddr>,
    pub upstream: Address,
}

/// The migrations of one listener, by group key.
#[derive(Debug, Default)]
pub struct Registry {
    current: Mutex<HashMap<GroupKey, Weak<Migration>>>,
    /// Signalled when a migration starts or advises postcopy.
    changed: Arc<Notify>,
    next_id: AtomicU64,
}

impl Registry {
    fn start(
        &self,
        key: GroupKey,
        metrics: &Arc<Metrics>,
        parent: &CancellationToken,
    ) -> Arc<Migration> {
        let id = self
            .next_id
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let (main_dialed, _) = watch::channel(false);
        let migration = Arc::new(Migration {
            span: tracing::info_span!("migration", id, source = %source_name(&key), upstream = %key.upstream),
            key: key.clone(),
            cancel: parent.child_token(),
            main_dialed,
            dial_lock: tokio::sync::Mutex::new(()),
            postcopy_advised: AtomicBool::new(false),
            return_path: AtomicBool::new(false),
            main_completed: AtomicBool::new(false),
            failure: Mutex::new(None),
            rewrite_summary: Mutex::new(RewriteSummary::default()),
            channels: Mutex::new(Vec::new()),
            bytes_to_destination: AtomicU64::new(0),
            bytes_to_source: AtomicU64::new(0),
            started: Instant::now(),
            metrics: Arc::clone(metrics),
            registry_changed: Arc::clone(&self.changed),
        });
        metrics.migration_started();
        if let Ok(mut map) = self.current.lock() {
            map.retain(|_, weak| weak.strong_count() > 0);
            map.insert(key, Arc::downgrade(&migration));
        }
        self.changed.notify_waiters();
        migration
    }

    fn find(&self, key: &GroupKey, want: impl Fn(&Migration) -> bool) -> Option<Arc<Migration>> {
        let map = self.current.lock().ok()?;
        let migration = map.get(key)?.upgrade()?;
        (!migration.cancel.is_cancelled() && want(&migration)).then_some(migration)
    }

    /// The open migration for `key` that satisfies `want`, waiting up to `deadline` for one.
    async fn wait_for(
        &self,
        key: &GroupKey,
        deadline: Duration,
        want: impl Fn(&Migration) -> bool,
    ) -> Option<Arc<Migration>> {
        let until = tokio::time::Instant::now().checked_add(deadline)?;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(found) = self.find(key, &want) {
                return Some(found);
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return None;
            }
        }
    }
}

fn source_name(key: &GroupKey) -> String {
    key.source
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "unix".to_owned())
}

/// What the rewrite did, for the summary line.
#[derive(Debug, Default)]
pub struct RewriteSummary {
    pub cpus_rewritten: u32,
    pub dropped: Vec<String>,
    pub filled: Vec<String>,
    /// `cpu` subsections removed because the destination cannot load them (names).
    pub subsections_removed: Vec<String>,
}

pub struct Migration {
    pub key: GroupKey,
    pub span: tracing::Span,
    /// Cancelled on the first failure (or at the end of a drain): every connection closes.
    pub cancel: CancellationToken,
    main_dialed: watch::Sender<bool>,
    /// Serialises upstream connects, so the destination accepts them in our order.
    dial_lock: tokio::sync::Mutex<()>,
    postcopy_advised: AtomicBool,
    return_path: AtomicBool,
    main_completed: AtomicBool,
    failure: Mutex<Option<(Outcome, String)>>,
    pub rewrite_summary: Mutex<RewriteSummary>,
    channels: Mutex<Vec<ChannelKind>>,
    pub bytes_to_destination: AtomicU64,
    pub bytes_to_source: AtomicU64,
    started: Instant,
    pub metrics: Arc<Metrics>,
    registry_changed: Arc<Notify>,
}

impl Migration {
    /// Record the first failure and close every connection of this migration.
    pub fn fail(&self, error: &ProxyError) {
        let outcome = match error {
            ProxyError::Refused(_) => Outcome::Refused,
            _ => Outcome::Failed,
        };
        if let Ok(mut failure) = self.failure.lock() {
            if failure.is_none() {
                tracing::error!(parent: &self.span, reason = %error, "closing every connection of the migration");
                *failure = Some((outcome, error.to_string()));
            }
        }
        self.cancel.cancel();
    }

    /// Whether a new channel may still join: not once the main channel has finished (a
    /// back-to-back migration from the same host must not be mistaken for part of this one).
    fn accepts_channels(&self) -> bool {
        !self.main_completed.load(Ordering::Acquire)
    }

    pub fn note_postcopy_advised(&self) {
        if !self.postcopy_advised.swap(true, Ordering::AcqRel) {
            self.registry_changed.notify_waiters();
        }
    }

    pub fn note_return_path(&self) {
        self.return_path.store(true, Ordering::Release);
    }

    pub fn has_return_path(&self) -> bool {
        self.return_path.load(Ordering::Acquire)
    }

    fn add_channel(&self, kind: ChannelKind) {
        if let Ok(mut channels) = self.channels.lock() {
            channels.push(kind);
        }
        let counter = match kind {
            ChannelKind::Main => &self.metrics.connections_main,
            ChannelKind::Multifd => &self.metrics.connections_multifd,
            ChannelKind::Preempt => &self.metrics.connections_preempt,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Connect to the destination for one channel, after the main channel (see module docs).
    async fn dial_upstream(
        &self,
        kind: ChannelKind,
        tls: Option<&ListenerTls>,
    ) -> Result<Conn, ProxyError> {
        if kind != ChannelKind::Main {
            let mut dialed = self.main_dialed.subscribe();
            dialed
                .wait_for(|dialed| *dialed)
                .await
                .map_err(|_| ProxyError::Aborted("main channel gone".into()))?;
        }
        let _order = self.dial_lock.lock().await;
        let mut conn = dial(&self.key.upstream).await?;
        if let Some(tls) = tls {
            // Handshake inside the lock: the destination orders channels by completed handshake.
            let host = match &self.key.upstream {
                Address::Tcp { host, .. } => host.as_str(),
                Address::Unix(_) => "localhost",
            };
            let session = tls
                .connector
                .connect(tls.server_name(host)?, conn)
                .await
                .map_err(|e| {
                    ProxyError::io(format!("tls handshake with {}", self.key.upstream), e)
                })?;
            conn = Conn::Tls(Box::new(session));
        }
        if kind == ChannelKind::Main {
            self.main_dialed.send_replace(true);
        }
        Ok(conn)
    }

    fn counters(&self) -> ([&AtomicU64; 2], [&AtomicU64; 2]) {
        (
            [
                &self.bytes_to_destination,
                &self.metrics.bytes_to_destination,
            ],
            [&self.bytes_to_source, &self.metrics.bytes_to_source],
        )
    }
}

impl Drop for Migration {
    /// The one-line summary: every connection of the migration has ended.
    fn drop(&mut self) {
        let (outcome, reason) = match self.failure.get_mut().ok().and_then(|f| f.take()) {
            Some((outcome, reason)) => (outcome, reason),
            None if self.main_completed.load(Ordering::Acquire) => {
                (Outcome::Completed, String::new())
            }
            None => (
                Outcome::Failed,
                "ended before the main channel completed".to_owned(),
            ),
        };
        self.metrics.migration_ended(outcome);
        let channels = self
            .channels
            .get_mut()
            .map(|channels| {
                // Join order is a race between tasks; the summary lists kinds in a fixed order.
                channels.sort_by_key(|kind| *kind as u8);
                channels
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .unwrap_or_default();
        let summary = self
            .rewrite_summary
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        tracing::info!(
            parent: &self.span,
            outcome = outcome.as_str(),
            reason = %reason,
            duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            bytes_to_destination = self.bytes_to_destination.load(Ordering::Relaxed),
            bytes_to_source = self.bytes_to_source.load(Ordering::Relaxed),
            channels = %channels,
            return_path = self.return_path.load(Ordering::Relaxed),
            cpus_rewritten = summary.cpus_rewritten,
            dropped = %summary.dropped.join(","),
            filled = %summary.filled.join(","),
            subsections_removed = %summary.subsections_removed.join(","),
            "migration summary"
        );
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
        () = ctx.shutdown.close_all.cancelled() => return,
    };
    let joined = match &first {
        FirstBytes::Identified(ChannelKind::Main, _) => {
            let migration = ctx
                .registry
                .start(key, &ctx.metrics, &ctx.shutdown.close_all);
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
        return main_channel::run(
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

/// A connection on a TLS listener: identified by its ClientHello, grouped by order (the
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
        () = ctx.shutdown.close_all.cancelled() => return,
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
    // Under TLS, channels are told apart by order.
    let (migration, by_order) = match ctx.registry.find(&key, Migration::accepts_channels) {
        Some(migration) => (migration, ChannelKind::Multifd),
        None => (
            ctx.registry
                .start(key, &ctx.metrics, &ctx.shutdown.close_all),
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
