//! A two-host libvirt lab on one machine, for `virsh migrate` through migproxy.
//!
//! Each "host" is a network namespace (joined to the other by a veth pair, [`HOST_A_IP`] and
//! [`HOST_B_IP`]) running `libvirtd` in the foreground, without systemd, inside a private mount
//! namespace set up by `integration-tests/libvirt/host.sh`: its own `/run`, an overlay on `/var`,
//! its own `/etc/libvirt` (socket directory, a `host_uuid` per host so libvirt does not refuse a
//! migration "to the same host", root QEMUs without cgroups or namespaces) and a `libvirt-qemu`
//! user that exists only there. Host A runs QEMU 7.2 and the system's libvirt (Debian 12: 9.0),
//! host B QEMU 10.0 and either the system's libvirt or a privately unpacked one ([`Libvirt`],
//! scripts/provision-libvirt.sh: 11.3). Both QEMUs sit at the same
//! `<emulator>` path ([`EMULATOR`]), so a domain migrates between QEMU builds exactly as it would
//! between two upgraded and not-yet-upgraded hypervisors.
//!
//! Nothing outlives the lab: dropping it kills every process in both namespaces by id and deletes
//! the namespaces. The namespaces and the libvirtd ids are recorded in a state file first, so the
//! next lab cleans up after a run that crashed (or was killed) before it could tear down.
//! Needs root, `libvirtd`/`virsh` (libvirt-daemon-driver-qemu, libvirt-clients), `ip`, `unshare`
//! and `nft` (scripts/debian-packages.txt).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::guest;
use crate::qemu::{binaries, repo_root, GuestImage, Version};
use crate::workdir::WorkDir;

/// Host A's address (QEMU 7.2).
pub const HOST_A_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// Host B's address (QEMU 10.0).
pub const HOST_B_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
/// The `<emulator>` of every lab domain: each host's own QEMU build, placed by host.sh.
pub const EMULATOR: &str = "/run/migproxy-lab/qemu-system-aarch64";
/// libvirt's default migration port range (qemu.conf `migration_port_min`/`_max`), which the lab
/// keeps, as OpenStack Nova does.
pub const MIGRATION_PORTS: (u16, u16) = (49152, 49215);
/// Labs started by this process so far.
static NEXT_LAB: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// How long libvirtd may take to answer its first call (it probes the QEMU binary then).
const LIBVIRTD_STARTUP: Duration = Duration::from_secs(90);
/// How long one `virsh` call may take, `virsh migrate` of the small test guest included.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a guest may take to show it runs.
const LIVENESS: Duration = Duration::from_secs(20);
/// The guest's dirtied window, as in the plain-QEMU scenarios.
const WINDOW_PAGES: u64 = 512;

/// One libvirt host of the lab.
#[derive(Debug)]
pub struct Host {
    /// `a` or `b`, in names and logs.
    pub label: &'static str,
    pub version: Version,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// The veth end in this host's namespace (interface names are limited to 15 bytes).
    veth: String,
    dir: PathBuf,
    /// The counting guest, given to every domain with `<qemu:commandline>` (shared by both hosts).
    guest: GuestImage,
    pub libvirt: Libvirt,
    libvirtd: Option<Child>,
}

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

/// Both hosts, their namespaces and their files.
#[derive(Debug)]
pub struct Lab {
    pub a: Host,
    pub b: Host,
    state_file: PathBuf,
    dir: WorkDir,
}

impl Lab {
    /// Build the lab: clean up after crashed runs, create both namespaces, start both libvirtds
    /// and wait until each answers.
    pub fn start(b_libvirt: Libvirt) -> Result<Lab> {
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
            Version::V72,
            HOST_A_IP,
            dir.path(),
            &guest,
            Libvirt::System,
        );
        let b = Host::new(
            "b",
            &tag,
            Version::V10,
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

impl Host {
    fn new(
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

    fn start_libvirtd(&mut self) -> Result<()> {
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

    fn libvirtd_pid(&self) -> Result<u32> {
        self.libvirtd
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("host {}: libvirtd not started", self.label))
    }

    fn wait_ready(&mut self) -> Result<()> {
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

    /// Define and start a domain running the counting guest; returns once it counts.
    pub fn start_domain(&self, name: &str) -> Result<()> {
        let xml_path = self.dir.join(format!("{name}.xml"));
        std::fs::write(&xml_path, domain_xml(name, &self.guest))?;
        self.virsh_ok(&["define", &xml_path.display().to_string()])?;
        self.virsh_ok(&["start", name])?;
        guest_counter_above(self, name, 0).context("the guest never started counting")?;
        Ok(())
    }

    /// The guest's counter, read with `virsh qemu-monitor-command --hmp DOMAIN 'xp ...'`.
    pub fn counter(&self, domain: &str) -> Result<u64> {
        let command = format!("xp /1gx {:#x}", guest::COUNTER_ADDR);
        let out = self.virsh_ok(&["qemu-monitor-command", "--hmp", domain, &command])?;
        // "0000000040280000: 0x000000000123abcd"
        let value = out
            .split_once(": ")
            .map(|(_, v)| v.trim())
            .and_then(|v| v.strip_prefix("0x"))
            .ok_or_else(|| anyhow!("host {}: unexpected xp output {out:?}", self.label))?;
        u64::from_str_radix(value, 16)
            .with_context(|| format!("host {}: unexpected xp output {out:?}", self.label))
    }

    /// The guest runs here: the domain is `running` and its counter advances twice.
    pub fn assert_running(&self, domain: &str) -> Result<u64> {
        let state = self.domain_state(domain)?;
        if state != "running" {
            bail!(
                "host {}: domain {domain} is {state}, expected running",
                self.label
            );
        }
        let first = self.counter(domain)?;
        let second = guest_counter_above(self, domain, first)?;
        guest_counter_above(self, domain, second)
    }

    /// `virsh domstate`, or `absent` when the host has no such domain.
    pub fn domain_state(&self, domain: &str) -> Result<String> {
        let out = self.virsh(&["domstate", domain])?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("failed to get domain") {
                return Ok("absent".to_owned());
            }
            bail!(
                "host {}: virsh domstate {domain}: {}",
                self.label,
                stderr.trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Whether the domain is defined here (running or not).
    pub fn has_domain(&self, domain: &str) -> Result<bool> {
        let names = self.virsh_ok(&["list", "--all", "--name"])?;
        Ok(names.lines().any(|line| line.trim() == domain))
    }

    /// Stop and undefine the domain if it exists here.
    pub fn remove_domain(&self, domain: &str) {
        let _ = self.virsh(&["destroy", domain]);
        let _ = self.virsh(&["undefine", domain]);
    }
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(15).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn guest_counter_above(host: &Host, domain: &str, above: u64) -> Result<u64> {
    let deadline = Instant::now() + LIVENESS;
    loop {
        let value = host.counter(domain)?;
        if value > above {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!(
                "host {}: guest counter of {domain} stuck at {value} (wanted > {above}) for {LIVENESS:?}",
                host.label
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A `type='qemu'` domain like the plain-QEMU scenarios' VMs: `virt-7.2`, a64fx, 2 vCPUs, 64 MiB,
/// no devices, the counting guest loaded at its fixed address and started on vCPU 0.
pub fn domain_xml(name: &str, guest: &GuestImage) -> String {
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>2</vcpu>
  <os><type arch='aarch64' machine='virt-7.2'>hvm</type></os>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>a64fx</model></cpu>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='loader,file={guest},addr={load:#x},cpu-num=0'/>
  </qemu:commandline>
</domain>
",
        mem = crate::scenario::E2E_MEM_MIB,
        guest = guest.path.display(),
        load = guest.load_addr,
    )
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

/// Where each lab records its namespaces and libvirtd ids (`lab-TESTPID`).
fn state_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join("mpit-libvirt-state");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Tear down every lab whose test process no longer exists: kill the processes in its
/// namespaces and its recorded libvirtds by id, delete the namespaces, forget the record.
fn clean_stale_labs() {
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
fn kill_netns_processes(netns: &str) {
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

fn delete_netns(netns: &str) {
    if Path::new("/run/netns").join(netns).exists() {
        let _ = Command::new("ip").args(["netns", "del", netns]).status();
    }
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("writing {}", path.display()))
}

fn run_checked(command: &mut Command) -> Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Run `command` to completion within `timeout` (killed after it), output captured in files
/// under `scratch` so a chatty child can never block on a full pipe.
pub fn run_with_deadline(
    command: &mut Command,
    scratch: &Path,
    timeout: Duration,
) -> Result<Output> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path = scratch.join(format!(".cmd-{n}.out"));
    let err_path = scratch.join(format!(".cmd-{n}.err"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok(output)
}

impl Host {
    /// Load `deploy/nftables/FILE` as is into this host's namespace, with `defines` replacing the
    /// values of its `define` lines. Every define of the file must be given (a renamed or added
    /// define fails here, not silently in the ruleset). The table goes with the namespace.
    pub fn load_ruleset(&self, file: &str, defines: &[(&str, String)]) -> Result<()> {
        let path = repo_root().join("deploy/nftables").join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut ruleset = String::new();
        let mut replaced = Vec::new();
        for line in text.lines() {
            let name = line
                .strip_prefix("define ")
                .and_then(|rest| rest.split_once(" = "))
                .map(|(name, _)| name.trim());
            match name {
                Some(name) => {
                    let (_, value) = defines
                        .iter()
                        .find(|(wanted, _)| *wanted == name)
                        .ok_or_else(|| {
                            anyhow!("{}: no test value for define {name}", path.display())
                        })?;
                    ruleset.push_str(&format!("define {name} = {value}\n"));
                    replaced.push(name.to_owned());
                }
                None => {
                    ruleset.push_str(line);
                    ruleset.push('\n');
                }
            }
        }
        if replaced.len() != defines.len() {
            bail!(
                "{}: defines {replaced:?}, the test sets {:?}",
                path.display(),
                defines.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
        }
        let rules_path = self.dir.join(file);
        std::fs::write(&rules_path, &ruleset)?;
        let out = self
            .command_in("nft")
            .arg("-f")
            .arg(&rules_path)
            .output()
            .context("running nft")?;
        if !out.status.success() {
            bail!(
                "host {}: nft -f {} failed: {}\n{ruleset}",
                self.label,
                rules_path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}
