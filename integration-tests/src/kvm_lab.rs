//! The KVM lab: emulated ARM64 KVM hosts, each an outer `qemu-system-aarch64` under TCG
//! (`-M virt,virtualization=on`, so the host kernel runs at EL2 and offers `/dev/kvm`), booting
//! one of the Debian kernels `scripts/provision-kvm-lab.sh` provisions.
//!
//! Everything is driven from this (x86) side over ports the outer QEMU forwards from 127.0.0.1:
//! - [`CONTROL_PORT`]: the host's `/init` serves a shell there, one connection at a time
//!   ([`Host::sh`]: send a script, half-close, read the output to the end);
//! - [`INNER_QMP_PORT`]: the inner QEMU's QMP (`-qmp tcp:...`), driven with [`crate::qmp::Qmp`];
//! - [`INNER_INCOMING_PORT`]: the inner QEMU's `-incoming` port, so a migration can arrive.
//!
//! Outgoing migrations of an inner QEMU go to `tcp:10.0.2.2:PORT`, which user-mode networking
//! connects to this machine's 127.0.0.1:PORT: a listener here (stream capture), another host's
//! forwarded incoming port (direct migration), or `migproxy run` in between.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::guest::CountingGuest;
use crate::qmp::Qmp;
use crate::workdir::WorkDir;

/// The port of the host's control shell (`integration-tests/kvm-lab/init`).
pub const CONTROL_PORT: u16 = 5555;
/// The port the inner QEMU listens on for an incoming migration.
pub const INNER_INCOMING_PORT: u16 = 4444;
/// The inner QEMU's QMP port.
pub const INNER_QMP_PORT: u16 = 4445;
/// How long an emulated host may take from start to its READY line (TCG, shared 2 cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one control-shell script may run.
pub const SHELL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an inner QEMU may take to answer QMP.
pub const INNER_STARTUP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one migration between emulated hosts may take.
pub const LAB_MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest output a control-shell script may return (profiles are ~50 KiB).
const SHELL_OUTPUT_BUDGET: u64 = 8 << 20;

/// One kernel series the lab provides.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// "6.1", "6.12", "7.3".
    pub series: String,
    /// `uname -r` of the build.
    pub release: String,
    /// The Debian package and exact version it came from.
    pub package: String,
    pub image: PathBuf,
    pub modules: PathBuf,
}

/// What `scripts/provision-kvm-lab.sh` provisioned (its `manifest.txt`).
#[derive(Debug, Clone)]
pub struct Lab {
    pub base_initrd: PathBuf,
    pub base_package: String,
    pub kernels: Vec<Kernel>,
    /// migproxy cross-compiled for aarch64.
    pub migproxy_aarch64: PathBuf,
}

impl Lab {
    /// The lab, provisioned once per process: `$MIGPROXY_KVMLAB/manifest.txt` when set (the test
    /// command exports it), else by running the provisioning script.
    pub fn get() -> Result<&'static Lab> {
        static LAB: OnceLock<std::result::Result<Lab, String>> = OnceLock::new();
        LAB.get_or_init(|| Lab::provision().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn provision() -> Result<Lab> {
        let dir = match std::env::var_os("MIGPROXY_KVMLAB") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let script = crate::qemu::repo_root().join("scripts/provision-kvm-lab.sh");
                let out = Command::new("bash")
                    .arg(&script)
                    .stdin(Stdio::null())
                    .stderr(Stdio::inherit())
                    .output()
                    .with_context(|| format!("running {}", script.display()))?;
                if !out.status.success() {
                    bail!("{} failed ({}): no KVM lab", script.display(), out.status);
                }
                let stdout = String::from_utf8_lossy(&out.stdout);
                stdout
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("KVMLAB="))
                    .map(|v| PathBuf::from(v.trim()))
                    .ok_or_else(|| anyhow!("{} printed no KVMLAB= line", script.display()))?
            }
        };
        let manifest = dir.join("manifest.txt");
        let text = std::fs::read_to_string(&manifest)
            .with_context(|| format!("reading {}", manifest.display()))?;
        Lab::parse(&text).with_context(|| format!("parsing {}", manifest.display()))
    }

    fn parse(text: &str) -> Result<Lab> {
        let mut base = None;
        let mut migproxy = None;
        let mut kernels = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["base", path, package @ ..] => {
                    base = Some((PathBuf::from(path), package.join(" ")))
                }
                ["kernel", series, release, image, modules, package @ ..] => kernels.push(Kernel {
                    series: (*series).to_owned(),
                    release: (*release).to_owned(),
                    image: PathBuf::from(image),
                    modules: PathBuf::from(modules),
                    package: package.join(" "),
                }),
                ["migproxy", path] => migproxy = Some(PathBuf::from(path)),
                _ => bail!("unexpected line {line:?}"),
            }
        }
        let (base_initrd, base_package) = base.ok_or_else(|| anyhow!("no base line"))?;
        Ok(Lab {
            base_initrd,
            base_package,
            kernels,
            migproxy_aarch64: migproxy.ok_or_else(|| anyhow!("no migproxy line"))?,
        })
    }

    /// The kernel of `series`, or an error naming it.
    /// The upstream version of the inner QEMU in the base initramfs (`1:10.0.13+ds-0+deb13u1`
    /// gives `10.0.13`), as `profile capture --qemu-version` wants it.
    pub fn inner_qemu_version(&self) -> Result<String> {
        let mut words = self.base_package.split_whitespace();
        while let Some(word) = words.next() {
            if word == "qemu-system-arm" {
                let debian = words.next().unwrap_or_default();
                let upstream = debian.split_once(':').map_or(debian, |(_, v)| v);
                let version = upstream.split(['+', '-']).next().unwrap_or_default();
                if !version.is_empty() {
                    return Ok(version.to_string());
                }
            }
        }
        bail!(
            "the lab's base names no qemu-system-arm version: {}",
            self.base_package
        )
    }

    pub fn kernel(&self, series: &str) -> Result<&Kernel> {
        self.kernels
            .iter()
            .find(|k| k.series == series)
            .ok_or_else(|| anyhow!("the KVM lab has no kernel series {series}"))
    }

    /// The initrd for one host: the cached base, the kernel's modules, and a top layer with the
    /// aarch64 migproxy and the counting guest (the kernel unpacks concatenated archives).
    pub fn initrd(&self, dir: &WorkDir, kernel: &Kernel, guest: &Path) -> Result<PathBuf> {
        let top = dir.join("top");
        std::fs::create_dir_all(top.join("usr/bin")).context("creating the top layer")?;
        std::fs::copy(&self.migproxy_aarch64, top.join("usr/bin/migproxy"))
            .with_context(|| format!("copying {}", self.migproxy_aarch64.display()))?;
        std::fs::copy(guest, top.join("guest.bin")).context("copying the guest")?;
        // Compressed like the layers before it: the kernel takes an uncompressed archive only at
        // a 4-byte aligned offset, which the end of a gzip member need not be.
        let top_cpio = dir.join("top.cpio.gz");
        let status = Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 > \"$2\"")
            .arg("sh")
            .arg(&top)
            .arg(&top_cpio)
            .status()
            .context("running cpio (scripts/debian-packages.txt lists it)")?;
        if !status.success() {
            bail!("building the top initrd layer failed ({status})");
        }
        let initrd = dir.join(&format!("initrd-{}", kernel.series));
        let mut out = File::create(&initrd).context("creating the initrd")?;
        for part in [&self.base_initrd, &kernel.modules, &top_cpio] {
            let mut input =
                File::open(part).with_context(|| format!("opening {}", part.display()))?;
            std::io::copy(&mut input, &mut out)
                .with_context(|| format!("appending {}", part.display()))?;
        }
        let _ = std::fs::remove_dir_all(&top);
        Ok(initrd)
    }
}

/// A booted emulated KVM host. Its outer QEMU is killed on drop.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub kernel: Kernel,
    child: Child,
    console: PathBuf,
    control: u16,
    /// Forwarded to the inner QEMU's incoming-migration port.
    pub incoming_port: u16,
    qmp_port: u16,
    inner_runs: std::cell::Cell<u32>,
}

impl Host {
    /// Boot `kernel` with `initrd` (see [`Lab::initrd`]) and wait for its READY line with
    /// `/dev/kvm` present.
    pub fn boot(
        dir: &WorkDir,
        name: &str,
        kernel: &Kernel,
        initrd: &Path,
        smp: u32,
    ) -> Result<Host> {
        let qemu = crate::qemu::binaries()?.qemu10.clone();
        let control = crate::ports::free_port()?;
        let incoming_port = crate::ports::free_port()?;
        let qmp_port = crate::ports::free_port()?;
        let console = dir.join(&format!("{name}-console.log"));
        let forward =
            |host: u16, guest: u16| format!("hostfwd=tcp:127.0.0.1:{host}-10.0.2.15:{guest}");
        // The system QEMU package lacks the NIC's option ROM (efi-virtio.rom): `romfile=` (empty)
        // on the device, which `-nic` cannot pass.
        let netdev = format!(
            "user,id=net0,{},{},{}",
            forward(control, CONTROL_PORT),
            forward(incoming_port, INNER_INCOMING_PORT),
            forward(qmp_port, INNER_QMP_PORT)
        );
        let args: Vec<String> = vec![
            "-M".into(),
            "virt,virtualization=on,gic-version=3".into(),
            "-cpu".into(),
            "neoverse-n1".into(),
            "-smp".into(),
            smp.to_string(),
            "-m".into(),
            "1G".into(),
            "-accel".into(),
            "tcg".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-pci,netdev=net0,romfile=".into(),
            "-kernel".into(),
            kernel.image.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            "console=ttyAMA0 rdinit=/init quiet".into(),
        ];
        let log = File::create(&console).context("creating the console log")?;
        let child = Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the console log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} {}", qemu.display(), args.join(" ")))?;
        let mut host = Host {
            name: name.to_owned(),
            kernel: kernel.clone(),
            child,
            console,
            control,
            incoming_port,
            qmp_port,
            inner_runs: std::cell::Cell::new(0),
        };
        let started = Instant::now();
        let ready = host.wait_console("KVMLAB-READY", BOOT_TIMEOUT)?;
        if !ready.contains("kvm=yes") {
            bail!(
                "{name}: kernel {} booted without /dev/kvm: {ready}",
                kernel.release
            );
        }
        let errors: Vec<String> = host
            .console_text()
            .lines()
            .filter(|l| l.contains("KVMLAB-ERROR"))
            .map(str::to_owned)
            .collect();
        if !errors.is_empty() {
            bail!("{name}: /init reported {}", errors.join("; "));
        }
        eprintln!(
            "  {name}: kernel {} ({}) up with /dev/kvm in {:.1} s",
            kernel.release,
            kernel.package,
            started.elapsed().as_secs_f64()
        );
        Ok(host)
    }

    /// Everything the host printed on its console so far.
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Wait for a console line containing `needle`; returns that line.
    fn wait_console(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.console_text().lines().find(|l| l.contains(needle)) {
                return Ok(line.trim().to_owned());
            }
            if let Some(status) = self.child.try_wait().context("checking the outer QEMU")? {
                bail!(
                    "{}: outer QEMU exited ({status}) before {needle:?}; console tail:\n{}",
                    self.name,
                    tail(&self.console_text(), 30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no {needle:?} on the console within {timeout:?}; console tail:\n{}",
                    self.name,
                    tail(&self.console_text(), 30)
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Run `script` with the host's shell and return its output; fails when the script's last
    /// command fails (its exit status is appended as a marker line).
    pub fn sh(&self, script: &str) -> Result<String> {
        self.sh_with_timeout(script, SHELL_TIMEOUT)
    }

    pub fn sh_with_timeout(&self, script: &str, timeout: Duration) -> Result<String> {
        const MARKER: &str = "KVMLAB-RC=";
        let deadline = Instant::now() + timeout;
        let full = format!("{script}\necho \"{MARKER}$?\"\n");
        // The host's `nc -l` serves one connection, then is started again: a connection made in
        // between is accepted by user-mode networking and then reset with nothing read. Only
        // such an empty attempt is retried (the script never reached a shell).
        let output = loop {
            match self.sh_once(&full, timeout) {
                Ok(output) if !output.is_empty() => break output,
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(300));
                }
                Ok(_) => bail!(
                    "{}: the control shell answered nothing: {script}",
                    self.name
                ),
                Err(err) => return Err(err).context(format!("{}: running {script}", self.name)),
            }
        };
        if Instant::now() > deadline {
            bail!("{}: script ran past {timeout:?}: {script}", self.name);
        }
        let text = String::from_utf8_lossy(&output).into_owned();
        let (body, rc) = text.rsplit_once(MARKER).ok_or_else(|| {
            anyhow!(
                "{}: script ended without its status: {script}\n{text}",
                self.name
            )
        })?;
        if rc.trim() != "0" {
            bail!(
                "{}: script failed (status {}): {script}\n{body}",
                self.name,
                rc.trim()
            );
        }
        Ok(body.to_owned())
    }

    /// One connection to the control shell: send `script`, read everything it prints. An error
    /// here before any output means the script never ran.
    fn sh_once(&self, script: &str, timeout: Duration) -> Result<Vec<u8>> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.control));
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("{}: connecting to the control shell", self.name))?;
        stream.set_read_timeout(Some(timeout))?;
        stream
            .write_all(script.as_bytes())
            .with_context(|| format!("{}: sending a script", self.name))?;
        stream.shutdown(Shutdown::Write)?;
        let mut output = Vec::new();
        let mut limited = (&mut stream).take(SHELL_OUTPUT_BUDGET);
        match limited.read_to_end(&mut output) {
            Ok(_) => Ok(output),
            // A reset after some output: the shell ran; what it printed is all there is.
            Err(_) if !output.is_empty() => Ok(output),
            Err(err) => Err(err).context(format!("{}: reading the script output", self.name)),
        }
    }

    /// `migproxy profile capture --from-kvm` run inside the host; returns the profile JSON.
    pub fn capture_kvm_profile(&self) -> Result<String> {
        self.sh(
            "migproxy profile capture --from-kvm -o /tmp/kvm-profile.json >/tmp/capture.log 2>&1 \
                 || { cat /tmp/capture.log; false; }; cat /tmp/kvm-profile.json",
        )
        .with_context(|| format!("{}: profile capture --from-kvm", self.name))
    }

    /// Start an inner QEMU (`-accel kvm -cpu host -M virt,gic-version=3 -nodefaults -m 64`) and
    /// connect to its QMP. `guest`: run the counting guest; `incoming`: `-incoming defer`;
    /// neither: a fresh VM, paused (`-S`).
    pub fn start_inner(&self, name: &str, smp: u32, role: InnerRole) -> Result<InnerVm> {
        let run = self.inner_runs.get() + 1;
        self.inner_runs.set(run);
        let log = format!("/tmp/inner-{run}.log");
        let mut args = format!(
            "-accel kvm -cpu host -M virt,gic-version=3 -smp {smp} -m {} -nodefaults -display none \
             -qmp tcp:0.0.0.0:{INNER_QMP_PORT},server=on,wait=off",
            crate::scenario::E2E_MEM_MIB
        );
        match role {
            InnerRole::Fresh => args.push_str(" -S"),
            InnerRole::Guest => args.push_str(&format!(
                " -device loader,file=/guest.bin,addr={:#x},cpu-num=0",
                crate::guest::LOAD_ADDR
            )),
            InnerRole::Incoming => args.push_str(" -incoming defer"),
        }
        self.sh(&format!(
            "setsid qemu-system-aarch64 {args} </dev/null >{log} 2>&1 & echo $! >/tmp/inner.pid"
        ))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.qmp_port));
        let deadline = Instant::now() + INNER_STARTUP_TIMEOUT;
        let qmp = loop {
            match Qmp::connect_tcp(addr) {
                Ok(qmp) => break qmp,
                Err(err) => {
                    if Instant::now() >= deadline {
                        let inner_log = self.sh(&format!("cat {log}")).unwrap_or_default();
                        return Err(err).context(format!(
                            "{}: inner QEMU never answered QMP; its log: {}",
                            self.name,
                            inner_log.trim()
                        ));
                    }
                    thread::sleep(Duration::from_millis(500));
                }
            }
        };
        Ok(InnerVm {
            name: format!("{}/{name}", self.name),
            qmp,
            log,
        })
    }

    /// What the inner QEMU of `vm` printed.
    pub fn inner_log(&self, vm: &InnerVm) -> String {
        self.sh(&format!("cat {}", vm.log)).unwrap_or_default()
    }

    /// Stop the current inner QEMU (quit over QMP, then kill whatever is left).
    pub fn stop_inner(&self, vm: InnerVm) -> Result<()> {
        let mut vm = vm;
        let _ = vm.qmp.execute("quit", json!({}));
        drop(vm);
        self.sh("pid=$(cat /tmp/inner.pid); n=0; \
                 while kill -0 $pid 2>/dev/null && [ $n -lt 10 ]; do sleep 1; n=$((n + 1)); done; \
                 kill -9 $pid 2>/dev/null; true")?;
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What an inner QEMU is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InnerRole {
    /// No guest code, paused: a fresh VM whose stream is a profile source.
    Fresh,
    /// Runs the counting guest: a migration source.
    Guest,
    /// `-incoming defer`: a migration destination.
    Incoming,
}

/// An inner QEMU under KVM, driven over its forwarded QMP port.
#[derive(Debug)]
pub struct InnerVm {
    pub name: String,
    pub qmp: Qmp,
    log: String,
}

impl CountingGuest for InnerVm {
    fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Receives one migration stream on a free loopback port (an inner QEMU migrates to
/// `tcp:10.0.2.2:PORT`) and writes it to a file.
#[derive(Debug)]
pub struct StreamSink {
    pub port: u16,
    handle: thread::JoinHandle<Result<u64>>,
}

/// Largest stream a sink takes (a fresh 64 MiB VM sends well under 1 MiB of non-zero pages).
const STREAM_BUDGET: u64 = 256 << 20;

impl StreamSink {
    pub fn start(path: &Path) -> Result<StreamSink> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding the stream sink")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let path = path.to_path_buf();
        let handle = thread::spawn(move || -> Result<u64> {
            let deadline = Instant::now() + LAB_MIGRATION_TIMEOUT;
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            bail!("no migration connected to the stream sink within {LAB_MIGRATION_TIMEOUT:?}");
                        }
                        thread::sleep(Duration::from_millis(50));
                    }
                    Err(err) => return Err(err).context("accepting the migration"),
                }
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(LAB_MIGRATION_TIMEOUT))?;
            let mut file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            let copied = std::io::copy(&mut (&mut stream).take(STREAM_BUDGET), &mut file)
                .context("receiving the stream")?;
            if copied >= STREAM_BUDGET {
                bail!("stream exceeded its budget of {STREAM_BUDGET} bytes");
            }
            Ok(copied)
        });
        Ok(StreamSink { port, handle })
    }

    /// Wait for the stream to end; returns its length.
    pub fn finish(self) -> Result<u64> {
        self.handle
            .join()
            .map_err(|_| anyhow!("the stream sink thread panicked"))?
    }
}

impl Host {
    /// The outgoing stream of a fresh, paused inner VM (no guest code), saved to `path` on this
    /// side. Returns its length.
    pub fn save_fresh_stream(&self, path: &Path, smp: u32) -> Result<u64> {
        let mut vm = self.start_inner("fresh", smp, InnerRole::Fresh)?;
        let sink = StreamSink::start(path)?;
        vm.qmp.execute(
            "migrate",
            json!({ "uri": format!("tcp:10.0.2.2:{}", sink.port) }),
        )?;
        let info = vm.qmp.wait_migration(&[], LAB_MIGRATION_TIMEOUT)?;
        if crate::qmp::migration_status(&info) != "completed" {
            bail!(
                "{}: saving the fresh stream failed: {info}; inner log: {}",
                self.name,
                self.inner_log(&vm)
            );
        }
        let length = sink.finish()?;
        self.stop_inner(vm)?;
        Ok(length)
    }
}

/// Whether a register is live timer state, which a capture at another moment reads differently:
/// the counters and the virtual and physical timers (op0 3, op1 3, CRn 14, CRm 0/2/3; KVM's
/// KVM_REG_ARM_TIMER_CNT and _CVAL ids are swapped relative to the architecture, but both sit
/// in this block).
pub fn is_live_timer_state(id: migproxy_config::RegId) -> bool {
    matches!(id.sysreg_fields(), Some((3, 3, 14, 0 | 2 | 3, _)))
}

/// Registers whose kernel reset value is UNKNOWN and which QEMU's vCPU holds differently: the
/// PMU interrupt and counter enables. 6.12's `reset_pmu_reg()` (`arch/arm64/kvm/sys_regs.c`)
/// stores KVM's UNKNOWN pattern masked to the implemented counters (0x8000001e on the lab's
/// neoverse-n1), which a scratch vCPU reads; the VM QEMU built holds 0. No guest has run on
/// either, and the architecture leaves the value to the implementation.
pub fn is_reset_unknown_pmu_enable(id: migproxy_config::RegId) -> bool {
    const PMINTENSET_EL1: (u8, u8, u8, u8, u8) = (3, 0, 9, 14, 1);
    const PMINTENCLR_EL1: (u8, u8, u8, u8, u8) = (3, 0, 9, 14, 2);
    const PMCNTENSET_EL0: (u8, u8, u8, u8, u8) = (3, 3, 9, 12, 1);
    const PMCNTENCLR_EL0: (u8, u8, u8, u8, u8) = (3, 3, 9, 12, 2);
    matches!(
        id.sysreg_fields(),
        Some(PMINTENSET_EL1 | PMINTENCLR_EL1 | PMCNTENSET_EL0 | PMCNTENCLR_EL0)
    )
}

fn hex(value: Option<u64>) -> String {
    value.map_or_else(|| "absent".to_owned(), |v| format!("{v:#x}"))
}

/// Compare a `--from-kvm` profile with the profile captured from a stream of the same host:
/// the same register ids, the same values except live timer state and the reset-UNKNOWN PMU
/// enables ([`is_reset_unknown_pmu_enable`]), each listed in the summary line this returns.
pub fn compare_kvm_and_stream_profiles(
    kvm: &migproxy_config::Profile,
    stream: &migproxy_config::Profile,
) -> Result<String> {
    use std::collections::BTreeSet;
    let ids =
        |p: &migproxy_config::Profile| -> BTreeSet<u64> { p.present().map(|r| r.id.0).collect() };
    let (kvm_ids, stream_ids) = (ids(kvm), ids(stream));
    let only_kvm: Vec<String> = kvm_ids
        .difference(&stream_ids)
        .map(|&id| migproxy_config::RegId(id).to_string())
        .collect();
    let only_stream: Vec<String> = stream_ids
        .difference(&kvm_ids)
        .map(|&id| migproxy_config::RegId(id).to_string())
        .collect();
    if !only_kvm.is_empty() || !only_stream.is_empty() {
        bail!(
            "register lists differ: only --from-kvm: [{}]; only the stream: [{}]",
            only_kvm.join(", "),
            only_stream.join(", ")
        );
    }
    let mut live = Vec::new();
    let mut unknown = Vec::new();
    let mut wrong = Vec::new();
    for &raw in &kvm_ids {
        let id = migproxy_config::RegId(raw);
        let (a, b) = (kvm.value_for(0, id), stream.value_for(0, id));
        if a == b {
            continue;
        }
        let line = format!("{id} {} vs {}", hex(a), hex(b));
        if is_live_timer_state(id) {
            live.push(line);
        } else if is_reset_unknown_pmu_enable(id) {
            unknown.push(line);
        } else {
            wrong.push(line);
        }
    }
    if !wrong.is_empty() {
        bail!(
            "values differ (--from-kvm vs stream) outside live timer state: {}",
            wrong.join("; ")
        );
    }
    Ok(format!(
        "{} registers, same ids; same values except live timer state [{}] and reset-UNKNOWN PMU enables [{}]",
        kvm_ids.len(),
        live.join("; "),
        unknown.join("; ")
    ))
}
