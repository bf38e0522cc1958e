//! Real KVM: migrations between emulated ARM64 KVM hosts running the kernels 6.1, 6.12 and 7.3
//! (`integration-tests/src/kvm_lab.rs`, provisioned by `scripts/provision-kvm-lab.sh`).
//!
//! One test per unordered kernel pair boots both hosts once (1 vCPU each: two emulated hosts
//! share the 2 cores) and runs, in that boot:
//! - per host: `migproxy profile capture --from-kvm` inside the host against the profile of a
//!   stream of the same host (same ids, same values except live timer state);
//! - per direction listed in [`EXPECTED`]: the direct migration of the running counting guest,
//!   then the same migration through `migproxy run` on this side, with the DEFAULT policy and
//!   the destination's `--from-kvm` profile.
//!
//! Every step prints `scenario NAME: PASS/FAIL`, with the kernel versions and the direct error.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use migproxy_config::digest::NAME_SEPARATOR;
use migproxy_integration_tests::guest;
use migproxy_integration_tests::kvm_lab::{
    self, compare_kvm_and_stream_profiles, Host, InnerRole, InnerVm, Lab, LAB_MIGRATION_TIMEOUT,
};
use migproxy_integration_tests::migproxy::{self as mp, event_field, Daemon};
use migproxy_integration_tests::qmp::migration_status;
use migproxy_integration_tests::relay::RecordingRelay;
use migproxy_integration_tests::workdir::WorkDir;

/// What a direct migration does.
#[derive(Debug, Clone, Copy)]
enum Direct {
    Completes,
    /// Fails on the destination with this text in its log.
    Fails(&'static str),
}

/// What the same migration through `migproxy run` (default policy) does.
#[derive(Debug, Clone, Copy)]
enum Proxied {
    /// Completes, migproxy changes nothing (the stream is forwarded byte for byte).
    Unchanged,
    /// Completes, migproxy drops exactly these registers.
    Drops(&'static [&'static str]),
    /// Refused by migproxy before the destination loads anything; the refusal names these.
    Refused(&'static [&'static str]),
}

struct Expected {
    source: &'static str,
    dest: &'static str,
    direct: Direct,
    proxied: Proxied,
}

/// THE table: every ordered pair, what the direct migration does and what migproxy must do.
/// Rows marked tentative follow the KVM rules in docs/profiles.md; change them here if the
/// rules decide otherwise.
const EXPECTED: &[Expected] = &[
    Expected {
        source: "6.1",
        dest: "6.12",
        direct: Direct::Completes,
        proxied: Proxied::Unchanged,
    },
    Expected {
        source: "6.1",
        dest: "7.3",
        direct: Direct::Completes,
        proxied: Proxied::Unchanged,
    },
    Expected {
        source: "6.12",
        dest: "7.3",
        direct: Direct::Fails("cpreg_vmstate_array_len"),
        proxied: Proxied::Drops(&["TCR2_EL1", "PIRE0_EL1", "PIR_EL1"]),
    },
    // Tentative: the guest has seen PSCI 1.3, which 6.12 cannot offer.
    Expected {
        source: "7.3",
        dest: "6.12",
        direct: Direct::Fails("Operation not permitted"),
        proxied: Proxied::Refused(&["KVM_REG_ARM_PSCI_VERSION"]),
    },
    // Tentative: the cache geometry the guest has seen (CLIDR_EL1, the CCSIDR entries) cannot
    // be set on 6.1, which keeps the host's; from 7.3 also the PSCI version.
    Expected {
        source: "6.12",
        dest: "6.1",
        direct: Direct::Fails("cpreg_vmstate_array_len"),
        proxied: Proxied::Refused(&["CLIDR_EL1", "CCSIDR"]),
    },
    Expected {
        source: "7.3",
        dest: "6.1",
        direct: Direct::Fails("cpreg_vmstate_array_len"),
        proxied: Proxied::Refused(&["CCSIDR", "KVM_REG_ARM_PSCI_VERSION"]),
    },
];

/// Migration capabilities on both inner QEMUs. The return path lets the source learn that the
/// destination (or migproxy) refused, so it resumes the guest instead of stopping for good.
const CAPABILITIES: &[(&str, bool)] = &[("return-path", true)];

/// vCPUs of each emulated host and of each inner VM (two hosts share 2 cores).
const SMP: u32 = 1;

#[test]
fn kvm_hosts_6_1_and_6_12() {
    run_pair("6.1", "6.12");
}

#[test]
fn kvm_hosts_6_1_and_7_3() {
    run_pair("6.1", "7.3");
}

#[test]
fn kvm_hosts_6_12_and_7_3() {
    run_pair("6.12", "7.3");
}

/// Boot both hosts, then run every step; fail the test (after all steps ran) if any failed.
fn run_pair(a: &str, b: &str) {
    let mut failures = Vec::new();
    let mut dir = match WorkDir::new(&format!("kvm-{a}-{b}")) {
        Ok(dir) => dir,
        Err(err) => panic!("kvm {a}/{b}: cannot set up: {err:#}"),
    };
    let boot_name = format!("kvm-boot-{a}-and-{b}");
    let hosts = step(&boot_name, &mut failures, || boot_pair(&dir, a, b));
    if let Some((host_a, host_b)) = hosts {
        let mut profiles = Vec::new();
        for host in [&host_a, &host_b] {
            let series = &host.kernel.series;
            let name = format!("kvm-{series}-profile-capture-from-kvm");
            let profile = step(&name, &mut failures, || capture_from_kvm(&dir, host));
            // Each kernel boots in two pairs; its stream comparison runs in the first only.
            if let Some(profile) = profile.as_ref().filter(|_| first_boot_of(series)) {
                let name = format!("kvm-{series}-from-kvm-profile-vs-stream");
                step(&name, &mut failures, || profile_check(&dir, host, profile));
            }
            profiles.push(profile);
        }
        for (source, dest, dest_profile) in [
            (&host_a, &host_b, profiles[1].clone()),
            (&host_b, &host_a, profiles[0].clone()),
        ] {
            let Some(expected) = EXPECTED
                .iter()
                .find(|e| e.source == source.kernel.series && e.dest == dest.kernel.series)
            else {
                continue;
            };
            let pair = format!("{}-to-{}", expected.source, expected.dest);
            step(&format!("kvm-{pair}-direct"), &mut failures, || {
                direct(source, dest, expected.direct)
            });
            step(
                &format!("kvm-{pair}-through-migproxy"),
                &mut failures,
                || {
                    let Some(profile) = &dest_profile else {
                        bail!("no --from-kvm profile of the {} host", dest.kernel.series);
                    };
                    proxied(&dir, source, dest, profile, expected.proxied)
                },
            );
        }
        if !failures.is_empty() {
            for host in [&host_a, &host_b] {
                eprintln!(
                    "----- {} console (last 40 lines) -----\n{}",
                    host.name,
                    kvm_lab::tail(&host.console_text(), 40)
                );
            }
        }
    }
    if !failures.is_empty() {
        dir.keep();
        eprintln!("kvm {a}/{b}: logs kept in {}", dir.path().display());
        panic!("kvm {a}/{b}: failed: {}", failures.join(", "));
    }
}

/// Whether this is the first time this test process booted `series` (tests share the process).
fn first_boot_of(series: &str) -> bool {
    static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    SEEN.lock()
        .map_or(true, |mut seen| seen.insert(series.to_owned()))
}

/// Run one named step, print its scenario line, record a failure; returns its value on success.
fn step<T>(name: &str, failures: &mut Vec<String>, body: impl FnOnce() -> Result<T>) -> Option<T> {
    let started = Instant::now();
    eprintln!("scenario {name}: start");
    match body() {
        Ok(value) => {
            eprintln!(
                "scenario {name}: PASS in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Some(value)
        }
        Err(err) => {
            eprintln!(
                "scenario {name}: FAIL after {:.1} s: {err:#}",
                started.elapsed().as_secs_f64()
            );
            failures.push(name.to_owned());
            None
        }
    }
}

fn boot_pair(dir: &WorkDir, a: &str, b: &str) -> Result<(Host, Host)> {
    let lab = Lab::get()?;
    let guest_image = guest::build(
        dir.path(),
        migproxy_integration_tests::scenario::E2E_WINDOW_PAGES,
    )?;
    let (ka, kb) = (lab.kernel(a)?, lab.kernel(b)?);
    let (ia, ib) = (
        lab.initrd(dir, ka, &guest_image.path)?,
        lab.initrd(dir, kb, &guest_image.path)?,
    );
    // Both boots at once: each host is single-threaded TCG.
    let (ra, rb) = std::thread::scope(|scope| {
        let ja = scope.spawn(|| Host::boot(dir, &format!("host-{a}"), ka, &ia, SMP));
        let jb = scope.spawn(|| Host::boot(dir, &format!("host-{b}"), kb, &ib, SMP));
        (ja.join(), jb.join())
    });
    let ha = ra.map_err(|_| anyhow::anyhow!("boot thread panicked"))??;
    let hb = rb.map_err(|_| anyhow::anyhow!("boot thread panicked"))??;
    Ok((ha, hb))
}

/// `migproxy profile capture --from-kvm` inside the host; returns the profile's path here (the
/// destination profile of the proxied runs).
fn capture_from_kvm(dir: &WorkDir, host: &Host) -> Result<PathBuf> {
    let kvm_json = host.capture_kvm_profile()?;
    let profile =
        migproxy_config::Profile::from_json(&kvm_json).context("parsing the --from-kvm profile")?;
    let path = dir.join(&format!("from-kvm-{}.json", host.kernel.series));
    std::fs::write(&path, &kvm_json)?;
    eprintln!(
        "  kernel {} ({}): {} registers; {}",
        host.kernel.release,
        host.kernel.package,
        profile.present().count(),
        profile.captured_from.as_deref().unwrap_or("")
    );
    Ok(path)
}

/// The `--from-kvm` profile against the profile of a fresh inner VM's stream on the same host.
fn profile_check(dir: &WorkDir, host: &Host, kvm_path: &Path) -> Result<()> {
    let series = host.kernel.series.clone();
    let kvm_json = std::fs::read_to_string(kvm_path)?;
    let stream = dir.join(&format!("fresh-{series}.stream"));
    let length = host.save_fresh_stream(&stream, SMP)?;
    let stream_profile = dir.join(&format!("from-stream-{series}.json"));
    mp::capture_profile(
        &stream,
        &Lab::get()?.inner_qemu_version()?,
        &stream_profile,
        None,
    )?;
    let kvm =
        migproxy_config::Profile::from_json(&kvm_json).context("parsing the --from-kvm profile")?;
    let from_stream = migproxy_config::Profile::load(&stream_profile)?;
    let summary = compare_kvm_and_stream_profiles(&kvm, &from_stream)?;
    eprintln!("  stream {length} bytes; {summary}");
    Ok(())
}

/// Start the destination's inner QEMU waiting for a migration on its forwarded port and the
/// source's inner QEMU running the counting guest.
fn start_pair(source: &Host, dest: &Host) -> Result<(InnerVm, InnerVm)> {
    let mut d = dest.start_inner("dst", SMP, InnerRole::Incoming)?;
    d.qmp.set_capabilities(CAPABILITIES)?;
    d.qmp.execute(
        "migrate-incoming",
        json!({ "uri": format!("tcp:0.0.0.0:{}", kvm_lab::INNER_INCOMING_PORT) }),
    )?;
    let mut s = source.start_inner("src", SMP, InnerRole::Guest)?;
    s.qmp.set_capabilities(CAPABILITIES)?;
    guest::wait_counter_above(&mut s, 0, Duration::from_secs(60))
        .context("source guest never started counting")?;
    Ok((s, d))
}

/// Stop both inner QEMUs whatever happened (the next step starts fresh ones).
fn stop_pair(source: &Host, dest: &Host, s: InnerVm, d: InnerVm) {
    let _ = source.stop_inner(s);
    let _ = dest.stop_inner(d);
}

fn versions(source: &Host, dest: &Host) -> String {
    format!(
        "{} ({}) -> {} ({})",
        source.kernel.release, source.kernel.package, dest.kernel.release, dest.kernel.package
    )
}

fn direct(source: &Host, dest: &Host, expected: Direct) -> Result<()> {
    let (mut s, mut d) = start_pair(source, dest)?;
    let outcome = direct_body(source, dest, &mut s, &mut d, expected);
    stop_pair(source, dest, s, d);
    outcome
}

fn direct_body(
    source: &Host,
    dest: &Host,
    s: &mut InnerVm,
    d: &mut InnerVm,
    expected: Direct,
) -> Result<()> {
    s.qmp.execute(
        "migrate",
        json!({ "uri": format!("tcp:10.0.2.2:{}", dest.incoming_port) }),
    )?;
    let source_info = s.qmp.wait_migration(&[], LAB_MIGRATION_TIMEOUT)?;
    match expected {
        Direct::Completes => {
            assert_migrated(s, d, &source_info)?;
            eprintln!("  direct {}: completed", versions(source, dest));
        }
        Direct::Fails(text) => {
            let error = wait_dest_failure(dest, d)?;
            if !error.contains(text) {
                bail!("the destination failed with {error:?}, expected it to mention {text:?}");
            }
            eprintln!(
                "  direct {}: destination failed: {error}",
                versions(source, dest)
            );
            // Reported, not asserted: what the source does after a direct failure is QEMU's
            // business (with the return path it should resume the guest).
            let state = s.qmp.status().unwrap_or_else(|e| format!("unknown ({e})"));
            eprintln!(
                "  direct: source migration {}, run state {state}",
                migration_status(&source_info)
            );
        }
    }
    Ok(())
}

/// The destination's load error: its run state leaves `inmigrate` (QEMU exits or reports
/// failed); the error text is in its log.
fn wait_dest_failure(dest: &Host, d: &mut InnerVm) -> Result<String> {
    let deadline = Instant::now() + LAB_MIGRATION_TIMEOUT;
    loop {
        let info = d.qmp.query_migrate();
        let failed = match &info {
            Ok(info) => migration_status(info) == "failed",
            Err(_) => true, // QEMU exited (a load failure ends an -incoming QEMU)
        };
        if failed {
            let log = dest.inner_log(d);
            let error = log
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join(" | ");
            if let Ok(status) = d.qmp.status() {
                if status == "running" {
                    bail!("the destination runs the guest after a failed migration");
                }
            }
            return Ok(error);
        }
        if let Ok(status) = d.qmp.status() {
            if status == "running" {
                bail!("the destination runs the guest: the direct migration succeeded");
            }
        }
        if Instant::now() >= deadline {
            bail!("the destination neither failed nor ran within {LAB_MIGRATION_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Completed: the source stopped, the destination runs and its counter continues.
fn assert_migrated(
    s: &mut InnerVm,
    d: &mut InnerVm,
    source_info: &serde_json::Value,
) -> Result<()> {
    if migration_status(source_info) != "completed" {
        bail!(
            "source migration ended {}: {source_info}",
            migration_status(source_info)
        );
    }
    let stopped_at = guest::read_counter(s)?;
    d.qmp
        .wait_status("running", Duration::from_secs(60))
        .context("destination never ran the guest")?;
    let first = guest::read_counter(d)?;
    if first < stopped_at {
        bail!("destination counter {first} below the source's last value {stopped_at}");
    }
    let later = guest::assert_running(d, Duration::from_secs(30))?;
    eprintln!("  source stopped at counter {stopped_at}; destination continued {first} -> {later}");
    Ok(())
}

fn proxied(
    dir: &WorkDir,
    source: &Host,
    dest: &Host,
    dest_profile: &Path,
    expected: Proxied,
) -> Result<()> {
    let (mut s, mut d) = start_pair(source, dest)?;
    let outcome =
        proxied_body(dir, source, dest, &mut s, &mut d, dest_profile, expected).map_err(|err| {
            let log = dest.inner_log(&d);
            err.context(format!(
                "destination QEMU said: {}",
                kvm_lab::tail(log.trim(), 6).replace('\n', " | ")
            ))
        });
    stop_pair(source, dest, s, d);
    outcome
}

fn proxied_body(
    dir: &WorkDir,
    source: &Host,
    dest: &Host,
    s: &mut InnerVm,
    d: &mut InnerVm,
    dest_profile: &Path,
    expected: Proxied,
) -> Result<()> {
    let listen = migproxy_integration_tests::ports::free_port()?;
    let pair = format!("{}-to-{}", source.kernel.series, dest.kernel.series);
    // Recording relays on both sides of migproxy: what the source sent and what the destination
    // received, compared byte for byte where migproxy must change nothing.
    let recordings = dir.join(&format!("recorded-{pair}"));
    let (rec_in, rec_out) = (recordings.join("into-migproxy"), recordings.join("to-dest"));
    std::fs::create_dir_all(&rec_in)?;
    std::fs::create_dir_all(&rec_out)?;
    let localhost = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let to_dest = RecordingRelay::start(localhost(dest.incoming_port), &rec_out)?;
    let daemon = Daemon::spawn(
        dir,
        &format!("migproxy-{pair}"),
        listen,
        &format!("tcp:127.0.0.1:{}", to_dest.port()),
        &[
            "--dest-profile".into(),
            dest_profile.display().to_string(),
            // Explicitly without a source reference: that a fresh inner KVM VM's description
            // confirms a running KVM guest's (no subsection only a running vCPU sends) has not
            // been measured in the lab yet, and each lab step costs minutes of emulated boot.
            // So the lab keeps the candidate rule, whose exposure (a guest can fail its own
            // migration) does not change what these steps check.
            "--unreferenced-device-phase".into(),
            "allow".into(),
        ],
    )?;
    let into_migproxy = RecordingRelay::start(localhost(listen), &rec_in)?;
    s.qmp.execute(
        "migrate",
        json!({ "uri": format!("tcp:10.0.2.2:{}", into_migproxy.port()) }),
    )?;
    let source_info = s.qmp.wait_migration(&[], LAB_MIGRATION_TIMEOUT)?;
    let summary = daemon.wait_summary(Duration::from_secs(60))?;
    let (outcome, reason, dropped, rewritten) = (
        event_field(&summary, "outcome"),
        event_field(&summary, "reason"),
        event_field(&summary, "dropped"),
        event_field(&summary, "cpus_rewritten"),
    );
    eprintln!(
        "  migproxy {}: outcome={outcome} cpus_rewritten={rewritten} dropped=[{dropped}] filled=[{}] reason={reason}",
        versions(source, dest),
        event_field(&summary, "filled")
    );
    match expected {
        Proxied::Unchanged | Proxied::Drops(_) => {
            if outcome != "completed" {
                bail!("migproxy outcome {outcome}, expected completed: {reason}");
            }
            assert_migrated(s, d, &source_info)?;
            let want: Vec<&str> = match expected {
                Proxied::Drops(names) => names.to_vec(),
                _ => Vec::new(),
            };
            let mut got: Vec<&str> = dropped
                .split(NAME_SEPARATOR)
                .filter(|n| !n.is_empty())
                .collect();
            let mut want_sorted = want.clone();
            got.sort_unstable();
            want_sorted.sort_unstable();
            if got != want_sorted {
                bail!(
                    "migproxy dropped [{dropped}], expected [{}]",
                    want.join(NAME_SEPARATOR)
                );
            }
            if matches!(expected, Proxied::Unchanged) {
                if rewritten != "0" {
                    bail!("migproxy rewrote {rewritten} vCPU(s) where the stream should pass unchanged");
                }
                let sent_path = into_migproxy.recording(0, "s2d");
                let received_path = to_dest.recording(0, "s2d");
                into_migproxy.finish(LAB_MIGRATION_TIMEOUT)?;
                to_dest.finish(LAB_MIGRATION_TIMEOUT)?;
                let sent = std::fs::read(&sent_path)?;
                let received = std::fs::read(&received_path)?;
                if sent != received {
                    let at = sent
                        .iter()
                        .zip(&received)
                        .take_while(|(a, b)| a == b)
                        .count();
                    bail!(
                        "the destination received {} bytes that differ from the {} the source sent \
                         (first difference at byte {at})",
                        received.len(),
                        sent.len()
                    );
                }
                eprintln!("  stream forwarded byte for byte: {} bytes", sent.len());
            }
        }
        Proxied::Refused(names) => {
            if outcome != "refused" {
                bail!("migproxy outcome {outcome}, expected refused");
            }
            if migration_status(&source_info) != "failed" {
                bail!(
                    "source migration ended {}, expected failed",
                    migration_status(&source_info)
                );
            }
            s.qmp
                .wait_status("running", Duration::from_secs(60))
                .context("source did not resume the guest")?;
            let value = guest::assert_running(s, Duration::from_secs(30))?;
            let dest_state = d.qmp.status().unwrap_or_else(|_| "exited".into());
            if dest_state == "running" {
                bail!("the destination runs a guest after the refusal");
            }
            eprintln!("  source still running (counter {value}); destination {dest_state}");
            for n in names {
                if !reason.contains(n) {
                    bail!("the refusal does not name {n}: {reason}");
                }
            }
        }
    }
    Ok(())
}
