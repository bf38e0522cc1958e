//! `migproxy profile capture`: write a destination register profile.
//!
//! Three sources, one result (`migproxy_config::Profile`):
//! - `--from-stream FILE|-`: any migration stream a *fresh, never-started* destination VM produced
//!   (same QEMU, machine type, CPU model and features): its `cpu` sections carry the reset values;
//! - `--from-qmp SOCKET`: drive such a throwaway QEMU (started with `-S`) to produce that stream
//!   into a socket of ours. Afterwards that QEMU sits in the `postmigrate` state: it has served its
//!   purpose and should be shut down;
//! - `--from-kvm`: ask KVM directly (aarch64 hosts only; see `migproxy_config::kvm`).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use migproxy_config::{Accel, Profile};

use crate::cli::{AccelArg, CaptureArgs};
use crate::error::ProxyError;
use crate::migration::source_reference::SourceReference;
use crate::offline::input::{Input, StreamCpus};
use crate::offline::qmp::Qmp;

pub fn capture(args: &CaptureArgs) -> Result<(), ProxyError> {
    let accel_override = args.accel.map(|a| match a {
        AccelArg::Tcg => Accel::Tcg,
        AccelArg::Kvm => Accel::Kvm,
    });
    if args.save_reference.is_some() && args.from_kvm {
        return Err(ProxyError::Usage(
            "--save-reference needs a migration stream (--from-stream or --from-qmp); KVM has no device-state layout to save".into(),
        ));
    }
    let mut profile = if let Some(path) = &args.from_stream {
        let stream = Input::open(path)?.read_cpus()?;
        save_reference(args.save_reference.as_deref(), &stream)?;
        profile_from_stream(&stream, accel_override, "stream")?
    } else if let Some(socket) = &args.from_qmp {
        capture_from_qmp(socket, accel_override, args.save_reference.as_deref())?
    } else if args.from_kvm {
        let mut profile = migproxy_config::kvm::capture()?;
        if let Some(accel) = accel_override {
            profile.accel = accel;
        }
        profile
    } else {
        return Err(ProxyError::Usage(
            "give one of --from-stream, --from-qmp, --from-kvm".into(),
        ));
    };
    if let Some(version) = &args.qemu_version {
        if migproxy_config::subsections::cpu_vmstate_for(version).is_none() {
            eprintln!(
                "migproxy: warning: migproxy has no cpu subsection list for QEMU {version}: only \
                 subsections every known build loads will pass (docs/profiles.md, Subsections)"
            );
        }
        profile.qemu_version = Some(version.clone());
    }
    write_output(args.output.as_deref(), profile.to_json().as_bytes())?;
    let masks = profile
        .present()
        .filter(|r| r.writable_mask.is_some())
        .count();
    eprintln!(
        "migproxy: profile: {} registers, {} vcpus, accel {}, machine {}{}",
        profile.present().count(),
        profile.vcpus,
        profile.accel,
        profile.machine.as_deref().unwrap_or("unknown"),
        if masks > 0 {
            format!(", writable masks for {masks} id registers")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Build a profile from a decoded stream: machine and section version from the stream, the
/// accelerator from the register list unless overridden.
pub(crate) fn profile_from_stream(
    stream: &StreamCpus,
    accel_override: Option<Accel>,
    captured_from: &str,
) -> Result<Profile, ProxyError> {
    let all_ids = stream
        .cpus
        .iter()
        .flat_map(|c| c.registers.iter().map(|(id, _)| id));
    let accel = match accel_override.or_else(|| Accel::detect(all_ids)) {
        Some(a) => a,
        None => {
            return Err(ProxyError::Usage(
                "cannot tell the accelerator from the register list (no AArch32 views, no \
                 firmware registers): pass --accel tcg or --accel kvm"
                    .into(),
            ))
        }
    };
    let vcpus: Vec<(u32, Vec<(u64, u64)>)> = stream
        .cpus
        .iter()
        .map(|c| (c.instance, c.registers.clone()))
        .collect();
    let mut profile = Profile::from_vcpus(accel, &vcpus)?;
    profile.machine = stream.info.machine.clone();
    profile.cpu_section_version = stream.cpus.first().map(|c| c.section_version);
    profile.captured_from = Some(captured_from.to_owned());
    Ok(profile)
}

/// `--save-reference FILE`: the stream's description, the source reference a rewriting
/// `migproxy run` needs (`--source-reference`). Checked as a reference before it is written.
fn save_reference(path: Option<&Path>, stream: &StreamCpus) -> Result<(), ProxyError> {
    let Some(path) = path else {
        return Ok(());
    };
    let reference = SourceReference::parse(
        bytes::Bytes::copy_from_slice(&stream.description),
        &path.display().to_string(),
    )?;
    write_output(Some(path), &reference.description)?;
    eprintln!(
        "migproxy: reference description ({} devices, {} bytes) written to {}: give it to the proxy in front of this VM's destination as --source-reference",
        reference.layout.devices(),
        reference.description.len(),
        path.display()
    );
    Ok(())
}

fn write_output(path: Option<&Path>, bytes: &[u8]) -> Result<(), ProxyError> {
    match path {
        None => std::io::stdout()
            .write_all(bytes)
            .map_err(|e| ProxyError::io("write standard output", e)),
        Some(p) if p == Path::new("-") => std::io::stdout()
            .write_all(bytes)
            .map_err(|e| ProxyError::io("write standard output", e)),
        Some(p) => std::fs::write(p, bytes)
            .map_err(|e| ProxyError::io(format!("write {}", p.display()), e)),
    }
}

// ---- --from-qmp ----

/// How long the throwaway QEMU may take to migrate its (mostly zero) RAM to us.
const QMP_MIGRATE_DEADLINE: Duration = Duration::from_secs(120);

fn capture_from_qmp(
    socket: &Path,
    accel_override: Option<Accel>,
    reference: Option<&Path>,
) -> Result<Profile, ProxyError> {
    let mut qmp = Qmp::connect(socket)?;
    let version = qmp.execute("query-version", serde_json::json!({}))?;
    let qemu_version = version.get("qemu").and_then(|q| {
        Some(format!(
            "{}.{}.{}",
            q.get("major")?.as_u64()?,
            q.get("minor")?.as_u64()?,
            q.get("micro")?.as_u64()?
        ))
    });
    let status = qmp.execute("query-status", serde_json::json!({}))?;
    let state = status
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("unknown")
        .to_owned();
    if state != "prelaunch" {
        // A VM that ran has guest-written values, not reset defaults.
        eprintln!(
            "migproxy: warning: the VM is in state {state:?}, not \"prelaunch\" (-S, never \
             started): the profile holds its current values, not reset defaults"
        );
    }
    let accel_hint = qmp
        .execute("query-kvm", serde_json::json!({}))
        .ok()
        .and_then(|k| k.get("enabled").and_then(|e| e.as_bool()))
        .map(|kvm| if kvm { Accel::Kvm } else { Accel::Tcg });

    // QEMU connects to a socket of ours; we decode what it sends as it arrives.
    let sock_path = capture_socket_path();
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path)
        .map_err(|e| ProxyError::io(format!("bind {}", sock_path.display()), e))?;
    let cleanup = RemoveOnDrop(sock_path.clone());
    let uri = format!("unix:{}", sock_path.display());
    qmp.execute("migrate", serde_json::json!({ "uri": uri }))?;
    let conn = accept_migration(&listener, &mut qmp)?;
    drop(cleanup);
    let origin = format!("migration stream from {}", socket.display());
    let stream = Input::from_reader(conn, origin).read_cpus()?;

    let deadline = Instant::now() + QMP_MIGRATE_DEADLINE;
    loop {
        let info = qmp.execute("query-migrate", serde_json::json!({}))?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => {
                return Err(qmp.protocol(&format!(
                    "migration {}: {}",
                    info.get("status")
                        .and_then(|s| s.as_str())
                        .unwrap_or("failed"),
                    info.get("error-desc")
                        .and_then(|s| s.as_str())
                        .unwrap_or("no description")
                )))
            }
            _ if Instant::now() > deadline => {
                return Err(qmp.protocol("migration did not complete in time"))
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    eprintln!(
        "migproxy: the QEMU behind {} is now in the postmigrate state; shut it down",
        socket.display()
    );
    save_reference(reference, &stream)?;
    let mut profile = profile_from_stream(&stream, accel_override.or(accel_hint), "qmp")?;
    profile.qemu_version = qemu_version;
    Ok(profile)
}

/// Wait for QEMU's migration connection, watching `query-migrate` so a migration that fails
/// before connecting (wrong state, bad capability) is reported instead of waited on forever.
fn accept_migration(listener: &UnixListener, qmp: &mut Qmp) -> Result<UnixStream, ProxyError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| ProxyError::io("capture socket", e))?;
    let deadline = Instant::now() + QMP_MIGRATE_DEADLINE;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)
                    .map_err(|e| ProxyError::io("migration connection", e))?;
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ProxyError::io("accept the migration connection", e)),
        }
        let info = qmp.execute("query-migrate", serde_json::json!({}))?;
        if let Some(status @ ("failed" | "cancelled")) = info.get("status").and_then(|s| s.as_str())
        {
            return Err(qmp.protocol(&format!(
                "migration {status} before connecting: {}",
                info.get("error-desc")
                    .and_then(|s| s.as_str())
                    .unwrap_or("no description")
            )));
        }
        if Instant::now() > deadline {
            return Err(qmp.protocol("QEMU did not connect to the capture socket in time"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn capture_socket_path() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("migproxy-capture-{}-{n}.sock", std::process::id()))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migproxy_codec::{CpuRegisters, StreamInfo};

    fn stream(ids: &[u64]) -> StreamCpus {
        let registers: Vec<(u64, u64)> = ids.iter().map(|&id| (id, 0)).collect();
        StreamCpus {
            info: StreamInfo {
                machine: Some("virt-7.2".into()),
                ..StreamInfo::default()
            },
            cpus: vec![CpuRegisters {
                instance: 0,
                section_version: 22,
                registers,
            }],
            subsections: Vec::new(),
            description: Vec::new(),
        }
    }

    #[test]
    fn accelerator_from_the_list_or_the_flag() {
        let tcg = stream(&[0x4020_0000_200f_0082, 0x6030_0000_0013_c080]);
        let kvm = stream(&[0x6030_0000_0013_c080, 0x6030_0000_0014_0000]);
        let neither = stream(&[0x6030_0000_0013_c080]);
        let accel = |s: &StreamCpus, o| profile_from_stream(s, o, "stream").map(|p| p.accel).ok();
        assert_eq!(accel(&tcg, None), Some(Accel::Tcg));
        assert_eq!(accel(&kvm, None), Some(Accel::Kvm));
        assert_eq!(accel(&tcg, Some(Accel::Kvm)), Some(Accel::Kvm));
        assert_eq!(accel(&neither, Some(Accel::Tcg)), Some(Accel::Tcg));
        match profile_from_stream(&neither, None, "stream") {
            Err(e) => assert_eq!(e.exit_code(), 2),
            Ok(_) => panic!("guessed an accelerator"),
        }
        let p = profile_from_stream(&tcg, None, "stream").ok();
        assert_eq!(
            p.as_ref().and_then(|p| p.machine.clone()).as_deref(),
            Some("virt-7.2")
        );
        assert_eq!(p.and_then(|p| p.cpu_section_version), Some(22));
    }
}
