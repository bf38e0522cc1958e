//! Leftovers of crashed labs: each lab records its namespaces, libvirtd ids and directory in a
//! state file first; the next lab kills what is left of a dead run by process id.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Where each lab records its namespaces and libvirtd ids (`lab-TESTPID`).
pub(super) fn state_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join("mpit-libvirt-state");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Tear down every lab whose test process no longer exists: kill the processes in its
/// namespaces and its recorded libvirtds by id, delete the namespaces, forget the record.
pub(super) fn clean_stale_labs() {
    let Ok(dir) = state_dir() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // lab-PID-SEQ
        let Some(owner) = name
            .strip_prefix("lab-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if owner.parse::<u32>().is_err() || Path::new("/proc").join(owner).exists() {
            continue;
        }
        let record = std::fs::read_to_string(entry.path()).unwrap_or_default();
        eprintln!("  libvirt lab: cleaning up after crashed run {owner}");
        for line in record.lines() {
            match line.split_once(' ') {
                Some(("netns", netns)) => {
                    kill_netns_processes(netns);
                    delete_netns(netns);
                }
                Some(("pid", pid)) => kill_if_lab_process(pid),
                Some(("dir", path)) => remove_lab_dir(Path::new(path)),
                _ => {}
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

/// SIGKILL every process in `netns` (libvirtd, its QEMUs, proxies), by id, and wait until none is left.
pub(super) fn kill_netns_processes(netns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = netns_pids(netns);
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in &pids {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn netns_pids(netns: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A recorded libvirtd launcher id is killed only while it still is one (ids get reused).
fn kill_if_lab_process(pid: &str) {
    if !pid.bytes().all(|b| b.is_ascii_digit()) {
        return;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("libvirtd") || cmdline.contains("host.sh") {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// A crashed lab's scratch directory (overlay upper dirs, logs), only if it is one.
fn remove_lab_dir(path: &Path) {
    let is_lab_dir = path.parent() == Some(std::env::temp_dir().as_path())
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("mpit-libvirt-lab-"));
    if is_lab_dir {
        let _ = std::fs::remove_dir_all(path);
    }
}

pub(super) fn delete_netns(netns: &str) {
    if Path::new("/run/netns").join(netns).exists() {
        let _ = Command::new("ip").args(["netns", "del", netns]).status();
    }
}

pub(super) fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("writing {}", path.display()))
}
