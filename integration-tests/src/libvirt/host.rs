//! One lab host: its libvirtd (configuration, start inside its namespaces, readiness) and `virsh`.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::builds::Libvirt;
use super::command::run_with_deadline;
use super::VIRSH_TIMEOUT;
use crate::qemu::{binaries, repo_root, GuestImage, Version};

/// How long libvirtd may take to answer its first call (it probes the QEMU binary then).
const LIBVIRTD_STARTUP: Duration = Duration::from_secs(90);

/// One libvirt host of the lab.
#[derive(Debug)]
pub struct Host {
    /// `a` or `b`, in names and logs.
    pub label: &'static str,
    pub version: Version,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// The veth end in this host's namespace (interface names are limited to 15 bytes).
    pub(super) veth: String,
    pub(super) dir: PathBuf,
    /// The counting guest, given to every domain with `<qemu:commandline>` (shared by both hosts).
    pub(super) guest: GuestImage,
    pub libvirt: Libvirt,
    pub(super) libvirtd: Option<Child>,
}

impl Host {
    pub(super) fn new(
        label: &'static str,
        tag: &str,
        version: Version,
        ip: Ipv4Addr,
        lab: &Path,
        guest: &GuestImage,
        libvirt: Libvirt,
    ) -> Host {
        Host {
            libvirt,
            label,
            version,
            ip,
            netns: format!("mpvl-{tag}-{label}"),
            veth: format!("mpvl{tag}{label}"),
            dir: lab.join(label),
            guest: guest.clone(),
            libvirtd: None,
        }
    }

    /// `qemu+unix:///system?socket=...`: how virsh and the other host's libvirtd reach this one.
    pub fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.dir.join("sock/libvirt-sock").display()
        )
    }

    /// A command run inside this host's network namespace.
    pub fn command_in(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    /// The command prefix that runs a program inside this host's network namespace.
    pub fn netns_prefix(&self) -> Vec<String> {
        vec![
            "ip".to_owned(),
            "netns".to_owned(),
            "exec".to_owned(),
            self.netns.clone(),
        ]
    }

    fn write_config(&self) -> Result<()> {
        let etc = self.dir.join("etc-libvirt");
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        std::fs::create_dir_all(self.dir.join("sock"))?;
        // libvirt refuses to start when the directory is missing; the TLS scenario fills it.
        std::fs::create_dir_all(self.tls_dir())?;
        let host_number = if self.label == "a" { 1 } else { 2 };
        let libvirtd_conf = format!(
            "unix_sock_dir = \"{sock}\"\n\
             unix_sock_rw_perms = \"0700\"\n\
             auth_unix_rw = \"none\"\n\
             auth_unix_ro = \"none\"\n\
             host_uuid = \"6d696770-726f-7879-6c61-62000000000{host_number}\"\n\
             log_outputs = \"3:file:{log}\"\n",
            sock = self.dir.join("sock").display(),
            log = self.dir.join("libvirtd.log").display(),
        );
        std::fs::write(etc.join("libvirtd.conf"), libvirtd_conf)?;
        // migration_host: the address the destination's libvirt tells the source to migrate to
        // when it picks the port itself (by default it would resolve the machine's hostname).
        let qemu_conf = format!(
            "user = \"root\"\n\
             group = \"root\"\n\
             security_driver = \"none\"\n\
             cgroup_controllers = [ ]\n\
             namespaces = [ ]\n\
             stdio_handler = \"file\"\n\
             migration_host = \"{ip}\"\n\
             migrate_tls_x509_cert_dir = \"{tls}\"\n",
            ip = self.ip,
            tls = self.tls_dir().display(),
        );
        std::fs::write(etc.join("qemu.conf"), qemu_conf)?;
        // libvirtd refuses to start without the `libvirt-qemu` user its package normally creates;
        // it exists only inside this host's mount namespace.
        let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
        let group = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
        std::fs::write(
            self.dir.join("passwd"),
            format!(
                "{passwd}libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
            ),
        )?;
        std::fs::write(
            self.dir.join("group"),
            format!("{group}libvirt-qemu:x:64055:\n"),
        )?;
        Ok(())
    }

    /// Where this host's libvirt finds its migration TLS credentials (QEMU's file names:
    /// ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    pub(super) fn start_libvirtd(&mut self) -> Result<()> {
        self.write_config()?;
        let qemu = binaries()?.path(self.version).to_path_buf();
        let script = repo_root().join("integration-tests/libvirt/host.sh");
        let log_path = self.dir.join("host.log");
        let log = File::create(&log_path)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(["unshare", "-m", "--propagation", "private", "sh"])
            .arg(&script)
            .arg(&self.dir)
            .arg(&qemu)
            .args(match &self.libvirt {
                Libvirt::System => None,
                Libvirt::Unpacked(root) => Some(root),
            })
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting libvirtd (ip netns exec ... unshare ... host.sh)")?;
        self.libvirtd = Some(child);
        Ok(())
    }

    pub(super) fn libvirtd_pid(&self) -> Result<u32> {
        self.libvirtd
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("host {}: libvirtd not started", self.label))
    }

    pub(super) fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + LIBVIRTD_STARTUP;
        loop {
            if let Some(status) = self
                .libvirtd
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                bail!(
                    "host {}: libvirtd exited at start-up ({status}); host.log: {}; libvirtd.log: {}",
                    self.label,
                    std::fs::read_to_string(self.dir.join("host.log")).unwrap_or_default().trim(),
                    log_tail(&self.dir.join("libvirtd.log"))
                );
            }
            // (`virsh version` fails here: it asks for the host architecture's emulator.)
            let out = self.virsh_with_timeout(&["list", "--all"], Duration::from_secs(30));
            match out {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(_) | Err(_) if Instant::now() < deadline => {}
                Ok(out) => bail!(
                    "host {}: libvirtd did not answer within {LIBVIRTD_STARTUP:?}: {}; host.log: {}; \
                     libvirtd.log: {}",
                    self.label,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    std::fs::read_to_string(self.dir.join("host.log")).unwrap_or_default().trim(),
                    log_tail(&self.dir.join("libvirtd.log"))
                ),
                Err(err) => return Err(err),
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `virsh -c URI ARGS...` with [`VIRSH_TIMEOUT`]; the output whatever the exit status.
    pub fn virsh(&self, args: &[&str]) -> Result<Output> {
        self.virsh_with_timeout(args, VIRSH_TIMEOUT)
    }

    fn virsh_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut command = Command::new("virsh");
        command.arg("-c").arg(self.uri()).args(args);
        run_with_deadline(&mut command, &self.dir, timeout)
    }

    /// `virsh ARGS...`, failing with virsh's message when it fails; returns stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.virsh(args)?;
        if !out.status.success() {
            bail!(
                "host {}: virsh {} failed ({}): {}",
                self.label,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(15).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}
