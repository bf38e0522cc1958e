//! The counting guest (`integration-tests/guest/dirty.S`): built at test time, read through QMP.
//!
//! Memory map (guest-physical, `-M virt` RAM starts at 0x4000_0000):
//! code at [`LOAD_ADDR`], the counter at [`COUNTER_ADDR`], the dirtied window from [`WINDOW_ADDR`].
//! Keep `-m` large enough to cover the window (`WINDOW_ADDR + pages * 4 KiB`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::qemu::{repo_root, GuestImage, Vm};

/// Where `-device loader` puts the code and starts vCPU 0.
pub const LOAD_ADDR: u64 = 0x4020_0000;
/// The 64-bit counter the guest increments on every loop iteration.
pub const COUNTER_ADDR: u64 = 0x4028_0000;
/// First page of the window the guest keeps dirty.
pub const WINDOW_ADDR: u64 = 0x4030_0000;
/// Guest page size the window is laid out in.
const PAGE_SIZE: u64 = 4096;

/// The assembly source, in the repository.
pub fn source_path() -> PathBuf {
    repo_root().join("integration-tests/guest/dirty.S")
}

/// Guest RAM (MiB) needed to hold a window of `window_pages` pages.
pub fn min_mem_mib(window_pages: u64) -> u64 {
    let end = WINDOW_ADDR - 0x4000_0000 + window_pages * PAGE_SIZE;
    end.div_ceil(1 << 20)
}

/// Assemble the guest into `dir/dirty-N.bin` (`window_pages` a power of two), loaded at
/// [`LOAD_ADDR`].
pub fn build(dir: &Path, window_pages: u64) -> Result<GuestImage> {
    if !window_pages.is_power_of_two() {
        bail!("guest window must be a power of two pages, got {window_pages}");
    }
    let object = dir.join(format!("dirty-{window_pages}.o"));
    let binary = dir.join(format!("dirty-{window_pages}.bin"));
    let source = source_path();
    run(Command::new("aarch64-linux-gnu-as")
        .arg("--defsym")
        .arg(format!("COUNTER_ADDR={COUNTER_ADDR:#x}"))
        .arg("--defsym")
        .arg(format!("WINDOW_ADDR={WINDOW_ADDR:#x}"))
        .arg("--defsym")
        .arg(format!("WINDOW_PAGES={window_pages}"))
        .arg("-o")
        .arg(&object)
        .arg(&source))?;
    run(Command::new("aarch64-linux-gnu-objcopy")
        .args(["-O", "binary"])
        .arg(&object)
        .arg(&binary))?;
    Ok(GuestImage {
        path: binary,
        load_addr: LOAD_ADDR,
    })
}

fn run(command: &mut Command) -> Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?} (binutils-aarch64-linux-gnu installed?)"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A QEMU running (or holding) the counting guest, reachable over QMP: a local [`Vm`] or an inner
/// QEMU of the KVM lab.
pub trait CountingGuest {
    fn qmp(&mut self) -> &mut crate::qmp::Qmp;
    fn name(&self) -> &str;
}

impl CountingGuest for Vm {
    fn qmp(&mut self) -> &mut crate::qmp::Qmp {
        &mut self.qmp
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Read the guest counter through the monitor's physical-memory dump.
pub fn read_counter(vm: &mut impl CountingGuest) -> Result<u64> {
    let out = vm.qmp().hmp(&format!("xp /1xg {COUNTER_ADDR:#x}"))?;
    // "0000000040100000: 0x000000000123abcd"
    let value = out
        .split_once(": ")
        .map(|(_, v)| v.trim())
        .and_then(|v| v.strip_prefix("0x"))
        .ok_or_else(|| anyhow!("{}: unexpected xp output {out:?}", vm.name()))?;
    u64::from_str_radix(value, 16)
        .with_context(|| format!("{}: unexpected xp output {out:?}", vm.name()))
}

/// Wait until the counter moves past `above` (the guest runs), returning the new value.
pub fn wait_counter_above(
    vm: &mut impl CountingGuest,
    above: u64,
    timeout: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let value = read_counter(vm)?;
        if value > above {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            let state = vm
                .qmp()
                .status()
                .unwrap_or_else(|e| format!("unknown ({e})"));
            bail!(
                "{}: guest counter stuck at {value} (wanted > {above}) for {timeout:?}; run state {state}",
                vm.name()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Assert the guest is running: the counter advances twice within `timeout`.
pub fn assert_running(vm: &mut impl CountingGuest, timeout: Duration) -> Result<u64> {
    let first = read_counter(vm)?;
    let second = wait_counter_above(vm, first, timeout)?;
    wait_counter_above(vm, second, timeout)
}

/// Assert the guest is stopped: the counter stays put over `window`.
pub fn assert_stopped(vm: &mut impl CountingGuest, window: Duration) -> Result<u64> {
    let first = read_counter(vm)?;
    thread::sleep(window);
    let second = read_counter(vm)?;
    if first != second {
        bail!(
            "{}: guest counter moved {first} -> {second} while it should be stopped",
            vm.name()
        );
    }
    Ok(second)
}
