//! The three QEMU builds and guarded QEMU processes.
//!
//! Binaries come from `MIGPROXY_QEMU10` / `MIGPROXY_QEMU72` / `MIGPROXY_QEMU111`, else from
//! `scripts/provision-qemu.sh`, which installs or checks them and prints `QEMU10=...`,
//! `QEMU72=...` and `QEMU111=...` on its last lines. 11.1 is a wrapper script that starts the
//! privately unpacked build through its own loader; to the harness it is just a binary.
//! Every VM is started with `-nodefaults` (QEMU 7.2 unpacked outside the system lacks the NIC
//! ROMs its default devices want) and killed when its [`Vm`] is dropped, panics included.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::qmp::Qmp;
use crate::workdir::WorkDir;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// QEMU 7.2 (Debian bookworm).
    V72,
    /// QEMU 10.0 (Debian bookworm-backports).
    V10,
    /// QEMU 11.1 (Debian trixie-backports, unpacked privately).
    V111,
}

impl Version {
    /// Every build, oldest first.
    pub const ALL: [Version; 3] = [Version::V72, Version::V10, Version::V111];

    /// Short tag used in file and vector names (`q72`, `q10`, `q111`).
    pub fn tag(self) -> &'static str {
        match self {
            Version::V72 => "q72",
            Version::V10 => "q10",
            Version::V111 => "q111",
        }
    }

    /// `major.minor` (`7.2`, `10.0`, `11.1`).
    pub fn number(self) -> &'static str {
        match self {
            Version::V72 => "7.2",
            Version::V10 => "10.0",
            Version::V111 => "11.1",
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QEMU {}", self.number())
    }
}

#[derive(Debug, Clone)]
pub struct Binaries {
    pub qemu10: PathBuf,
    pub qemu72: PathBuf,
    pub qemu111: PathBuf,
}

impl Binaries {
    pub fn path(&self, version: Version) -> &Path {
        match version {
            Version::V72 => &self.qemu72,
            Version::V10 => &self.qemu10,
            Version::V111 => &self.qemu111,
        }
    }
}

/// The repository root (this crate lives in `integration-tests/`).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// Find both binaries once per process.
pub fn binaries() -> Result<&'static Binaries> {
    static FOUND: OnceLock<std::result::Result<Binaries, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_binaries().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn find_binaries() -> Result<Binaries> {
    let env10 = std::env::var_os("MIGPROXY_QEMU10").map(PathBuf::from);
    let env72 = std::env::var_os("MIGPROXY_QEMU72").map(PathBuf::from);
    let env111 = std::env::var_os("MIGPROXY_QEMU111").map(PathBuf::from);
    if let (Some(qemu10), Some(qemu72), Some(qemu111)) = (env10, env72, env111) {
        return Ok(Binaries {
            qemu10,
            qemu72,
            qemu111,
        });
    }
    let script = repo_root().join("scripts/provision-qemu.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): cannot run real-QEMU tests without the three QEMU builds",
            script.display(),
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| {
        stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| PathBuf::from(v.trim()))
            .ok_or_else(|| anyhow!("{} printed no {key} line", script.display()))
    };
    Ok(Binaries {
        qemu10: value("QEMU10=")?,
        qemu72: value("QEMU72=")?,
        qemu111: value("QEMU111=")?,
    })
}

/// A flat guest binary and the guest-physical address it is loaded and started at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub path: PathBuf,
    pub load_addr: u64,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub version: Version,
    pub machine: String,
    pub cpu: String,
    pub smp: u32,
    pub mem_mib: u32,
    /// Guest code for `-device loader` (started on vCPU 0); `None`: no guest code.
    pub guest: Option<GuestImage>,
    /// Start paused (`-S`).
    pub paused: bool,
    /// Wait for an incoming migration (`-incoming defer`).
    pub incoming: bool,
    pub extra_args: Vec<String>,
}

impl VmConfig {
    pub fn new(version: Version, machine: &str, cpu: &str) -> VmConfig {
        VmConfig {
            version,
            machine: machine.to_owned(),
            cpu: cpu.to_owned(),
            smp: 2,
            mem_mib: 64,
            guest: None,
            paused: false,
            incoming: false,
            extra_args: Vec::new(),
        }
    }

    /// The same configuration as a destination: paused until the migration arrives.
    pub fn as_incoming(&self) -> VmConfig {
        VmConfig {
            guest: None,
            paused: false,
            incoming: true,
            ..self.clone()
        }
    }

    /// One line for logs and vector READMEs.
    pub fn describe(&self) -> String {
        format!(
            "{} -M {} -cpu {} -smp {} -m {}",
            self.version, self.machine, self.cpu, self.smp, self.mem_mib
        )
    }
}

/// A running QEMU, its QMP connection and its log file. Killed on drop.
#[derive(Debug)]
pub struct Vm {
    pub name: String,
    pub config: VmConfig,
    pub qmp: Qmp,
    child: Child,
    stderr_path: PathBuf,
    command_line: String,
}

impl Vm {
    pub fn spawn(workdir: &WorkDir, name: &str, config: &VmConfig) -> Result<Vm> {
        let binary = binaries()?.path(config.version).to_path_buf();
        let qmp_path = workdir.join(&format!("{name}.qmp"));
        let stderr_path = workdir.join(&format!("{name}.log"));
        let mut args: Vec<String> = vec![
            "-M".into(),
            config.machine.clone(),
            "-cpu".into(),
            config.cpu.clone(),
            "-smp".into(),
            config.smp.to_string(),
            "-m".into(),
            config.mem_mib.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
        ];
        if config.paused {
            args.push("-S".into());
        }
        if config.incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        if let Some(guest) = &config.guest {
            args.extend([
                "-device".into(),
                format!(
                    "loader,file={},addr={:#x},cpu-num=0",
                    guest.path.display(),
                    guest.load_addr
                ),
            ]);
        }
        args.extend(config.extra_args.iter().cloned());
        let command_line = format!("{} {}", binary.display(), args.join(" "));
        let log = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let log_out = log.try_clone().context("cloning the log file")?;
        let child = Command::new(&binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log_out)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {command_line}"))?;
        let mut guard = ChildGuard(Some(child));
        let qmp = connect_when_ready(&qmp_path, &mut guard, &stderr_path)
            .with_context(|| format!("{name}: {command_line}"))?;
        let child = guard
            .0
            .take()
            .ok_or_else(|| anyhow!("{name}: child vanished"))?;
        Ok(Vm {
            name: name.to_owned(),
            config: config.clone(),
            qmp,
            child,
            stderr_path,
            command_line,
        })
    }

    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// What QEMU printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `Some(exit status)` once QEMU has exited.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.child.try_wait().context("checking the QEMU process")
    }

    /// Wait (with a deadline) for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill now (a destination dying mid-migration).
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().context("killing QEMU")?;
        self.child.wait().context("reaping QEMU")?;
        Ok(())
    }

    /// Ask QEMU to quit and reap it (falls back to kill on drop).
    pub fn quit(mut self) -> Result<()> {
        let _ = self.qmp.execute("quit", serde_json::json!({}));
        self.wait_exit(Duration::from_secs(10)).map(|_| ())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Kills a child that never became a [`Vm`] (QMP never came up).
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn connect_when_ready(qmp_path: &Path, guard: &mut ChildGuard, log: &Path) -> Result<Qmp> {
    let deadline = Instant::now() + crate::STARTUP_TIMEOUT;
    loop {
        if let Some(child) = guard.0.as_mut() {
            if let Some(status) = child.try_wait().context("checking QEMU")? {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                bail!("QEMU exited at start-up ({status}): {}", text.trim());
            }
        }
        if qmp_path.exists() {
            match Qmp::connect(qmp_path) {
                Ok(qmp) => return Ok(qmp),
                Err(err) if Instant::now() >= deadline => return Err(err),
                Err(_) => {}
            }
        }
        if Instant::now() >= deadline {
            bail!("no QMP socket at {} after start-up", qmp_path.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
}
