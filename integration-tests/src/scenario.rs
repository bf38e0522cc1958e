//! What every scenario shares: a work directory, logs on failure, guests, profiles, migrations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::guest;
use crate::migproxy;
use crate::ports;
use crate::qemu::{GuestImage, Version, Vm, VmConfig};
use crate::qmp::migration_status;
use crate::workdir::WorkDir;

/// Pages the test guest keeps dirty in end-to-end scenarios (2 MiB: every precopy pass resends it).
pub const E2E_WINDOW_PAGES: u64 = 512;
/// Guest RAM in end-to-end scenarios.
pub const E2E_MEM_MIB: u32 = 64;
/// How long a guest may take to show it runs.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(20);

/// Run one scenario: on error keep its directory, print every log in it, and fail the test.
pub fn run(name: &str, body: impl FnOnce(&mut Scenario) -> Result<()>) {
    if let Err(err) = try_run(name, body) {
        panic!("scenario {name} failed: {err}");
    }
}

/// [`run`] without the panic, for tests that run several scenarios and report them together
/// (the failure is printed, logs included, before it is returned).
pub fn try_run(
    name: &str,
    body: impl FnOnce(&mut Scenario) -> Result<()>,
) -> std::result::Result<(), String> {
    let started = Instant::now();
    eprintln!("scenario {name}: start");
    let mut scenario = match Scenario::new(name) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("scenario {name}: FAIL: cannot set up: {err:#}");
            return Err(format!("cannot set up: {err:#}"));
        }
    };
    let outcome = body(&mut scenario);
    let elapsed = started.elapsed();
    match outcome {
        Ok(()) => {
            eprintln!("scenario {name}: PASS in {:.1} s", elapsed.as_secs_f64());
            Ok(())
        }
        Err(err) => {
            scenario.dir.keep();
            eprintln!(
                "scenario {name}: FAIL after {:.1} s: {err:#}",
                elapsed.as_secs_f64()
            );
            dump_logs(scenario.dir.path());
            Err(format!("{err:#}"))
        }
    }
}

fn dump_logs(dir: &Path) {
    eprintln!("scenario logs kept in {}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // Keep the end: the failure is there, and a proxy log can be long.
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        eprintln!("----- {} (last {} lines) -----", log.display(), tail.len());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}

pub struct Scenario {
    pub name: String,
    pub dir: WorkDir,
    guest_images: HashMap<u64, GuestImage>,
}

impl Scenario {
    fn new(name: &str) -> Result<Scenario> {
        Ok(Scenario {
            name: name.to_owned(),
            dir: WorkDir::new(name)?,
            guest_images: HashMap::new(),
        })
    }

    /// The counting guest with a window of `pages`, built once per scenario.
    pub fn guest_image(&mut self, pages: u64) -> Result<GuestImage> {
        if let Some(image) = self.guest_images.get(&pages) {
            return Ok(image.clone());
        }
        let image = guest::build(self.dir.path(), pages)?;
        self.guest_images.insert(pages, image.clone());
        Ok(image)
    }

    /// Start `config` running the counting guest and wait until it counts.
    pub fn start_source(&mut self, name: &str, config: &VmConfig) -> Result<Vm> {
        let mut config = config.clone();
        config.guest = Some(self.guest_image(E2E_WINDOW_PAGES)?);
        config.paused = false;
        config.incoming = false;
        let mut vm = Vm::spawn(&self.dir, name, &config)?;
        guest::wait_counter_above(&mut vm, 0, LIVENESS_TIMEOUT)
            .context("source guest never started counting")?;
        Ok(vm)
    }

    /// Start `config` as a destination (`-incoming defer`), apply capabilities and parameters,
    /// and listen on a fresh port. Returns the VM and its port.
    pub fn start_destination(
        &mut self,
        name: &str,
        config: &VmConfig,
        capabilities: &[(&str, bool)],
        parameters: Value,
    ) -> Result<(Vm, u16)> {
        let mut vm = Vm::spawn(&self.dir, name, &config.as_incoming())?;
        vm.qmp.set_capabilities(capabilities)?;
        vm.qmp.set_parameters(parameters)?;
        let port = ports::free_port()?;
        vm.qmp
            .execute("migrate-incoming", json!({ "uri": ports::tcp_uri(port) }))?;
        Ok((vm, port))
    }

    /// The register profile of a fresh, never-started VM of `config`'s version, machine, CPU and
    /// vCPU count, captured with `migproxy profile capture --from-stream` (recording the QEMU
    /// version, which decides the subsections it can load). Cached per process.
    pub fn profile(&mut self, config: &VmConfig) -> Result<PathBuf> {
        fresh_capture(config).map(|fresh| fresh.profile)
    }

    /// The reference description of `config` (`profile capture --save-reference`, from the same
    /// fresh stream as its profile, so it costs no extra VM). Cached per process.
    pub fn reference(&mut self, config: &VmConfig) -> Result<PathBuf> {
        fresh_capture(config).map(|fresh| fresh.reference)
    }

    /// The `migproxy run` flags of the default rewriting path: both profiles and the source's
    /// reference description (a rewriting proxy without one refuses every migration).
    pub fn profile_args(&mut self, source: &VmConfig, dest: &VmConfig) -> Result<Vec<String>> {
        let mut args = self.profiles_only_args(source, dest)?;
        args.extend([
            "--source-reference".into(),
            self.reference(source)?.display().to_string(),
        ]);
        Ok(args)
    }

    /// Both profiles and no reference: only for scenarios about a proxy without one, which must
    /// then say so (`--unreferenced-device-phase allow`) or expect the refusal.
    pub fn profiles_only_args(
        &mut self,
        source: &VmConfig,
        dest: &VmConfig,
    ) -> Result<Vec<String>> {
        let source_profile = self.profile(source)?;
        let dest_profile = self.profile(dest)?;
        Ok(vec![
            "--dest-profile".into(),
            dest_profile.display().to_string(),
            "--source-profile".into(),
            source_profile.display().to_string(),
        ])
    }
}

/// Start `migrate` on the source towards `port`.
pub fn migrate(source: &mut Vm, port: u16) -> Result<()> {
    source
        .qmp
        .execute("migrate", json!({ "uri": ports::tcp_uri(port) }))?;
    Ok(())
}

/// After a successful migration: the source is stopped, the destination runs, and its counter
/// starts at or after the value the source stopped with and keeps going.
pub fn assert_migrated(source: &mut Vm, dest: &mut Vm) -> Result<()> {
    let info = source
        .qmp
        .wait_migration(&[], crate::MIGRATION_TIMEOUT)
        .context("waiting for the source")?;
    if migration_status(&info) != "completed" {
        bail!("source migration ended {}: {info}", migration_status(&info));
    }
    let source_status = source.qmp.status()?;
    if source_status != "postmigrate" {
        bail!("source run state after completion is {source_status}, expected postmigrate");
    }
    let stopped_at = guest::read_counter(source)?;
    dest.qmp
        .wait_status("running", Duration::from_secs(30))
        .context("destination never ran the guest")?;
    let first = guest::read_counter(dest)?;
    if first < stopped_at {
        bail!(
            "destination counter {first} is below the value the source stopped at ({stopped_at}): \
             guest memory did not arrive"
        );
    }
    let later = guest::assert_running(dest, LIVENESS_TIMEOUT)?;
    eprintln!("  source stopped at counter {stopped_at}; destination continued {first} -> {later}");
    Ok(())
}

/// After a failed migration: the source still runs the guest (its counter advances).
pub fn assert_source_kept_running(source: &mut Vm) -> Result<Value> {
    let info = source
        .qmp
        .wait_migration(&[], crate::MIGRATION_TIMEOUT)
        .context("waiting for the source")?;
    if migration_status(&info) != "failed" {
        bail!(
            "source migration ended {}, expected failed: {info}",
            migration_status(&info)
        );
    }
    source
        .qmp
        .wait_status("running", Duration::from_secs(30))
        .context("source did not resume the guest")?;
    let value = guest::assert_running(source, LIVENESS_TIMEOUT)?;
    eprintln!("  source still running, counter {value}");
    Ok(info)
}

/// What a fresh VM of one configuration gives the scenarios.
#[derive(Debug, Clone)]
pub struct FreshCapture {
    pub profile: PathBuf,
    /// Its reference description (`--source-reference` when it is the source).
    pub reference: PathBuf,
}

fn profile_cache() -> &'static Mutex<HashMap<String, FreshCapture>> {
    static CACHE: OnceLock<Mutex<HashMap<String, FreshCapture>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The per-process profile cache. A static is never dropped, so each process first removes the
/// caches of test processes that have exited.
fn profile_dir() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<WorkDir, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        remove_stale_profile_dirs();
        WorkDir::new("profiles").map_err(|e| format!("{e:#}"))
    })
    .as_ref()
    .map(WorkDir::path)
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Remove `mpit-profiles-PID-*` directories whose process no longer exists.
fn remove_stale_profile_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mpit-profiles-"))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Profile and reference of a fresh VM of `config`, captured once per process and configuration.
pub fn fresh_capture(config: &VmConfig) -> Result<FreshCapture> {
    // Extra arguments can add devices, which changes the reference description.
    let extra: String = config
        .extra_args
        .iter()
        .map(|arg| {
            arg.chars()
                .filter(char::is_ascii_alphanumeric)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("_");
    let key = format!(
        "{}-{}-{}-smp{}{}{extra}",
        config.version.tag(),
        config.machine,
        config.cpu,
        config.smp,
        if extra.is_empty() { "" } else { "-" },
    );
    let cache = profile_cache();
    // Held for the whole capture: two scenarios needing the same profile capture it once.
    let mut guard = cache
        .lock()
        .map_err(|_| anyhow::anyhow!("profile cache poisoned"))?;
    if let Some(path) = guard.get(&key) {
        return Ok(path.clone());
    }
    let dir = profile_dir()?;
    let stream = dir.join(format!("{key}.stream"));
    let fresh = FreshCapture {
        profile: dir.join(format!("{key}.json")),
        reference: dir.join(format!("{key}.reference.json")),
    };
    save_fresh_stream(config, &stream)?;
    migproxy::capture_profile(
        &stream,
        config.version.number(),
        &fresh.profile,
        Some(&fresh.reference),
    )?;
    // The stream (mostly zero pages) is not needed once profile and reference exist.
    let _ = std::fs::remove_file(&stream);
    guard.insert(key, fresh.clone());
    Ok(fresh)
}

/// Save the outgoing stream of a never-started VM (`-S`, no guest code) with `exec:cat > FILE`.
pub fn save_fresh_stream(config: &VmConfig, stream: &Path) -> Result<()> {
    let mut fresh = config.clone();
    fresh.guest = None;
    fresh.paused = true;
    fresh.incoming = false;
    let workdir = WorkDir::new("fresh")?;
    let name = format!("fresh-{}", config.version.tag());
    let mut vm = Vm::spawn(&workdir, &name, &fresh)?;
    vm.qmp.execute(
        "migrate",
        json!({ "uri": format!("exec:cat > {}", shell_quote(stream)) }),
    )?;
    let info = vm.qmp.wait_migration(&[], crate::MIGRATION_TIMEOUT)?;
    if migration_status(&info) != "completed" {
        bail!(
            "saving the fresh stream of {} failed: {info}; log: {}",
            config.describe(),
            vm.log()
        );
    }
    vm.quit()?;
    Ok(())
}

/// Single-quote a path for `exec:` (QEMU runs it with /bin/sh -c).
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// `-M virt-7.2 -cpu CPU -smp 2 -m 64` on `version`: the machine type both QEMUs know.
pub fn virt72(version: Version, cpu: &str) -> VmConfig {
    let mut config = VmConfig::new(version, "virt-7.2", cpu);
    config.mem_mib = E2E_MEM_MIB;
    config
}

/// The a64fx configuration of the headline scenarios.
pub fn a64fx(version: Version) -> VmConfig {
    virt72(version, "a64fx")
}
