//! Starting, watching and stopping the relay under test.
//!
//! A relay is given as `NAME=COMMAND ARGS...` (split on whitespace). `{listen}` and
//! `{upstream}` in the arguments become the port it must listen on and the destination's
//! port; the same values are in the environment as `MIGBENCH_LISTEN_PORT` and
//! `MIGBENCH_UPSTREAM_PORT` (HAProxy reads them in its configuration file). The name
//! `direct` without a command means no relay at all.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::procfs;
use crate::BenchError;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelaySpec {
    pub name: String,
    /// None: the sender connects straight to the destination.
    pub command: Option<Vec<String>>,
}

impl std::str::FromStr for RelaySpec {
    type Err = BenchError;

    fn from_str(text: &str) -> Result<Self, BenchError> {
        let (name, command) = match text.split_once('=') {
            Some((name, command)) => (
                name.trim(),
                command
                    .split_whitespace()
                    .map(String::from)
                    .collect::<Vec<_>>(),
            ),
            None => (text.trim(), Vec::new()),
        };
        if name.is_empty() {
            return Err(BenchError::Usage(format!("relay {text:?} has no name")));
        }
        if command.is_empty() && name != "direct" {
            return Err(BenchError::Usage(format!(
                "relay {name:?} has no command (only `direct` may omit it)"
            )));
        }
        Ok(RelaySpec {
            name: name.to_string(),
            command: (!command.is_empty()).then_some(command),
        })
    }
}

/// A free loopback port (bound once, then released for the relay to take).
pub fn free_port() -> Result<u16, BenchError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("pick a port"))?;
    Ok(listener
        .local_addr()
        .map_err(BenchError::io("pick a port"))?
        .port())
}

impl RelaySpec {
    pub fn is_direct(&self) -> bool {
        self.command.is_none()
    }

    /// Starts the relay (None for `direct`) and waits until it listens.
    pub fn start(
        &self,
        upstream_port: u16,
        log_dir: &Path,
    ) -> Result<Option<RunningRelay>, BenchError> {
        self.start_within(upstream_port, log_dir, READY_TIMEOUT)
    }

    /// [`Self::start`] with its own deadline for listening: a relay under an
    /// instruction counter (valgrind) starts many times slower than natively.
    pub fn start_within(
        &self,
        upstream_port: u16,
        log_dir: &Path,
        ready_timeout: Duration,
    ) -> Result<Option<RunningRelay>, BenchError> {
        let Some(command) = &self.command else {
            return Ok(None);
        };
        let relay_error = |reason: String| BenchError::Relay {
            name: self.name.clone(),
            reason,
        };
        let listen_port = free_port()?;
        let substitute = |arg: &String| {
            arg.replace("{listen}", &listen_port.to_string())
                .replace("{upstream}", &upstream_port.to_string())
        };
        let argv: Vec<String> = command.iter().map(substitute).collect();
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| relay_error("empty command".into()))?;
        std::fs::create_dir_all(log_dir)
            .map_err(BenchError::io(format!("create {}", log_dir.display())))?;
        let log_path = log_dir.join(format!("{}.log", self.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(BenchError::io(format!("open {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(BenchError::io("dup log"))?;
        let mut child = Command::new(program)
            .args(args)
            .env("MIGBENCH_LISTEN_PORT", listen_port.to_string())
            .env("MIGBENCH_UPSTREAM_PORT", upstream_port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| relay_error(format!("spawn {program}: {e}")))?;
        let deadline = Instant::now() + ready_timeout;
        while !procfs::is_listening(listen_port) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(relay_error(format!(
                    "exited with {status} before listening (see {})",
                    log_path.display()
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(relay_error(format!(
                    "not listening on {listen_port} after {ready_timeout:?} (see {})",
                    log_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Some(RunningRelay {
            name: self.name.clone(),
            pid: child.id(),
            child,
            listen_port,
        }))
    }
}

/// A started relay process; killed (with its descendants) when dropped.
pub struct RunningRelay {
    pub name: String,
    pub pid: u32,
    pub listen_port: u16,
    child: Child,
}

impl RunningRelay {
    /// CPU ticks of the relay and everything it forked.
    pub fn cpu_ticks(&self) -> Result<u64, BenchError> {
        procfs::tree_cpu_ticks(self.pid)
    }

    /// Waits (bounded) until connection handlers the relay forked (socat) have exited and
    /// been reaped, so their CPU time is in the parent's children counters.
    pub fn settle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !procfs::children(self.pid).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn rss_kib(&self) -> u64 {
        procfs::tree_rss_kib(self.pid)
    }

    pub fn hwm_kib(&self) -> u64 {
        procfs::tree_hwm_kib(self.pid)
    }

    /// Samples the tree's peak RSS until stopped (forked handlers vanish with their peak).
    pub fn sample_peak_rss(&self) -> PeakSampler {
        let pid = self.pid;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Acquire) {
                peak = peak.max(procfs::tree_hwm_kib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(procfs::tree_hwm_kib(pid))
        });
        PeakSampler {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) {
        self.kill_tree();
    }

    /// Asks the relay to exit (SIGTERM) and waits for it, so that a wrapper such as
    /// valgrind or `perf stat` writes its counts. The signal goes to the deepest processes
    /// of the tree (the relay under `perf stat` is perf's child; under valgrind it is the
    /// process itself). A relay that outlives `timeout` is killed and reported.
    pub fn terminate(mut self, timeout: Duration) -> Result<std::process::ExitStatus, BenchError> {
        let tree = procfs::tree(self.pid);
        let targets: Vec<u32> = match tree.get(1..) {
            Some(rest) if !rest.is_empty() => rest.to_vec(),
            _ => vec![self.pid],
        };
        for pid in targets {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    self.kill_tree();
                    return Err(BenchError::Relay {
                        name: self.name.clone(),
                        reason: format!("still running {timeout:?} after SIGTERM; killed"),
                    });
                }
                Err(e) => {
                    return Err(BenchError::Relay {
                        name: self.name.clone(),
                        reason: format!("waiting for exit: {e}"),
                    })
                }
            }
        }
    }

    /// SIGTERM first, so a relay that exits cleanly on it (migproxy drains and exits) can write
    /// what it keeps until exit (a profiler's output when run under valgrind); SIGKILL to the
    /// whole tree if it is still there after `grace`.
    pub fn stop_gracefully(mut self, grace: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_tree();
    }

    fn kill_tree(&mut self) {
        // Children first so none is re-parented and left behind; std only sends SIGKILL
        // to the direct child, so descendants are signalled with kill(1).
        for pid in procfs::tree(self.pid).into_iter().skip(1).rev() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill_tree();
        }
    }
}

pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl PeakSampler {
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or(0)
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() -> Result<(), BenchError> {
        let direct: RelaySpec = "direct".parse()?;
        assert!(direct.is_direct());
        let socat: RelaySpec =
            "socat=socat -b 1048576 TCP-LISTEN:{listen} TCP:127.0.0.1:{upstream}".parse()?;
        assert_eq!(socat.name, "socat");
        assert_eq!(socat.command.as_ref().map(Vec::len), Some(5));
        assert!("nocommand".parse::<RelaySpec>().is_err());
        assert!("=socat".parse::<RelaySpec>().is_err());
        Ok(())
    }
}
