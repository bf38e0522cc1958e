//! One progress line on standard error while a long stream is decoded, only when standard error
//! is a terminal (logs and pipes stay clean).

use std::io::IsTerminal;

/// Redrawn every [`Progress::STEP`] bytes of stream; the line is cleared at the end.
pub struct Progress {
    label: &'static str,
    enabled: bool,
    total: Option<u64>,
    last_shown: u64,
}

impl Progress {
    const STEP: u64 = 8 << 20;

    /// `label` starts the line (`inspect`, `rewrite`); `total` is the input's size when known.
    pub fn new(label: &'static str, total: Option<u64>) -> Progress {
        Progress {
            label,
            enabled: std::io::stderr().is_terminal(),
            total,
            last_shown: 0,
        }
    }

    pub fn update(&mut self, offset: u64) {
        if !self.enabled || offset < self.last_shown.saturating_add(Self::STEP) {
            return;
        }
        self.last_shown = offset;
        let mib = offset / (1 << 20);
        match self.total {
            Some(total) if total > 0 => {
                let percent = offset.saturating_mul(100) / total;
                eprint!(
                    "\r{}: {mib} MiB of {} MiB ({percent}%)",
                    self.label,
                    total / (1 << 20)
                );
            }
            _ => eprint!("\r{}: {mib} MiB", self.label),
        }
    }

    /// Clear the line, so what is printed next starts clean.
    pub fn finish(&self) {
        if self.enabled && self.last_shown > 0 {
            eprint!("\r\x1b[K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_silent_off_a_terminal() {
        let mut p = Progress {
            label: "rewrite",
            enabled: false,
            total: Some(100),
            last_shown: 0,
        };
        p.update(1 << 30);
        assert_eq!(p.last_shown, 0);
    }
}
