//! Daemon-wide counters, rendered in the Prometheus text exposition format on `/metrics`.
//!
//! A handful of atomics is all the daemon needs; a metrics crate would add compile time and
//! nothing a scrape can see.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Metrics {
    pub migrations_started: AtomicU64,
    pub migrations_completed: AtomicU64,
    pub migrations_refused: AtomicU64,
    pub migrations_failed: AtomicU64,
    pub migrations_active: AtomicI64,
    pub connections_main: AtomicU64,
    pub connections_multifd: AtomicU64,
    pub connections_preempt: AtomicU64,
    pub connections_stray: AtomicU64,
    pub bytes_to_destination: AtomicU64,
    pub bytes_to_source: AtomicU64,
    pub registers_dropped: AtomicU64,
    pub registers_filled: AtomicU64,
    pub cpus_rewritten: AtomicU64,
    /// Connections and migrations turned away before anything was dialed, by reason.
    refused: [AtomicU64; TurnedAway::ALL.len()],
    /// Signalled whenever `migrations_active` drops, for the shutdown drain.
    pub active_changed: Notify,
}

impl Metrics {
    pub fn active(&self) -> i64 {
        self.migrations_active.load(Ordering::Acquire)
    }

    pub fn migration_started(&self) {
        self.migrations_started.fetch_add(1, Ordering::Relaxed);
        self.migrations_active.fetch_add(1, Ordering::AcqRel);
    }

    pub fn migration_ended(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Completed => &self.migrations_completed,
            Outcome::Refused => &self.migrations_refused,
            Outcome::Failed => &self.migrations_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.migrations_active.fetch_sub(1, Ordering::AcqRel);
        self.active_changed.notify_waiters();
    }

    /// Count one connection or migration turned away.
    pub fn turned_away(&self, reason: TurnedAway) {
        if let Some(counter) = self.refused.get(reason as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn turned_away_count(&self, reason: TurnedAway) -> u64 {
        self.refused
            .get(reason as usize)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            "migproxy_migrations_started_total",
            "counter",
            "Migrations started (a main channel identified itself).",
            &[("", get(&self.migrations_started))],
        );
        family(
            "migproxy_migrations_total",
            "counter",
            "Migrations ended, by outcome.",
            &[
                ("{outcome=\"completed\"}", get(&self.migrations_completed)),
                ("{outcome=\"refused\"}", get(&self.migrations_refused)),
                ("{outcome=\"failed\"}", get(&self.migrations_failed)),
            ],
        );
        family(
            "migproxy_migrations_active",
            "gauge",
            "Migrations in progress.",
            &[("", u64::try_from(self.active()).unwrap_or(0))],
        );
        family(
            "migproxy_connections_total",
            "counter",
            "Accepted connections, by channel kind (stray: never identified, never dialed upstream).",
            &[
                ("{kind=\"main\"}", get(&self.connections_main)),
                ("{kind=\"multifd\"}", get(&self.connections_multifd)),
                ("{kind=\"preempt\"}", get(&self.connections_preempt)),
                ("{kind=\"stray\"}", get(&self.connections_stray)),
            ],
        );
        family(
            "migproxy_bytes_total",
            "counter",
            "Bytes forwarded, by direction.",
            &[
                (
                    "{direction=\"to_destination\"}",
                    get(&self.bytes_to_destination),
                ),
                ("{direction=\"to_source\"}", get(&self.bytes_to_source)),
            ],
        );
        family(
            "migproxy_registers_total",
            "counter",
            "Registers changed by the rewrite, by action.",
            &[
                ("{action=\"dropped\"}", get(&self.registers_dropped)),
                ("{action=\"filled\"}", get(&self.registers_filled)),
            ],
        );
        family(
            "migproxy_cpus_rewritten_total",
            "counter",
            "vCPU register arrays replaced.",
            &[("", get(&self.cpus_rewritten))],
        );
        let labels: Vec<(String, u64)> = TurnedAway::ALL
            .iter()
            .map(|reason| {
                (
                    format!("{{reason=\"{}\"}}", reason.as_str()),
                    self.turned_away_count(*reason),
                )
            })
            .collect();
        let samples: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        family(
            "migproxy_turned_away_total",
            "counter",
            "Connections and migrations refused before the destination was dialed, by reason (a budget, a self-loop, a second migration from one host, a failed TLS handshake, the admin connection cap).",
            &samples,
        );
        out
    }
}

/// Why a connection or migration was turned away before anything was dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnedAway {
    SelfLoop,
    MaxConnections,
    MaxConnectionsPerSource,
    MaxMigrations,
    MigrationInProgress,
    TlsHandshake,
    AdminConnections,
}

impl TurnedAway {
    pub const ALL: [TurnedAway; 7] = [
        TurnedAway::SelfLoop,
        TurnedAway::MaxConnections,
        TurnedAway::MaxConnectionsPerSource,
        TurnedAway::MaxMigrations,
        TurnedAway::MigrationInProgress,
        TurnedAway::TlsHandshake,
        TurnedAway::AdminConnections,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TurnedAway::SelfLoop => "self_loop",
            TurnedAway::MaxConnections => "max_connections",
            TurnedAway::MaxConnectionsPerSource => "max_connections_per_source",
            TurnedAway::MaxMigrations => "max_migrations",
            TurnedAway::MigrationInProgress => "migration_in_progress",
            TurnedAway::TlsHandshake => "tls_handshake",
            TurnedAway::AdminConnections => "max_admin_connections",
        }
    }
}

/// How a migration ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Refused,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.migration_started();
        metrics.migration_ended(Outcome::Completed);
        let text = metrics.render();
        assert!(text.contains("migproxy_migrations_total{outcome=\"completed\"} 1\n"));
        assert!(text.contains("migproxy_migrations_active 0\n"));
        assert!(text.contains("# TYPE migproxy_bytes_total counter\n"));
        metrics.turned_away(TurnedAway::SelfLoop);
        let text = metrics.render();
        assert!(text.contains("migproxy_turned_away_total{reason=\"self_loop\"} 1\n"));
        assert!(text.contains("migproxy_turned_away_total{reason=\"max_migrations\"} 0\n"));
    }
}
