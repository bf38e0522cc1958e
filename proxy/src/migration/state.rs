//! What the channels of one migration report back to it while they run: bytes each way, what the
//! main channel announced (return path, postcopy), and what the rewrite did.
//!
//! A small handle rather than the whole `Migration`, so the main-channel pump and the relays can
//! be built and tested without a registry, a cancellation token or a span. Every count also goes
//! to the daemon-wide [`Metrics`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use migproxy_config::digest::NameList;
use tokio::sync::Notify;

use crate::migration::metrics::Metrics;
use crate::migration::rewrite::Rewritten;

/// What the rewrite did, for the summary line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RewriteSummary {
    pub cpus_rewritten: u32,
    /// Registers dropped on any vCPU, each once; the first few named, the rest counted.
    pub dropped: NameList,
    pub filled: NameList,
    /// `cpu` subsections removed because the destination cannot load them (names).
    pub subsections_removed: Vec<String>,
}

/// The running state of one migration.
#[derive(Debug)]
pub struct MigrationState {
    bytes_to_destination: AtomicU64,
    bytes_to_source: AtomicU64,
    return_path: AtomicBool,
    postcopy_advised: AtomicBool,
    /// The stream decoded so far may end where it is (the destination may have all of it).
    stream_complete: AtomicBool,
    /// The main channel's forward direction has carried the whole stream (its EOF went out).
    stream_forwarded: AtomicBool,
    /// The main channel's destination leg is TLS (how its end is read: `destination_end.rs`).
    destination_tls: AtomicBool,
    /// The summary's `postcopy` word, decided at ADVISE ("off" until then).
    postcopy_outlook: Mutex<&'static str>,
    rewrite_summary: Mutex<RewriteSummary>,
    metrics: Arc<Metrics>,
    /// Woken when postcopy is advised or the whole stream has gone through: a preempt channel
    /// may be waiting for the first, and gives up at the second.
    postcopy_watchers: Arc<Notify>,
}

impl MigrationState {
    pub fn new(metrics: Arc<Metrics>, postcopy_watchers: Arc<Notify>) -> MigrationState {
        MigrationState {
            bytes_to_destination: AtomicU64::new(0),
            bytes_to_source: AtomicU64::new(0),
            return_path: AtomicBool::new(false),
            postcopy_advised: AtomicBool::new(false),
            stream_complete: AtomicBool::new(false),
            stream_forwarded: AtomicBool::new(false),
            destination_tls: AtomicBool::new(false),
            postcopy_outlook: Mutex::new("off"),
            rewrite_summary: Mutex::new(RewriteSummary::default()),
            metrics,
            postcopy_watchers,
        }
    }

    /// The counters a write towards the destination adds to.
    pub fn to_destination(&self) -> [&AtomicU64; 2] {
        [
            &self.bytes_to_destination,
            &self.metrics.bytes_to_destination,
        ]
    }

    /// The counters a write towards the source adds to.
    pub fn to_source(&self) -> [&AtomicU64; 2] {
        [&self.bytes_to_source, &self.metrics.bytes_to_source]
    }

    pub fn bytes_to_destination(&self) -> u64 {
        self.bytes_to_destination.load(Ordering::Relaxed)
    }

    pub fn bytes_to_source(&self) -> u64 {
        self.bytes_to_source.load(Ordering::Relaxed)
    }

    pub fn note_return_path(&self) {
        self.return_path.store(true, Ordering::Release);
    }

    pub fn has_return_path(&self) -> bool {
        self.return_path.load(Ordering::Acquire)
    }

    pub fn note_stream_complete(&self, complete: bool) {
        self.stream_complete.store(complete, Ordering::Release);
    }

    /// Whether a destination that closes now may have loaded the whole stream.
    pub fn stream_complete(&self) -> bool {
        self.stream_complete.load(Ordering::Acquire)
    }

    /// Set before the destination can see the end of the stream, so before the source can see
    /// its connection close: a source that starts its next migration the moment the last one
    /// closed finds this one no longer taking channels.
    pub fn note_stream_forwarded(&self) {
        if !self.stream_forwarded.swap(true, Ordering::AcqRel) {
            self.postcopy_watchers.notify_waiters();
        }
    }

    pub fn stream_forwarded(&self) -> bool {
        self.stream_forwarded.load(Ordering::Acquire)
    }

    pub fn note_destination_tls(&self) {
        self.destination_tls.store(true, Ordering::Release);
    }

    pub fn destination_tls(&self) -> bool {
        self.destination_tls.load(Ordering::Acquire)
    }

    pub fn note_postcopy_advised(&self) {
        if !self.postcopy_advised.swap(true, Ordering::AcqRel) {
            self.postcopy_watchers.notify_waiters();
        }
    }

    pub fn postcopy_advised(&self) -> bool {
        self.postcopy_advised.load(Ordering::Acquire)
    }

    /// What a switch to postcopy would mean for this migration (`recoverable`,
    /// `unrecoverable`, or `relayed` without a rewrite), for the summary.
    pub fn note_postcopy_outlook(&self, word: &'static str) {
        if let Ok(mut outlook) = self.postcopy_outlook.lock() {
            *outlook = word;
        }
    }

    pub fn postcopy_outlook(&self) -> &'static str {
        self.postcopy_outlook
            .lock()
            .map(|outlook| *outlook)
            .unwrap_or("unknown")
    }

    /// Count the vCPUs whose registers were rewritten, and remember (a bounded list of) the
    /// names for the summary.
    pub fn record_rewrites(&self, rewritten: &Rewritten) {
        let metrics = &self.metrics;
        metrics
            .cpus_rewritten
            .fetch_add(u64::from(rewritten.cpus_rewritten), Ordering::Relaxed);
        metrics
            .registers_dropped
            .fetch_add(rewritten.registers_dropped, Ordering::Relaxed);
        metrics
            .registers_filled
            .fetch_add(rewritten.registers_filled, Ordering::Relaxed);
        if let Ok(mut summary) = self.rewrite_summary.lock() {
            summary.cpus_rewritten = summary
                .cpus_rewritten
                .saturating_add(rewritten.cpus_rewritten);
            summary.dropped.merge(&rewritten.dropped);
            summary.filled.merge(&rewritten.filled);
        }
    }

    /// Remember a `cpu` subsection removed for the destination (the summary lists each name once).
    pub fn record_removed_subsection(&self, name: &str) {
        if let Ok(mut summary) = self.rewrite_summary.lock() {
            if !summary.subsections_removed.iter().any(|n| n == name) {
                summary.subsections_removed.push(name.to_owned());
            }
        }
    }

    pub fn rewrite_summary(&self) -> RewriteSummary {
        self.rewrite_summary
            .lock()
            .map(|summary| summary.clone())
            .unwrap_or_default()
    }
}
