//! The migrations of a listener: grouping connections into them, tearing every connection of
//! one down together, and the one summary line each logs when its last connection has ended.
//! (Dialing in order is `dial.rs`; what channels report while they run is `state.rs`.)
//!
//! DESIGN.md, "Connections":
//! - a connection is grouped with a migration only once it has identified itself; a main channel
//!   (`QEVM`) starts a migration, multifd and preempt channels accepted on the same listener from
//!   the same source host (and, with interception, towards the same destination) join it while it
//!   is being set up or open - the multifd UUID is all zeros without `-uuid`, so it is no key; one
//!   that identified itself before its main channel is handed the migration as it starts;
//! - while such a migration is open, a second main channel with the same key is refused and the
//!   first keeps its later channels (a destination takes one incoming migration at a time);
//! - the destination sees the main channel first (QEMU 7.2, and 10.0 with TLS or postcopy, take the
//!   first connection as the main one), then the other channels in the order they identified
//!   themselves (multifd order is irrelevant: the channel id in the handshake decides);
//! - a connection that does not identify itself never reaches the destination. A connection
//!   without a known magic is taken as a preempt channel only by a migration that advised postcopy
//!   (the preempt channel needs the postcopy-ram capability, whose ADVISE is among the first
//!   records of the main channel);
//! - any failure on any connection closes both sides of every connection of the migration, after
//!   logging what, where and why (DESIGN.md, "Failing closed").

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::error::ProxyError;
use crate::migration::admission::{Admission, MigrationSlot};
use crate::migration::dial::DialOrder;
use crate::migration::identify::ChannelKind;
use crate::migration::metrics::{Metrics, Outcome, TurnedAway};
use crate::migration::state::MigrationState;
use crate::net::addr::Address;

/// Which connections may belong together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    /// The source host (None on unix sockets: one host by definition).
    pub source: Option<IpAddr>,
    pub upstream: Address,
}

impl GroupKey {
    /// Whether migproxy sits on the source host: the source is one of this host's addresses
    /// (`is_local` tells them) and the destination is an address that is not. Only then is the
    /// destination leg the slow one and the source leg free of round trips, which is what
    /// `Conn::tune_as_local_source` and `Conn::tune_as_link_towards_destination` assume. A
    /// destination given by name is not judged (false): its address is only known when dialed.
    pub fn on_source_host(&self, is_local: impl Fn(IpAddr) -> bool) -> bool {
        let Some(source) = self.source else {
            return false;
        };
        let Address::Tcp { host, .. } = &self.upstream else {
            return false;
        };
        let Ok(destination) = host.parse::<IpAddr>() else {
            return false;
        };
        is_local(source.to_canonical()) && !is_local(destination.to_canonical())
    }
}

/// The migrations of one listener, by group key.
#[derive(Debug, Default)]
pub struct Registry {
    groups: Mutex<Groups>,
    /// Signalled when a migration starts, advises postcopy or has forwarded its whole stream.
    changed: Arc<Notify>,
    next_id: AtomicU64,
}

/// What one lock guards: the current migration of each key, and the channels that identified
/// themselves before it started. Both under one lock so that a channel either finds the
/// migration or is handed it when it starts, never neither.
#[derive(Default)]
struct Groups {
    current: HashMap<GroupKey, Weak<Migration>>,
    /// A channel that arrived first waits here and is handed the migration the moment it starts:
    /// it belongs to that migration even if the main channel carries its whole stream before the
    /// waiting task runs again (and the migration would otherwise be gone or closed to joiners).
    early: HashMap<GroupKey, Vec<oneshot::Sender<Arc<Migration>>>>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups")
            .field("current", &self.current.len())
            .field("early", &self.early.len())
            .finish()
    }
}

impl Groups {
    /// Forget finished migrations and channels that stopped waiting (their deadline passed or
    /// their connection closed): both maps stay bounded by the live connections.
    fn prune(&mut self) {
        self.current.retain(|_, weak| weak.strong_count() > 0);
        self.early.retain(|_, waiting| {
            waiting.retain(|sender| !sender.is_closed());
            !waiting.is_empty()
        });
    }
}

impl Registry {
    /// A new migration for `key` (a main channel arrived); it replaces the finished one there.
    ///
    /// Refused while a migration with the same key is still open (being set up or carrying its
    /// stream): a destination QEMU takes one incoming migration, so a second `QEVM` from the same
    /// host towards the same destination is either a retry that cannot succeed yet or someone on
    /// that host trying to take over the first migration's later channels. The first migration
    /// keeps its key; the second is closed before anything is dialed. Also refused when the
    /// daemon already carries as many migrations as its budget allows.
    pub fn start(
        &self,
        key: GroupKey,
        metrics: &Arc<Metrics>,
        parent: &CancellationToken,
        admission: &Arc<Admission>,
    ) -> Result<Arc<Migration>, TurnedAway> {
        // Check and insert under one lock: two `QEVM`s racing must not both start.
        let mut groups = self
            .groups
            .lock()
            .map_err(|_| TurnedAway::MigrationInProgress)?;
        let open = groups
            .current
            .get(&key)
            .and_then(Weak::upgrade)
            .is_some_and(|m| !m.cancel.is_cancelled() && m.accepts_channels());
        if open {
            return Err(TurnedAway::MigrationInProgress);
        }
        let slot = admission
            .migration()
            .map_err(|_| TurnedAway::MaxMigrations)?;
        let id = self
            .next_id
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let migration = Arc::new(Migration {
            span: tracing::info_span!("migration", id, source = %source_name(&key), upstream = %key.upstream),
            key: key.clone(),
            cancel: parent.child_token(),
            dial: DialOrder::default(),
            main_completed: AtomicBool::new(false),
            failure: Mutex::new(None),
            channels: Mutex::new(Vec::new()),
            started: Instant::now(),
            metrics: Arc::clone(metrics),
            state: MigrationState::new(Arc::clone(metrics), Arc::clone(&self.changed)),
            _slot: slot,
        });
        metrics.migration_started();
        groups.prune();
        for waiting in groups.early.remove(&key).unwrap_or_default() {
            // A channel that gave up meanwhile has dropped its receiver: nothing to hand it.
            let _ = waiting.send(Arc::clone(&migration));
        }
        groups.current.insert(key, Arc::downgrade(&migration));
        drop(groups);
        self.changed.notify_waiters();
        Ok(migration)
    }

    /// The migration a channel other than the main one belongs to: the open one for `key` that
    /// still takes channels, or else the next one to start within `deadline`. A channel that
    /// identified itself before the main channel arrived is bound to the migration as it starts.
    pub async fn join(&self, key: &GroupKey, deadline: Duration) -> Option<Arc<Migration>> {
        let handed = {
            let mut groups = self.groups.lock().ok()?;
            if let Some(open) = Self::open(&groups, key, Migration::accepts_channels) {
                return Some(open);
            }
            groups.prune();
            let (sender, receiver) = oneshot::channel();
            groups.early.entry(key.clone()).or_default().push(sender);
            receiver
        };
        let migration = tokio::time::timeout(deadline, handed).await.ok()?.ok()?;
        (!migration.cancel.is_cancelled()).then_some(migration)
    }

    /// The open migration for `key` that satisfies `want`, if there is one now.
    pub fn find(
        &self,
        key: &GroupKey,
        want: impl Fn(&Migration) -> bool,
    ) -> Option<Arc<Migration>> {
        let groups = self.groups.lock().ok()?;
        Self::open(&groups, key, want)
    }

    fn open(
        groups: &Groups,
        key: &GroupKey,
        want: impl Fn(&Migration) -> bool,
    ) -> Option<Arc<Migration>> {
        let migration = groups.current.get(key)?.upgrade()?;
        (!migration.cancel.is_cancelled() && want(&migration)).then_some(migration)
    }

    /// The migration a preempt candidate (a connection with unknown first bytes) belongs to: the
    /// one it joins (see [`Registry::join`]) once that migration has advised postcopy, which its
    /// main channel does among its first records. Waits up to `deadline` in all; gives up as soon
    /// as the migration's stream has gone through without an ADVISE or the migration is closed,
    /// so a stray connection never holds a finished migration open.
    pub async fn join_postcopy(
        &self,
        key: &GroupKey,
        deadline: Duration,
    ) -> Option<Arc<Migration>> {
        let until = tokio::time::Instant::now().checked_add(deadline)?;
        let migration = self.join(key, deadline).await?;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if migration.state.postcopy_advised() {
                return Some(migration);
            }
            if migration.state.stream_forwarded() {
                return None;
            }
            tokio::select! {
                woken = tokio::time::timeout_at(until, changed) => woken.ok()?,
                () = migration.cancel.cancelled() => return None,
            }
        }
    }
}

fn source_name(key: &GroupKey) -> String {
    key.source
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "unix".to_owned())
}

/// One migration: shared by the tasks of its connections, summarised when the last one drops it.
pub struct Migration {
    pub key: GroupKey,
    pub span: tracing::Span,
    /// Cancelled on the first failure (or at the end of a drain): every connection closes.
    pub cancel: CancellationToken,
    /// Upstream connects, in the order the destination must see them.
    pub dial: DialOrder,
    /// What its channels report while they run.
    pub state: MigrationState,
    /// The main channel ended without error: its whole stream went through and the destination
    /// gave no failing verdict. Only the summary's outcome reads it; whether channels may still
    /// join is decided by `state.stream_forwarded()`, which is set earlier and implied by it.
    main_completed: AtomicBool,
    failure: Mutex<Option<(Outcome, String)>>,
    channels: Mutex<Vec<ChannelKind>>,
    started: Instant,
    metrics: Arc<Metrics>,
    /// This migration's place in the `max_migrations` budget.
    _slot: MigrationSlot,
}

impl Migration {
    /// Record the first failure and close every connection of this migration.
    pub fn fail(&self, error: &ProxyError) {
        let outcome = if error.is_refusal() {
            Outcome::Refused
        } else {
            Outcome::Failed
        };
        if let Ok(mut failure) = self.failure.lock() {
            if failure.is_none() {
                tracing::error!(parent: &self.span, reason = %error, "closing every connection of the migration");
                *failure = Some((outcome, error.to_string()));
            }
        }
        self.cancel.cancel();
    }

    /// Whether a new channel may still join: not once the main channel has carried its whole
    /// stream (a back-to-back migration from the same host must not be mistaken for part of this
    /// one, nor refused as its duplicate while this one's connections are still being closed).
    ///
    /// One flag decides it: the pump sets `stream_forwarded` before it half-closes towards the
    /// destination, so before the source can see its connection close and start its next
    /// migration. `main_completed` comes later (after the destination's verdict) and only once
    /// `stream_forwarded` is set, so it would add nothing here.
    pub fn accepts_channels(&self) -> bool {
        !self.state.stream_forwarded()
    }

    /// The main channel ended without error (its stream went through, the destination's verdict
    /// was not a failure): the summary says `completed` unless another channel failed.
    pub fn note_main_completed(&self) {
        self.main_completed.store(true, Ordering::Release);
    }

    pub fn add_channel(&self, kind: ChannelKind) {
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
        let summary = self.state.rewrite_summary();
        tracing::info!(
            parent: &self.span,
            outcome = outcome.as_str(),
            reason = %reason,
            duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            bytes_to_destination = self.state.bytes_to_destination(),
            bytes_to_source = self.state.bytes_to_source(),
            channels = %channels,
            return_path = self.state.has_return_path(),
            postcopy = self.state.postcopy_outlook(),
            cpus_rewritten = summary.cpus_rewritten,
            dropped = %summary.dropped,
            filled = %summary.filled,
            subsections_removed = %summary.subsections_removed.join(","),
            "migration summary"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_the_source_host_only_when_the_source_is_local_and_the_destination_is_not() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let local = |ip: IpAddr| ip.is_loopback() || ip == IpAddr::V4(Ipv4Addr::new(10, 231, 0, 1));
        let key = |source: Option<IpAddr>, host: &str| super::GroupKey {
            source,
            upstream: super::Address::Tcp {
                host: host.to_owned(),
                port: 4444,
            },
        };
        let this_host = Some(IpAddr::V4(Ipv4Addr::new(10, 231, 0, 1)));
        let other_host = Some(IpAddr::V4(Ipv4Addr::new(10, 231, 0, 2)));
        // The nftables redirect on the source host: QEMU's own address, a remote destination.
        assert!(key(this_host, "10.231.0.2").on_source_host(local));
        // The same through an IPv4-mapped IPv6 peer (a dual-stack listener).
        let mapped = Some(IpAddr::V6(Ipv4Addr::new(10, 231, 0, 1).to_ipv6_mapped()));
        assert!(key(mapped, "10.231.0.2").on_source_host(local));
        // On the destination host: a remote source.
        assert!(!key(other_host, "127.0.0.1").on_source_host(local));
        // Everything on one host (tests, benchmarks over loopback).
        assert!(!key(Some(IpAddr::V6(Ipv6Addr::LOCALHOST)), "::1").on_source_host(local));
        assert!(!key(this_host, "127.0.0.1").on_source_host(local));
        // A third host between two others.
        assert!(!key(other_host, "10.231.0.3").on_source_host(local));
        // Not judged: a destination by name, a unix socket on either side.
        assert!(!key(this_host, "dest.example").on_source_host(local));
        assert!(!key(None, "10.231.0.2").on_source_host(local));
        let unix = super::GroupKey {
            source: this_host,
            upstream: super::Address::Unix("/run/qemu.sock".into()),
        };
        assert!(!unix.on_source_host(local));
    }

    use super::*;
    use crate::migration::admission::Budgets;

    fn key() -> GroupKey {
        GroupKey {
            source: Some(IpAddr::from([10, 0, 0, 1])),
            upstream: Address::Tcp {
                host: "10.0.0.2".to_owned(),
                port: 4444,
            },
        }
    }

    struct Listener {
        registry: Registry,
        metrics: Arc<Metrics>,
        parent: CancellationToken,
        admission: Arc<Admission>,
    }

    impl Listener {
        fn new() -> Listener {
            Listener {
                registry: Registry::default(),
                metrics: Arc::new(Metrics::default()),
                parent: CancellationToken::new(),
                admission: Admission::new(Budgets::default()),
            }
        }

        fn start(&self) -> Result<Arc<Migration>, TurnedAway> {
            self.registry
                .start(key(), &self.metrics, &self.parent, &self.admission)
        }

        /// Start a migration that must start.
        fn started(&self) -> Result<Arc<Migration>, String> {
            self.start()
                .map_err(|why| format!("turned away: {}", why.as_str()))
        }

        fn joinable(&self) -> bool {
            self.registry
                .find(&key(), Migration::accepts_channels)
                .is_some()
        }
    }

    #[test]
    fn channels_join_until_the_stream_went_through_and_then_the_next_migration_starts(
    ) -> Result<(), String> {
        let listener = Listener::new();
        let first = listener.started()?;
        assert!(listener.joinable());
        assert_eq!(
            listener.start().err(),
            Some(TurnedAway::MigrationInProgress),
            "a second main channel while the first is open"
        );

        // What the pump notes just before its half-close towards the destination: from then on
        // the source may see its connection close and start its next migration, although this
        // one's main channel has not finished (the destination's verdict is still to come).
        first.state.note_stream_forwarded();
        assert!(!first.accepts_channels());
        assert!(!listener.joinable());
        // Not this one's duplicate: the next migration.
        let second = listener.started()?;
        let joined = listener
            .registry
            .find(&key(), Migration::accepts_channels)
            .ok_or("later channels find no migration")?;
        assert!(
            Arc::ptr_eq(&joined, &second),
            "later channels join the next one"
        );
        drop((first, second, joined));
        Ok(())
    }

    #[test]
    fn the_summary_says_completed_only_when_the_main_channel_ended_without_error(
    ) -> Result<(), String> {
        let listener = Listener::new();
        let forwarded_only = listener.started()?;
        // The stream went through, but the main channel never finished (closed by a drain).
        forwarded_only.state.note_stream_forwarded();
        drop(forwarded_only);
        assert_eq!(
            listener.metrics.migrations_failed.load(Ordering::Relaxed),
            1
        );

        let completed = listener.started()?;
        completed.state.note_stream_forwarded();
        completed.note_main_completed();
        drop(completed);
        assert_eq!(
            listener
                .metrics
                .migrations_completed
                .load(Ordering::Relaxed),
            1
        );
        assert_eq!(listener.metrics.active(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn a_channel_that_arrived_first_belongs_to_the_migration_even_once_its_stream_went_through(
    ) -> Result<(), String> {
        let listener = Arc::new(Listener::new());
        let waiting = {
            let listener = Arc::clone(&listener);
            tokio::spawn(
                async move { listener.registry.join(&key(), Duration::from_secs(5)).await },
            )
        };
        // Until the multifd channel waits, the main channel has not arrived.
        until_a_channel_waits(&listener).await?;
        // The main channel starts the migration and carries its whole (short) stream before the
        // waiting task runs again: what made such a channel a stray before.
        let started = listener.started()?;
        started.state.note_stream_forwarded();
        started.note_main_completed();
        let started_at = Arc::as_ptr(&started);
        drop(started);
        assert!(!listener.joinable(), "a later channel no longer joins");
        let joined = waiting
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the early channel was turned away")?;
        assert_eq!(Arc::as_ptr(&joined), started_at);
        drop(joined);
        assert!(
            listener
                .registry
                .groups
                .lock()
                .map_err(|_| "poisoned")?
                .early
                .is_empty(),
            "no waiter left behind"
        );
        Ok(())
    }

    /// Let the spawned channel tasks run until one of them waits for its migration to start.
    async fn until_a_channel_waits(listener: &Listener) -> Result<(), String> {
        while listener
            .registry
            .groups
            .lock()
            .map_err(|_| "poisoned")?
            .early
            .is_empty()
        {
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Spawn what a connection with unknown first bytes does, and wait until it waits.
    async fn preempt_candidate(
        listener: &Arc<Listener>,
        deadline: Duration,
    ) -> Result<tokio::task::JoinHandle<Option<Arc<Migration>>>, String> {
        let task = {
            let listener = Arc::clone(listener);
            tokio::spawn(async move { listener.registry.join_postcopy(&key(), deadline).await })
        };
        until_a_channel_waits(listener).await?;
        Ok(task)
    }

    #[tokio::test]
    async fn a_preempt_channel_that_arrived_first_joins_once_postcopy_is_advised_even_after_the_stream(
    ) -> Result<(), String> {
        let listener = Arc::new(Listener::new());
        let waiting = preempt_candidate(&listener, Duration::from_secs(5)).await?;
        let started = listener.started()?;
        // ADVISE, and the whole stream, before the waiting task runs again.
        started.state.note_postcopy_advised();
        started.state.note_stream_forwarded();
        let started_at = Arc::as_ptr(&started);
        drop(started);
        let joined = waiting
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the preempt channel was turned away")?;
        assert_eq!(Arc::as_ptr(&joined), started_at);
        Ok(())
    }

    #[tokio::test]
    async fn a_preempt_candidate_gives_up_as_soon_as_a_migration_without_postcopy_went_through(
    ) -> Result<(), String> {
        let listener = Arc::new(Listener::new());
        // A deadline the test would notice: giving up must not wait for it.
        let waiting = preempt_candidate(&listener, Duration::from_secs(3600)).await?;
        let started = listener.started()?;
        tokio::task::yield_now().await;
        started.state.note_stream_forwarded();
        let joined = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .map_err(|_| "still waiting after the stream went through")?
            .map_err(|e| e.to_string())?;
        assert!(
            joined.is_none(),
            "joined a migration that never advised postcopy"
        );
        // It let go of the migration: only the test holds it.
        assert_eq!(Arc::strong_count(&started), 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_channel_waiting_for_a_migration_that_never_starts_gives_up_and_leaves_nothing(
    ) -> Result<(), String> {
        let listener = Listener::new();
        let joined = listener
            .registry
            .join(&key(), Duration::from_millis(20))
            .await;
        assert!(joined.is_none());
        // The next migration prunes what gave up; the one after that is handed nothing stale.
        let started = listener.started()?;
        assert!(listener
            .registry
            .groups
            .lock()
            .map_err(|_| "poisoned")?
            .early
            .is_empty());
        drop(started);
        Ok(())
    }

    #[test]
    fn a_cancelled_migration_takes_no_channels_and_does_not_block_the_next() -> Result<(), String> {
        let listener = Listener::new();
        let first = listener.started()?;
        first.cancel.cancel();
        assert!(!listener.joinable());
        // A closed migration is no duplicate.
        let second = listener.started()?;
        assert!(listener.joinable());
        drop((first, second));
        Ok(())
    }
}
