//! The lab: two hosts in network namespaces joined by a veth pair, torn down by process id.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::builds::Libvirt;
use super::cleanup::{
    append_line, clean_stale_labs, delete_netns, kill_netns_processes, state_dir,
};
use super::command::run_checked;
use super::host::Host;
use super::{HOST_A_IP, HOST_B_IP};
use crate::guest;
use crate::qemu::Version;
use crate::workdir::WorkDir;

/// Labs started by this process so far.
static NEXT_LAB: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// The guest's dirtied window, as in the plain-QEMU scenarios.
const WINDOW_PAGES: u64 = 512;

/// Both hosts, their namespaces and their files.
#[derive(Debug)]
pub struct Lab {
    pub a: Host,
    pub b: Host,
    state_file: PathBuf,
    dir: WorkDir,
}

impl Lab {
    /// Build the usual lab: host a QEMU 7.2, host b QEMU 10.0 on `b_libvirt`.
    pub fn start(b_libvirt: Libvirt) -> Result<Lab> {
        Lab::start_with(Version::V72, Version::V10, b_libvirt)
    }

    /// Build a lab with host a on QEMU `a_version` (system libvirt) and host b on `b_version`
    /// (`b_libvirt`): clean up after crashed runs, create both namespaces, start both libvirtds
    /// and wait until each answers.
    pub fn start_with(a_version: Version, b_version: Version, b_libvirt: Libvirt) -> Result<Lab> {
        check_prerequisites()?;
        clean_stale_labs();
        let dir = WorkDir::new("libvirt-lab")?;
        let pid = std::process::id();
        // Labs of one test process (one per test) get names of their own.
        let seq = NEXT_LAB.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let tag = format!("{}{seq}", pid % 1_000_000);
        let guest = guest::build(dir.path(), WINDOW_PAGES)?;
        let a = Host::new(
            "a",
            &tag,
            a_version,
            HOST_A_IP,
            dir.path(),
            &guest,
            Libvirt::System,
        );
        let b = Host::new(
            "b",
            &tag,
            b_version,
            HOST_B_IP,
            dir.path(),
            &guest,
            b_libvirt,
        );
        let state_file = state_dir()?.join(format!("lab-{pid}-{seq}"));
        // Recorded before anything exists, so a crash at any later point is cleaned up.
        std::fs::write(
            &state_file,
            format!(
                "netns {}\nnetns {}\ndir {}\n",
                a.netns,
                b.netns,
                dir.path().display()
            ),
        )
        .with_context(|| format!("writing {}", state_file.display()))?;
        let mut lab = Lab {
            a,
            b,
            state_file,
            dir,
        };
        lab.create_network()?;
        for host in [&mut lab.a, &mut lab.b] {
            host.start_libvirtd()?;
            append_line(&lab.state_file, &format!("pid {}", host.libvirtd_pid()?))?;
        }
        for host in [&mut lab.a, &mut lab.b] {
            if let Err(err) = host.wait_ready() {
                // Keep the files: libvirtd.log and host.log say why.
                lab.dir.keep();
                return Err(err);
            }
        }
        eprintln!(
            "  libvirt lab: host a {} ({}, libvirt {}), host b {} ({}, libvirt {})",
            lab.a.ip,
            lab.a.version,
            lab.a.libvirt.version(),
            lab.b.ip,
            lab.b.version,
            lab.b.libvirt.version(),
        );
        Ok(lab)
    }

    /// The lab's scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Keep the lab directory (libvirtd and QEMU logs) after a failure.
    pub fn keep(&mut self) {
        self.dir.keep();
    }

    /// Copy both hosts' libvirtd and QEMU logs into `into` as `*.log` (a failed scenario prints them).
    pub fn copy_logs(&self, into: &Path) {
        for host in [&self.a, &self.b] {
            let libvirtd = host.dir.join("libvirtd.log");
            let _ = std::fs::copy(&libvirtd, into.join(format!("libvirtd-{}.log", host.label)));
            let qemu_logs = host.dir.join("var/upper/log/libvirt/qemu");
            let Ok(entries) = std::fs::read_dir(&qemu_logs) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".log") {
                    let _ = std::fs::copy(
                        entry.path(),
                        into.join(format!("qemu-{}-{name}", host.label)),
                    );
                }
            }
        }
    }

    fn create_network(&self) -> Result<()> {
        let (veth_a, veth_b) = (self.a.veth.as_str(), self.b.veth.as_str());
        for host in [&self.a, &self.b] {
            run_checked(Command::new("ip").args(["netns", "add", &host.netns]))?;
        }
        run_checked(Command::new("ip").args([
            "-n",
            &self.a.netns,
            "link",
            "add",
            veth_a,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            &self.b.netns,
        ]))?;
        for (host, veth) in [(&self.a, &veth_a), (&self.b, &veth_b)] {
            let address = format!("{}/24", host.ip);
            run_checked(Command::new("ip").args([
                "-n",
                &host.netns,
                "addr",
                "add",
                &address,
                "dev",
                veth,
            ]))?;
            run_checked(Command::new("ip").args(["-n", &host.netns, "link", "set", veth, "up"]))?;
            run_checked(Command::new("ip").args(["-n", &host.netns, "link", "set", "lo", "up"]))?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in [&mut self.a, &mut self.b] {
            kill_netns_processes(&host.netns);
            if let Some(mut child) = host.libvirtd.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            delete_netns(&host.netns);
        }
        let _ = std::fs::remove_file(&self.state_file);
    }
}

fn check_prerequisites() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("");
    if uid != "0" {
        bail!("the libvirt lab needs root (network and mount namespaces); effective uid is {uid}");
    }
    for (program, package) in [
        ("libvirtd", "libvirt-daemon-driver-qemu"),
        ("virsh", "libvirt-clients"),
        ("ip", "iproute2"),
        ("unshare", "util-linux"),
        ("nft", "nftables"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(program).is_file();
        if !found {
            bail!(
                "{program} not found: install {package} (scripts/debian-packages.txt, scripts/provision.sh)"
            );
        }
    }
    Ok(())
}
