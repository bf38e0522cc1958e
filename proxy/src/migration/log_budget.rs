//! A bounded number of log lines about turned-away connections.
//!
//! A connection closed before anything was dialed (over a budget, stray, a failed source TLS
//! handshake, a self-loop) costs the daemon one accept and one close; without a bound it would
//! also cost one log line, so a peer connecting in a loop could write the log at its accept rate.
//! Each listener logs at most [`LINES_PER_WINDOW`] such lines per [`WINDOW`]; when the budget
//! runs out one line says so, and the next line logged after the window says how many were
//! left out. The metrics (`migproxy_turned_away_total`, `migproxy_connections_total{kind="stray"}`)
//! still count every one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many lines about turned-away connections one listener logs per [`WINDOW`].
pub const LINES_PER_WINDOW: u32 = 16;

/// The window of [`LINES_PER_WINDOW`].
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct TurnedAwayLog {
    window: Mutex<Option<Window>>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    /// Connections turned away without a line since the last line logged.
    unlogged: u64,
}

/// Whether a turned-away connection gets its own line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log it; `unlogged` connections before it were counted without a line.
    Log { unlogged: u64 },
    /// The budget just ran out: say so once, and do not log this one.
    Exhausted,
    /// Count it only.
    Skip,
}

impl TurnedAwayLog {
    /// Note one turned-away connection at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        let Ok(mut guard) = self.window.lock() else {
            // A poisoned lock: another thread panicked while logging; stay quiet.
            return Admit::Skip;
        };
        let window = guard.get_or_insert(Window {
            start: now,
            logged: 0,
            unlogged: 0,
        });
        if now.saturating_duration_since(window.start) >= WINDOW {
            window.start = now;
            window.logged = 0;
        }
        if window.logged < LINES_PER_WINDOW {
            window.logged += 1;
            let unlogged = std::mem::take(&mut window.unlogged);
            return Admit::Log { unlogged };
        }
        window.unlogged = window.unlogged.saturating_add(1);
        if window.unlogged == 1 {
            Admit::Exhausted
        } else {
            Admit::Skip
        }
    }

    /// Note one turned-away connection; true when its own line should be logged (this writes
    /// the lines about the budget itself).
    pub fn should_log(&self, listen: &str) -> bool {
        match self.admit(Instant::now()) {
            Admit::Log { unlogged: 0 } => true,
            Admit::Log { unlogged } => {
                tracing::warn!(%listen, unlogged, "{unlogged} more connections were turned away without a log line of their own (counted in migproxy_turned_away_total and migproxy_connections_total)");
                true
            }
            Admit::Exhausted => {
                tracing::warn!(%listen, lines = LINES_PER_WINDOW, window_secs = WINDOW.as_secs(), "too many turned-away connections to log one by one: further ones are counted, not logged, for the rest of this {}s window", WINDOW.as_secs());
                false
            }
            Admit::Skip => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_a_bounded_number_per_window_and_counts_the_rest() {
        let log = TurnedAwayLog::default();
        let start = Instant::now();
        let admits: Vec<Admit> = (0..1000).map(|_| log.admit(start)).collect();
        let logged = admits
            .iter()
            .filter(|a| matches!(a, Admit::Log { .. }))
            .count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        assert_eq!(admits.iter().filter(|a| **a == Admit::Exhausted).count(), 1);
        // The next window: the first line says how many went unlogged.
        assert_eq!(
            log.admit(start + WINDOW),
            Admit::Log {
                unlogged: 1000 - u64::from(LINES_PER_WINDOW)
            }
        );
        assert_eq!(log.admit(start + WINDOW), Admit::Log { unlogged: 0 });
    }
}
