//! What the kernel knows about a relay process: CPU time, memory high-water mark,
//! children, listening sockets. Everything comes from `/proc`, so the relays run unmodified.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BenchError;

/// CPU time of a process in clock ticks, split into its own and its reaped children's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// utime + stime of the process (all its threads, live or exited).
    pub own: u64,
    /// cutime + cstime: children the process has waited for (socat's forked handlers).
    pub children: u64,
}

/// Clock ticks per second for `/proc/PID/stat` (USER_HZ); asked from `getconf`
/// because reading sysconf directly would need unsafe code.
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

fn read_to_string(path: &Path) -> Result<String, BenchError> {
    std::fs::read_to_string(path).map_err(|e| BenchError::Proc {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// utime, stime, cutime, cstime of `/proc/PID/stat`. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted from the last `)`.
pub fn cpu_ticks(pid: u32) -> Result<CpuTicks, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = read_to_string(&path)?;
    let bad = |reason: &str| BenchError::Proc {
        path: path.clone(),
        reason: reason.to_string(),
    };
    let after_comm = text
        .rfind(')')
        .and_then(|i| text.get(i + 1..))
        .ok_or_else(|| bad("no command name"))?;
    // after_comm fields: [0]=state(3) ... [11]=utime(14) [12]=stime(15) [13]=cutime(16) [14]=cstime(17)
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |index: usize| -> Result<u64, BenchError> {
        fields
            .get(index)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| bad("short or malformed stat line"))
    };
    Ok(CpuTicks {
        own: field(11)? + field(12)?,
        children: field(13)? + field(14)?,
    })
}

/// A `Vm*` line of `/proc/PID/status`, in KiB.
pub fn status_kib(pid: u32, key: &str) -> Result<u64, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let text = read_to_string(&path)?;
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .ok_or_else(|| BenchError::Proc {
            path,
            reason: format!("no {key} line"),
        })
}

/// Direct children of a process (from every thread's `children` file).
pub fn children(pid: u32) -> Vec<u32> {
    let mut found = BTreeSet::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    found.into_iter().collect()
}

/// The process and all its descendants, parents first.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut next = 0;
    while let Some(&current) = all.get(next) {
        all.extend(children(current));
        next += 1;
    }
    all
}

/// CPU ticks of a whole process tree: every live process's own time plus the root's
/// reaped children. A child that exited but was not reaped yet still has its stat file.
pub fn tree_cpu_ticks(root: u32) -> Result<u64, BenchError> {
    let mut total = cpu_ticks(root)?.children;
    for pid in tree(root) {
        // A descendant may exit between listing and reading; its time then moves to the
        // parent's children counters, which the caller reads after the tree has settled.
        if let Ok(ticks) = cpu_ticks(pid) {
            total += ticks.own;
        }
    }
    Ok(total)
}

/// Sum of VmHWM over the live tree (KiB).
pub fn tree_hwm_kib(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| status_kib(pid, "VmHWM").ok())
        .sum()
}

/// Sum of VmRSS over the live tree (KiB).
pub fn tree_rss_kib(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| status_kib(pid, "VmRSS").ok())
        .sum()
}

/// Whether some socket listens on 127.0.0.1 / 0.0.0.0 / :: at `port`. Checking `/proc/net`
/// instead of connecting matters: a probe connection would be relayed (socat dials the
/// destination for it) or counted as a stray connection by migproxy.
pub fn is_listening(port: u16) -> bool {
    const TCP_LISTEN: &str = "0A";
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .map(|text| {
                text.lines().skip(1).any(|line| {
                    let mut fields = line.split_whitespace();
                    let local = fields.nth(1).unwrap_or("");
                    let state = fields.nth(1).unwrap_or("");
                    let local_port = local
                        .rsplit(':')
                        .next()
                        .and_then(|hex| u16::from_str_radix(hex, 16).ok());
                    state == TCP_LISTEN && local_port == Some(port)
                })
            })
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_and_memory() {
        let me = std::process::id();
        let mut spin = 0u64;
        for i in 0..5_000_000u64 {
            spin = spin.wrapping_add(i ^ spin.rotate_left(7));
        }
        assert_ne!(spin, 1);
        assert!(status_kib(me, "VmHWM").unwrap_or(0) > 0);
        assert!(status_kib(me, "VmRSS").unwrap_or(0) > 0);
        assert!(cpu_ticks(me).is_ok());
        assert!(status_kib(me, "NoSuchKey").is_err());
    }

    #[test]
    fn listening_socket_is_seen() -> Result<(), std::io::Error> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        assert!(is_listening(port));
        drop(listener);
        assert!(!is_listening(port));
        Ok(())
    }

    #[test]
    fn children_of_a_spawned_process() -> Result<(), std::io::Error> {
        let mut child = std::process::Command::new("sleep").arg("5").spawn()?;
        let me = std::process::id();
        let listed = children(me).contains(&child.id());
        child.kill()?;
        child.wait()?;
        assert!(listed);
        Ok(())
    }
}
