#![forbid(unsafe_code)]
//! Test harness that migrates real QEMU guests, directly and through the `migproxy` binary.
//!
//! One module per job:
//! - [`qemu`]: find the two QEMU builds, spawn VMs with a guard that kills them on drop;
//! - [`qmp`]: a small synchronous QMP client (capabilities, commands with deadlines, polling);
//! - [`ports`]: free loopback ports;
//! - [`guest`]: the bare-metal counting guest, assembled at test time, and its counter;
//! - [`kvm_lab`]: emulated ARM64 KVM hosts (three kernels) and the inner QEMUs they run;
//! - [`libvirt`]: a two-host libvirt lab (network and mount namespaces) for `virsh migrate`;
//! - [`migproxy`]: the `migproxy` binary: `profile capture` and a guarded `run` daemon;
//! - [`relay`]: a recording TCP relay (used by the vector capture tool);
//! - [`workdir`]: per-scenario scratch directories;
//! - [`scenario`]: the scaffolding every scenario shares (logs on failure, guests, profiles);
//! - [`flows`]: the migrations scenarios run (pairs, proxy in between, outcome checks).

pub mod flows;
pub mod guest;
pub mod kvm_lab;
pub mod libvirt;
pub mod migproxy;
pub mod ports;
pub mod qemu;
pub mod qmp;
pub mod relay;
pub mod scenario;
pub mod workdir;

use std::time::Duration;

/// How long a QEMU may take to come up and answer QMP (TCG start-up on a loaded 2-core machine).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one migration of the small test guests may take before a scenario gives up.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
