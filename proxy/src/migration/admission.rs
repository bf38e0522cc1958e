//! The budgets a user sets on what the daemon holds at once: open migration connections (in all
//! and per source host) and migrations in progress. Each admitted thing holds a guard that gives
//! its place back when dropped, so a budget can never leak on an error path.
//!
//! Connections are counted from accept, before they identify themselves: a flood of connections
//! that never send a byte uses the budget of its own host (and the global one), never the file
//! descriptors a real migration needs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Default budgets (README, "Budgets").
pub const DEFAULT_MAX_MIGRATIONS: usize = 16;
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 64;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The configured budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub max_migrations: usize,
    pub max_connections_per_source: usize,
    pub max_connections: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            max_migrations: DEFAULT_MAX_MIGRATIONS,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Which budget refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Connections,
    ConnectionsPerSource,
    Migrations,
}

/// The daemon-wide counts against the budgets (shared by every listener).
#[derive(Debug, Default)]
pub struct Admission {
    budgets: Budgets,
    connections: AtomicUsize,
    per_source: Mutex<HashMap<Option<IpAddr>, usize>>,
    migrations: AtomicUsize,
}

impl Admission {
    pub fn new(budgets: Budgets) -> Arc<Admission> {
        Arc::new(Admission {
            budgets,
            ..Admission::default()
        })
    }

    /// Admit one accepted connection from `source` (None: a unix socket), or say which budget
    /// it would exceed.
    pub fn connection(
        self: &Arc<Self>,
        source: Option<IpAddr>,
    ) -> Result<ConnectionSlot, Exceeded> {
        if !take(&self.connections, self.budgets.max_connections) {
            return Err(Exceeded::Connections);
        }
        let admitted = match self.per_source.lock() {
            Ok(mut map) => {
                let count = map.entry(source).or_insert(0);
                if *count >= self.budgets.max_connections_per_source {
                    false
                } else {
                    *count = count.saturating_add(1);
                    true
                }
            }
            Err(_) => false,
        };
        if !admitted {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Exceeded::ConnectionsPerSource);
        }
        Ok(ConnectionSlot {
            admission: Arc::clone(self),
            source,
        })
    }

    /// Admit one more migration in progress, or refuse.
    pub fn migration(self: &Arc<Self>) -> Result<MigrationSlot, Exceeded> {
        if take(&self.migrations, self.budgets.max_migrations) {
            Ok(MigrationSlot {
                admission: Arc::clone(self),
            })
        } else {
            Err(Exceeded::Migrations)
        }
    }

    #[cfg(test)]
    fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

/// Increment `counter` unless it has reached `max`.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then(|| n.saturating_add(1))
        })
        .is_ok()
}

/// One admitted connection; its place is given back on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    admission: Arc<Admission>,
    source: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.admission.per_source.lock() {
            if let Some(count) = map.get_mut(&self.source) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    map.remove(&self.source);
                }
            }
        }
        self.admission.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted migration; its place is given back on drop.
#[derive(Debug)]
pub struct MigrationSlot {
    admission: Arc<Admission>,
}

impl Drop for MigrationSlot {
    fn drop(&mut self) {
        self.admission.migrations.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_refuse_by_name_and_give_places_back() {
        let admission = Admission::new(Budgets {
            max_migrations: 1,
            max_connections_per_source: 2,
            max_connections: 3,
        });
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        let first = admission.connection(a);
        let second = admission.connection(a);
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(
            admission.connection(a).err(),
            Some(Exceeded::ConnectionsPerSource)
        );
        let third = admission.connection(b);
        assert!(third.is_ok());
        assert_eq!(admission.connection(b).err(), Some(Exceeded::Connections));
        drop(first);
        let again = admission.connection(a);
        assert!(again.is_ok());
        assert_eq!(admission.open_connections(), 3);
        drop((second, third, again));
        assert_eq!(admission.open_connections(), 0);

        let migration = admission.migration();
        assert!(migration.is_ok());
        assert_eq!(admission.migration().err(), Some(Exceeded::Migrations));
        drop(migration);
        assert!(admission.migration().is_ok());
    }
}
