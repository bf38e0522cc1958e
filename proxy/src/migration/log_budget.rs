//! A bounded number of log lines about turned-away connections.
//!
//! A connection closed before anything was dialed (over a budget, stray, a failed source TLS
//! handshake, a self-loop) costs the daemon one accept and one close; without a bound it would
//! also cost one log line, so a peer connecting in a loop could write the log at its accept rate.
//! Each listener logs at most [`LINES_PER_WINDOW`] such lines per [`WINDOW`]; when the budget
//! runs out one line says so, and when that window closes one more says how many were left out
//! (a flood that stops is still accounted for in the log, not only in the metrics). The summary
//! comes from one timer per listener, armed only while something was left out: nothing runs per
//! connection, and nothing runs while the listener is quiet. The metrics
//! (`migproxy_turned_away_total`, `migproxy_connections_total{kind="stray"}`) still count every
//! one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How many lines about turned-away connections one listener logs per [`WINDOW`].
pub const LINES_PER_WINDOW: u32 = 16;

/// The window of [`LINES_PER_WINDOW`].
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct TurnedAwayLog {
    /// Shared with the window's summary timer.
    window: Arc<Mutex<Option<Window>>>,
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

    /// At the end of the window that started at `start`: the connections left out since the
    /// last line, taken (they are reported once). The window is closed, so the next
    /// turned-away connection starts a new one.
    fn close_window(&self, start: Instant) -> u64 {
        let Ok(mut guard) = self.window.lock() else {
            return 0;
        };
        match guard.as_ref() {
            Some(window) if window.start == start => {
                guard.take().map(|window| window.unlogged).unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// When the current window started.
    fn window_start(&self) -> Option<Instant> {
        self.window.lock().ok()?.as_ref().map(|window| window.start)
    }

    /// Note one turned-away connection; true when its own line should be logged (this writes
    /// the lines about the budget itself, and arms the summary at the end of the window).
    pub fn should_log(&self, listen: &str) -> bool {
        match self.admit(Instant::now()) {
            Admit::Log { unlogged: 0 } => true,
            Admit::Log { unlogged } => {
                log_left_out(listen, unlogged);
                true
            }
            Admit::Exhausted => {
                tracing::warn!(%listen, lines = LINES_PER_WINDOW, window_secs = WINDOW.as_secs(), "too many turned-away connections to log one by one: further ones are counted, not logged, for the rest of this {}s window", WINDOW.as_secs());
                self.arm_summary(listen);
                false
            }
            Admit::Skip => false,
        }
    }

    /// The one timer of this listener's window: at its end, log how many were left out. Armed
    /// when the budget runs out, at most once per window; outside a runtime (never in the
    /// daemon) the next logged line carries the count instead.
    fn arm_summary(&self, listen: &str) {
        let (Some(start), Ok(runtime)) =
            (self.window_start(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let log = TurnedAwayLog {
            window: Arc::clone(&self.window),
        };
        let listen = listen.to_owned();
        runtime.spawn(async move {
            tokio::time::sleep_until(start + WINDOW).await;
            let left_out = log.close_window(start);
            if left_out > 0 {
                log_left_out(&listen, left_out);
            }
        });
    }
}

fn log_left_out(listen: &str, unlogged: u64) {
    tracing::warn!(%listen, unlogged, "{unlogged} more connections were turned away without a log line of their own (counted in migproxy_turned_away_total and migproxy_connections_total)");
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

    /// Every turned-away connection of a flood, at one instant: `count` of them.
    fn flood(log: &TurnedAwayLog, count: u64) -> u64 {
        let logged = (0..count).filter(|_| log.should_log("tcp:test")).count();
        u64::try_from(logged).unwrap_or(u64::MAX)
    }

    #[tokio::test(start_paused = true)]
    async fn the_left_out_count_is_reported_when_the_window_closes() -> Result<(), String> {
        let log = TurnedAwayLog::default();
        let logged = flood(&log, 100);
        assert_eq!(logged, u64::from(LINES_PER_WINDOW));
        // The timer is armed: just before the window closes nothing is taken yet.
        tokio::time::sleep(WINDOW - Duration::from_millis(1)).await;
        let start = log.window_start().ok_or("no window is open")?;
        let unlogged = log
            .window
            .lock()
            .map_err(|e| e.to_string())?
            .as_ref()
            .map(|window| window.unlogged);
        assert_eq!(unlogged, Some(100 - logged));
        // When it closes, the summary takes the count and closes the window.
        tokio::time::sleep(Duration::from_millis(2)).await;
        tokio::task::yield_now().await;
        assert!(log.window_start().is_none(), "the window was not closed");
        assert_eq!(log.close_window(start), 0, "the count was reported twice");
        // The next turned-away connection starts a new window, with nothing left over.
        assert_eq!(log.admit(Instant::now()), Admit::Log { unlogged: 0 });
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn no_timer_runs_while_nothing_was_left_out() {
        let log = TurnedAwayLog::default();
        assert_eq!(
            flood(&log, u64::from(LINES_PER_WINDOW)),
            u64::from(LINES_PER_WINDOW)
        );
        // Only the log's own handle holds the window: no summary task was spawned.
        assert_eq!(Arc::strong_count(&log.window), 1);
        flood(&log, 1);
        assert_eq!(
            Arc::strong_count(&log.window),
            2,
            "the summary timer is not armed"
        );
        // Further left-out connections in the same window do not arm a second one.
        flood(&log, 50);
        assert_eq!(Arc::strong_count(&log.window), 2);
        tokio::time::sleep(WINDOW + Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(
            Arc::strong_count(&log.window),
            1,
            "the timer outlived its window"
        );
    }
}
