//! Which libvirt a lab host runs: the system's, or a privately unpacked build.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use super::command::run_with_deadline;
use crate::qemu::repo_root;

/// Which libvirt a host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Libvirt {
    /// The system's (Debian 12: 9.0).
    System,
    /// A privately unpacked tree (scripts/provision-libvirt.sh), run inside the host's namespace.
    Unpacked(PathBuf),
}

impl Libvirt {
    /// libvirt 11.3 from bookworm-backports: `$MIGPROXY_LIBVIRT113`, else what
    /// scripts/provision-libvirt.sh unpacks (it prints `LIBVIRT113=PATH` last).
    pub fn v11_3() -> Result<Libvirt> {
        let script = repo_root().join("scripts/provision-libvirt.sh");
        let mut command = Command::new("bash");
        command.arg(&script);
        let scratch = std::env::temp_dir();
        let out = run_with_deadline(&mut command, &scratch, Duration::from_secs(600))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let root = stdout
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("LIBVIRT113="))
            .ok_or_else(|| anyhow!("{} printed no LIBVIRT113= line", script.display()))?;
        Ok(Libvirt::Unpacked(PathBuf::from(root.trim())))
    }

    /// `libvirtd --version` of this build.
    pub fn version(&self) -> String {
        let mut command = match self {
            Libvirt::System => Command::new("libvirtd"),
            Libvirt::Unpacked(root) => {
                let mut command = Command::new(root.join("usr/sbin/libvirtd"));
                command.env("LD_LIBRARY_PATH", root.join("usr/lib/x86_64-linux-gnu"));
                command
            }
        };
        command
            .arg("--version")
            .output()
            .map(|out| {
                let text = String::from_utf8_lossy(&out.stdout);
                text.split_whitespace()
                    .last()
                    .unwrap_or("unknown")
                    .to_owned()
            })
            .unwrap_or_else(|err| format!("unknown ({err})"))
    }
}
