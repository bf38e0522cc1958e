//! The test domain on a lab host: defined, started, its guest counter read through `virsh`.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::host::Host;
use super::EMULATOR;
use crate::guest;
use crate::qemu::GuestImage;

/// How long a guest may take to show it runs.
const LIVENESS: Duration = Duration::from_secs(20);

impl Host {
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
