//! A two-host libvirt lab on one machine, for `virsh migrate` through migproxy.
//!
//! Each "host" is a network namespace (joined to the other by a veth pair, [`HOST_A_IP`] and
//! [`HOST_B_IP`]) running `libvirtd` in the foreground, without systemd, inside a private mount
//! namespace set up by `integration-tests/libvirt/host.sh`: its own `/run`, an overlay on `/var`,
//! its own `/etc/libvirt` (socket directory, a `host_uuid` per host so libvirt does not refuse a
//! migration "to the same host", root QEMUs without cgroups or namespaces) and a `libvirt-qemu`
//! user that exists only there. Host A runs QEMU 7.2 and the system's libvirt (Debian 12: 9.0),
//! host B QEMU 10.0 and either the system's libvirt or a privately unpacked one ([`Libvirt`],
//! scripts/provision-libvirt.sh: 11.3); [`Lab::start_with`] picks other QEMU builds (11.1).
//! Both QEMUs sit at the same
//! `<emulator>` path ([`EMULATOR`]), so a domain migrates between QEMU builds exactly as it would
//! between two upgraded and not-yet-upgraded hypervisors.
//!
//! Nothing outlives the lab: dropping it kills every process in both namespaces by id and deletes
//! the namespaces. The namespaces and the libvirtd ids are recorded in a state file first, so the
//! next lab cleans up after a run that crashed (or was killed) before it could tear down.
//! Needs root, `libvirtd`/`virsh` (libvirt-daemon-driver-qemu, libvirt-clients), `ip`, `unshare`
//! and `nft` (scripts/debian-packages.txt).
//!
//! One file per job: [`lab`] (namespaces, both hosts, teardown), [`host`] (one libvirtd: its
//! configuration, start-up, `virsh`), [`domain`] (the test domain and its guest counter),
//! [`nft`] (the guide's rulesets inside a host), [`builds`] (which libvirt a host runs),
//! [`cleanup`] (leftovers of crashed runs, by process id), [`command`] (bounded child processes).

mod builds;
mod cleanup;
mod command;
mod domain;
mod host;
mod lab;
mod nft;

use std::net::Ipv4Addr;
use std::time::Duration;

pub use builds::Libvirt;
pub use command::run_with_deadline;
pub use domain::domain_xml;
pub use host::Host;
pub use lab::Lab;

/// Host A's address (QEMU 7.2).
pub const HOST_A_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// Host B's address (QEMU 10.0).
pub const HOST_B_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
/// The `<emulator>` of every lab domain: each host's own QEMU build, placed by host.sh.
pub const EMULATOR: &str = "/run/migproxy-lab/qemu-system-aarch64";
/// libvirt's default migration port range (qemu.conf `migration_port_min`/`_max`), which the lab
/// keeps, as OpenStack Nova does.
pub const MIGRATION_PORTS: (u16, u16) = (49152, 49215);
/// How long one `virsh` call may take, `virsh migrate` of the small test guest included.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(120);
