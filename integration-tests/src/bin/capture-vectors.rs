#![forbid(unsafe_code)]
//! Regenerates the codec's test vectors (`codec/tests/vectors/*.bin`) from real QEMU 7.2 and 10.0
//! migrations, and the README line that says how each one was made.
//!
//! Usage: `capture-vectors [--out DIR] [--only NAME,NAME...] [--list]`
//! (normally through `scripts/capture-vectors.sh`).
//!
//! Every vector is the main migration channel of a small guest (`-m 16`, 2 vCPUs): RAM is almost
//! all zero pages (9 bytes each on the wire), so each file stays a few hundred KiB. Stream-file
//! vectors are written by QEMU itself (`migrate exec:cat > FILE`); socket vectors (multifd, return
//! path, postcopy) are the source-to-destination half of the first connection, recorded by a
//! relay between two real QEMUs that completed the migration.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use migproxy_integration_tests::guest;
use migproxy_integration_tests::qemu::{binaries, repo_root, Version, Vm, VmConfig};
use migproxy_integration_tests::qmp::migration_status;
use migproxy_integration_tests::relay::RecordingRelay;
use migproxy_integration_tests::scenario::shell_quote;
use migproxy_integration_tests::workdir::WorkDir;
use migproxy_integration_tests::MIGRATION_TIMEOUT;
use serde_json::{json, Value};

/// Guest RAM of every vector: the code and the dirtied window fit in the first 4 MiB.
const VECTOR_MEM_MIB: u32 = 16;
/// Pages the running guest keeps dirty: small, so repeated precopy passes stay small.
const VECTOR_WINDOW_PAGES: u64 = 8;
/// Bandwidth for captures that must go through several precopy passes. QEMU sets its convergence
/// threshold (bandwidth x downtime-limit) only after 100 ms of transfer; at 1 MiB/s the first pass
/// of the guest (RAM and the two 64 MiB flash blocks) takes longer than that, and 1 KiB/ms x 1 ms is less than the dirty window.
const SLOW_BANDWIDTH: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Recipe {
    /// Never-started VM (`-S`), `exec:` stream.
    Paused,
    /// Running guest, xbzrle, forced through several precopy passes.
    Xbzrle,
    /// Running guest, 7.2 `compress`, forced through several passes.
    Compress,
    /// Paused, 7.2 block migration of a 64 KiB virtio-blk disk.
    Block,
    /// Paused, dirty-bitmaps with one bitmap on a read-only 64 KiB disk.
    DirtyBitmaps,
    /// Running guest, multifd with 2 channels, TCP to a real destination; main channel only.
    Multifd,
    /// Paused, return-path, TCP to a real destination; main channel (and its return path as .d2s).
    ReturnPath,
    /// Running guest, postcopy-ram, switched to postcopy; main channel (PACKAGED device state).
    Postcopy,
}

struct Spec {
    name: &'static str,
    version: Version,
    machine: &'static str,
    cpu: &'static str,
    recipe: Recipe,
}

const fn spec(
    name: &'static str,
    version: Version,
    machine: &'static str,
    cpu: &'static str,
    recipe: Recipe,
) -> Spec {
    Spec {
        name,
        version,
        machine,
        cpu,
        recipe,
    }
}

const SPECS: &[Spec] = &[
    spec(
        "q72-a64fx",
        Version::V72,
        "virt-7.2",
        "a64fx",
        Recipe::Paused,
    ),
    spec(
        "q10m72-a64fx",
        Version::V10,
        "virt-7.2",
        "a64fx",
        Recipe::Paused,
    ),
    spec(
        "q10-a64fx",
        Version::V10,
        "virt-10.0",
        "a64fx",
        Recipe::Paused,
    ),
    spec(
        "q72-a57",
        Version::V72,
        "virt-7.2",
        "cortex-a57",
        Recipe::Paused,
    ),
    spec(
        "q10m72-a57",
        Version::V10,
        "virt-7.2",
        "cortex-a57",
        Recipe::Paused,
    ),
    spec("q72-max", Version::V72, "virt-7.2", "max", Recipe::Paused),
    // 11.1 sends cpu/wfxt-timer for every TCG CPU (its timer not armed in a paused VM): the
    // subsection tests (codec walk, removal, the armed case) run on these.
    spec(
        "q111m72-a64fx",
        Version::V111,
        "virt-7.2",
        "a64fx",
        Recipe::Paused,
    ),
    spec(
        "q111m72-max",
        Version::V111,
        "virt-7.2",
        "max",
        Recipe::Paused,
    ),
    spec(
        "q10m72-max",
        Version::V10,
        "virt-7.2",
        "max",
        Recipe::Paused,
    ),
    spec(
        "q72-xbzrle",
        Version::V72,
        "virt-7.2",
        "a64fx",
        Recipe::Xbzrle,
    ),
    spec(
        "q10-xbzrle",
        Version::V10,
        "virt-10.0",
        "a64fx",
        Recipe::Xbzrle,
    ),
    spec(
        "q72-compress",
        Version::V72,
        "virt-7.2",
        "a64fx",
        Recipe::Compress,
    ),
    spec(
        "q72-block",
        Version::V72,
        "virt-7.2",
        "a64fx",
        Recipe::Block,
    ),
    spec(
        "q10-dbm",
        Version::V10,
        "virt-10.0",
        "a64fx",
        Recipe::DirtyBitmaps,
    ),
    spec(
        "q72-mfd-main",
        Version::V72,
        "virt-7.2",
        "a64fx",
        Recipe::Multifd,
    ),
    spec(
        "q10-mfd-main",
        Version::V10,
        "virt-10.0",
        "a64fx",
        Recipe::Multifd,
    ),
    spec(
        "q10-rp-main",
        Version::V10,
        "virt-10.0",
        "a64fx",
        Recipe::ReturnPath,
    ),
    spec(
        "q72-postcopy-main",
        Version::V72,
        "virt-7.2",
        "a64fx",
        Recipe::Postcopy,
    ),
    spec(
        "q10-postcopy-main",
        Version::V10,
        "virt-10.0",
        "a64fx",
        Recipe::Postcopy,
    ),
];

/// What a capture did, for the README line.
struct Log {
    steps: Vec<String>,
}

impl Log {
    fn push(&mut self, step: impl Into<String>) {
        self.steps.push(step.into());
    }
}

fn main() {
    if let Err(err) = real_main() {
        eprintln!("capture-vectors: {err:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let mut out = repo_root().join("codec/tests/vectors");
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(args.next().ok_or_else(|| anyhow!("--out needs DIR"))?),
            "--only" => {
                let list = args.next().ok_or_else(|| anyhow!("--only needs NAMES"))?;
                only = Some(list.split(',').map(str::to_owned).collect());
            }
            "--list" => {
                for s in SPECS {
                    println!("{}", s.name);
                }
                return Ok(());
            }
            other => bail!("unknown argument {other}; usage: capture-vectors [--out DIR] [--only NAME,...] [--list]"),
        }
    }
    if let Some(names) = &only {
        for name in names {
            if !SPECS.iter().any(|s| s.name == name) {
                bail!("no vector named {name} (see --list)");
            }
        }
    }
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let versions = qemu_versions()?;
    let readme_path = out.join("README.md");
    let mut lines = existing_lines(&readme_path);
    for spec in SPECS {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == spec.name))
        {
            continue;
        }
        eprintln!("capture-vectors: {} ...", spec.name);
        let work = WorkDir::new(spec.name)?;
        let target = out.join(format!("{}.bin", spec.name));
        let mut log = Log { steps: Vec::new() };
        capture(spec, &work, &target, &mut log)
            .with_context(|| format!("capturing {}", spec.name))?;
        let size = fs::metadata(&target)?.len();
        eprintln!("capture-vectors: {} -> {size} bytes", spec.name);
        let line = format!(
            "- `{}.bin` ({size} bytes): {}",
            spec.name,
            log.steps.join("; ")
        );
        lines.insert(spec.name.to_owned(), line);
    }
    write_readme(&readme_path, &versions, &lines)
}

fn qemu_versions() -> Result<String> {
    let bins = binaries()?;
    let mut text = Vec::new();
    for (label, path) in [
        ("7.2", &bins.qemu72),
        ("10.0", &bins.qemu10),
        ("11.1", &bins.qemu111),
    ] {
        let out = Command::new(path).arg("--version").output()?;
        let first = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        text.push(format!("`qemu-system-aarch64[{label}]` = {first}"));
    }
    Ok(text.join("; "))
}

fn existing_lines(readme: &Path) -> BTreeMap<String, String> {
    let mut lines = BTreeMap::new();
    let text = fs::read_to_string(readme).unwrap_or_default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("- `") {
            if let Some((file, _)) = rest.split_once(".bin`") {
                lines.insert(file.to_owned(), line.to_owned());
            }
        }
    }
    lines
}

fn write_readme(path: &Path, versions: &str, lines: &BTreeMap<String, String>) -> Result<()> {
    let mut text = String::from(
        "# Codec test vectors\n\n\
         Real QEMU migration streams (main channel only), regenerated by `scripts/capture-vectors.sh`\n\
         (`cargo run -p migproxy-integration-tests --bin capture-vectors`). Do not edit by hand.\n\n",
    );
    text.push_str(&format!("Binaries: {versions}; TCG on an x86-64 host.\n\n"));
    text.push_str(
        "Every QEMU ran as `qemu-system-aarch64[VERSION] -M MACHINE -cpu CPU -smp 2 -m 16 -nodefaults \
         -display none -qmp unix:SOCKET,server=on,wait=off` plus the options in its line. \
         \"running guest\" = `-device loader,file=dirty.bin,addr=0x40200000,cpu-num=0` with `dirty.bin` \
         assembled from `integration-tests/guest/dirty.S` with WINDOW_PAGES=8 (counts and rewrites one \
         word in each of 8 pages forever); \"paused\" = `-S`, never started. Socket vectors: \
         destination `-incoming defer` with the listed capabilities, a recording relay in between \
         (`integration-tests/src/relay.rs`), the file is connection 0 source-to-destination; `.d2s` files \
         are the destination-to-source direction of the same connection.\n\n",
    );
    // Only vectors this tool still makes: a line for a removed vector would describe nothing.
    for line in lines
        .iter()
        .filter(|(name, _)| SPECS.iter().any(|s| s.name == name.as_str()))
        .map(|(_, line)| line)
    {
        text.push_str(line);
        text.push('\n');
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn base_config(spec: &Spec) -> VmConfig {
    let mut config = VmConfig::new(spec.version, spec.machine, spec.cpu);
    config.mem_mib = VECTOR_MEM_MIB;
    config
}

fn describe(config: &VmConfig) -> String {
    let mut text = format!(
        "qemu-system-aarch64[{}] -M {} -cpu {}",
        config.version.number(),
        config.machine,
        config.cpu
    );
    if config.guest.is_some() {
        text.push_str(", running guest");
    }
    if config.paused {
        text.push_str(", paused");
    }
    for arg in &config.extra_args {
        text.push(' ');
        text.push_str(arg);
    }
    text
}

fn capture(spec: &Spec, work: &WorkDir, target: &Path, log: &mut Log) -> Result<()> {
    let mut config = base_config(spec);
    match spec.recipe {
        Recipe::Paused => {
            config.paused = true;
            let mut vm = Vm::spawn(work, "src", &config)?;
            log.push(format!("source `{}`", describe(&config)));
            exec_migrate(&mut vm, target, log)?;
            vm.quit()
        }
        Recipe::Xbzrle | Recipe::Compress => {
            let (capability, bandwidth, syncs) = match spec.recipe {
                Recipe::Xbzrle => ("xbzrle", SLOW_BANDWIDTH, 4u64),
                _ => ("compress", SLOW_BANDWIDTH, 3u64),
            };
            config.guest = Some(guest::build(work.path(), VECTOR_WINDOW_PAGES)?);
            let mut vm = Vm::spawn(work, "src", &config)?;
            guest::wait_counter_above(&mut vm, 0, Duration::from_secs(20))?;
            log.push(format!("source `{}`", describe(&config)));
            qmp_caps(&mut vm, &[(capability, true)], log)?;
            qmp_params(
                &mut vm,
                json!({ "downtime-limit": 1, "max-bandwidth": bandwidth }),
                log,
            )?;
            let uri = format!("exec:cat > {}", shell_quote(target));
            vm.qmp.execute("migrate", json!({ "uri": uri }))?;
            log.push("`migrate exec:cat > FILE`");
            // A 1 ms downtime limit keeps the source iterating over the dirty window, so later
            // passes resend pages in the capability's encoding; then let it converge.
            vm.qmp.wait_migrate_until(
                &format!("{syncs} dirty syncs"),
                MIGRATION_TIMEOUT,
                |info| dirty_syncs(info) >= syncs,
            )?;
            qmp_params(&mut vm, json!({ "downtime-limit": 5000 }), log)?;
            if let Some(step) = log.steps.last_mut() {
                step.push_str(&format!(" after {syncs} dirty syncs"));
            }
            let info = wait_completed(&mut vm, log)?;
            match spec.recipe {
                Recipe::Xbzrle => {
                    let pages = info
                        .pointer("/xbzrle-cache/pages")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    if pages == 0 {
                        bail!("no page was sent xbzrle-encoded: {info}");
                    }
                    log.push(format!("{pages} xbzrle pages"));
                }
                _ => {
                    let pages = info
                        .pointer("/compression/pages")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    if pages == 0 {
                        bail!("no page was sent compressed: {info}");
                    }
                    log.push(format!("{pages} compressed pages"));
                }
            }
            vm.quit()
        }
        Recipe::Block => {
            let disk = small_disk(work)?;
            config.paused = true;
            config.extra_args = vec![
                "-drive".into(),
                format!("if=none,id=d0,format=raw,file={}", disk.display()),
                "-device".into(),
                "virtio-blk-device,drive=d0".into(),
            ];
            let mut vm = Vm::spawn(work, "src", &config)?;
            log.push(format!(
                "source `{}` (disk.raw: 64 KiB, first 4 KiB a byte pattern, rest zero)",
                describe(&config).replace(&disk.display().to_string(), "disk.raw")
            ));
            qmp_caps(&mut vm, &[("block", true)], log)?;
            exec_migrate(&mut vm, target, log)?;
            vm.quit()
        }
        Recipe::DirtyBitmaps => {
            let disk = small_disk(work)?;
            config.paused = true;
            config.extra_args = vec![
                "-blockdev".into(),
                format!(
                    "driver=raw,node-name=disk0,file.driver=file,file.filename={},read-only=on",
                    disk.display()
                ),
                "-device".into(),
                "virtio-blk-device,drive=disk0".into(),
            ];
            let mut vm = Vm::spawn(work, "src", &config)?;
            log.push(format!(
                "source `{}` (disk.raw: 64 KiB)",
                describe(&config).replace(&disk.display().to_string(), "disk.raw")
            ));
            let args = json!({ "node": "disk0", "name": "bm0", "granularity": 65536 });
            vm.qmp.execute("block-dirty-bitmap-add", args.clone())?;
            log.push(format!("`block-dirty-bitmap-add {args}`"));
            qmp_caps(&mut vm, &[("dirty-bitmaps", true)], log)?;
            exec_migrate(&mut vm, target, log)?;
            vm.quit()
        }
        Recipe::Multifd | Recipe::ReturnPath | Recipe::Postcopy => {
            socket_capture(spec, config, work, target, log)
        }
    }
}

fn socket_capture(
    spec: &Spec,
    mut config: VmConfig,
    work: &WorkDir,
    target: &Path,
    log: &mut Log,
) -> Result<()> {
    let setup = SocketSetup::for_recipe(spec.recipe);
    let (src_caps, dst_caps, src_params, dst_params) = (
        setup.source_caps,
        setup.dest_caps,
        setup.source_params,
        setup.dest_params,
    );
    let running = !matches!(spec.recipe, Recipe::ReturnPath);
    let mut dst_config = config.as_incoming();
    dst_config.paused = true;
    let mut dst = Vm::spawn(work, "dst", &dst_config)?;
    log.push(format!(
        "destination `{} -S -incoming defer`",
        describe(&config)
    ));
    if !dst_caps.is_empty() {
        dst.qmp.set_capabilities(&dst_caps)?;
        log.push(format!(
            "dst `migrate-set-capabilities {}`",
            caps_text(&dst_caps)
        ));
    }
    if dst_params.as_object().is_some_and(|p| !p.is_empty()) {
        dst.qmp.set_parameters(dst_params.clone())?;
        log.push(format!("dst `migrate-set-parameters {dst_params}`"));
    }
    let dst_port = migproxy_integration_tests::ports::free_port()?;
    dst.qmp.execute(
        "migrate-incoming",
        json!({ "uri": format!("tcp:127.0.0.1:{dst_port}") }),
    )?;
    let relay_dir = work.join("relay");
    fs::create_dir_all(&relay_dir)?;
    let relay = RecordingRelay::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, dst_port)),
        &relay_dir,
    )?;

    if running {
        config.guest = Some(guest::build(work.path(), VECTOR_WINDOW_PAGES)?);
    } else {
        config.paused = true;
    }
    let mut src = Vm::spawn(work, "src", &config)?;
    if running {
        guest::wait_counter_above(&mut src, 0, Duration::from_secs(20))?;
    }
    log.push(format!("source `{}`", describe(&config)));
    qmp_caps(&mut src, &src_caps, log)?;
    qmp_params(&mut src, src_params, log)?;
    src.qmp.execute(
        "migrate",
        json!({ "uri": format!("tcp:127.0.0.1:{}", relay.port()) }),
    )?;
    log.push("`migrate tcp:RELAY`");
    if matches!(spec.recipe, Recipe::Postcopy) {
        // Switch while the first pass is still running: at 1 MiB/s it cannot have converged, and
        // a guest whose dirty pages TCG happens not to report could otherwise complete in precopy.
        src.qmp
            .wait_migrate_until("an active migration", MIGRATION_TIMEOUT, |i| {
                migration_status(i) == "active"
                    && i.pointer("/ram/transferred")
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        > 0
            })?;
        src.qmp.execute("migrate-start-postcopy", json!({}))?;
        log.push("`migrate-start-postcopy` during the first precopy pass");
    }
    let info = wait_completed(&mut src, log)?;
    if matches!(spec.recipe, Recipe::Multifd) {
        let bytes = info
            .pointer("/ram/multifd-bytes")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if bytes == 0 {
            bail!("multifd carried nothing: {info}");
        }
    }
    if matches!(spec.recipe, Recipe::Postcopy) {
        let bytes = info
            .pointer("/ram/postcopy-bytes")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if bytes == 0 {
            bail!("the migration never switched to postcopy: {info}");
        }
        log.push(format!("{bytes} bytes sent in postcopy"));
    }
    let dst_info = dst.qmp.wait_migration(&[], MIGRATION_TIMEOUT)?;
    if migration_status(&dst_info) != "completed" {
        bail!(
            "destination ended {}: {dst_info}; log: {}",
            migration_status(&dst_info),
            dst.log()
        );
    }
    log.push("destination completed");
    src.quit()?;
    dst.quit()?;
    let connections = relay.finish(Duration::from_secs(30))?;
    log.push(format!(
        "{connections} connection(s) relayed; this file is c0 source-to-destination"
    ));
    let c0 = relay_dir.join("c0.s2d");
    fs::copy(&c0, target).with_context(|| format!("copying {}", c0.display()))?;
    if matches!(spec.recipe, Recipe::ReturnPath) {
        let d2s = target.with_extension("d2s");
        fs::copy(relay_dir.join("c0.d2s"), &d2s)?;
        log.push(format!(
            "its return path is `{}`",
            d2s.file_name().and_then(|n| n.to_str()).unwrap_or("")
        ));
    }
    Ok(())
}

fn exec_migrate(vm: &mut Vm, target: &Path, log: &mut Log) -> Result<()> {
    let uri = format!("exec:cat > {}", shell_quote(target));
    vm.qmp.execute("migrate", json!({ "uri": uri }))?;
    log.push("`migrate exec:cat > FILE`");
    wait_completed(vm, log).map(|_| ())
}

fn wait_completed(vm: &mut Vm, log: &mut Log) -> Result<Value> {
    let info = vm.qmp.wait_migration(&[], MIGRATION_TIMEOUT)?;
    if migration_status(&info) != "completed" {
        bail!(
            "migration ended {}: {info}; log: {}",
            migration_status(&info),
            vm.log()
        );
    }
    log.push(format!(
        "completed after {} dirty syncs",
        dirty_syncs(&info)
    ));
    Ok(info)
}

fn dirty_syncs(info: &Value) -> u64 {
    info.pointer("/ram/dirty-sync-count")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn qmp_caps(vm: &mut Vm, caps: &[(&str, bool)], log: &mut Log) -> Result<()> {
    vm.qmp.set_capabilities(caps)?;
    if !caps.is_empty() {
        log.push(format!("`migrate-set-capabilities {}`", caps_text(caps)));
    }
    Ok(())
}

fn qmp_params(vm: &mut Vm, params: Value, log: &mut Log) -> Result<()> {
    if params.as_object().is_some_and(|p| p.is_empty()) {
        return Ok(());
    }
    vm.qmp.set_parameters(params.clone())?;
    log.push(format!("`migrate-set-parameters {params}`"));
    Ok(())
}

fn caps_text(caps: &[(&str, bool)]) -> String {
    caps.iter()
        .map(|(n, s)| format!("{n}={}", if *s { "on" } else { "off" }))
        .collect::<Vec<_>>()
        .join(",")
}

/// 64 KiB raw disk: the first 4 KiB a byte pattern (so block migration sends real data), rest zero.
fn small_disk(work: &WorkDir) -> Result<PathBuf> {
    let path = work.join("disk.raw");
    let mut data = vec![0u8; 64 * 1024];
    for (i, byte) in data.iter_mut().take(4096).enumerate() {
        *byte = u8::try_from(i % 251).unwrap_or(0);
    }
    fs::write(&path, data)?;
    Ok(path)
}

/// Capabilities and parameters of a socket capture, per side.
struct SocketSetup {
    source_caps: Vec<(&'static str, bool)>,
    dest_caps: Vec<(&'static str, bool)>,
    source_params: Value,
    dest_params: Value,
}

impl SocketSetup {
    fn for_recipe(recipe: Recipe) -> SocketSetup {
        match recipe {
            Recipe::Multifd => SocketSetup {
                source_caps: vec![("multifd", true)],
                dest_caps: vec![("multifd", true)],
                source_params: json!({ "multifd-channels": 2 }),
                dest_params: json!({ "multifd-channels": 2 }),
            },
            Recipe::ReturnPath => SocketSetup {
                source_caps: vec![("return-path", true)],
                dest_caps: vec![],
                source_params: json!({}),
                dest_params: json!({}),
            },
            _ => SocketSetup {
                source_caps: vec![("postcopy-ram", true)],
                dest_caps: vec![("postcopy-ram", true)],
                source_params: json!({ "max-bandwidth": SLOW_BANDWIDTH, "downtime-limit": 1 }),
                dest_params: json!({}),
            },
        }
    }
}
