//! `migproxy profile capture`, `plan` and `rewrite` against real QEMU 7.2, 10.0 and 11.1.
//!
//! - a stream saved from a *running* a64fx guest on one version, rewritten offline with both
//!   fresh profiles, loads on the other version (`-incoming "exec:cat FILE"`) and the guest goes on
//!   counting there; the same stream unrewritten fails with the destination's own errors;
//! - from 11.1 to 10.0 and 7.2, `plan` shows the idle `cpu/wfxt-timer` removed next to the
//!   registers, and the rewritten stream loads (unrewritten, 10.0 aborts and 7.2 refuses);
//! - `plan` for the cortex-a57 pair names ID_DFR0_EL1 with both values and exits 3;
//! - a stream rewritten for its own profile is byte-identical;
//! - `--from-qmp` captures the same registers as `--from-stream`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use migproxy_integration_tests::guest;
use migproxy_integration_tests::migproxy::run_command;
use migproxy_integration_tests::qemu::Version::{self, V10, V111, V72};
use migproxy_integration_tests::qemu::{Vm, VmConfig};
use migproxy_integration_tests::qmp::migration_status;
use migproxy_integration_tests::scenario::{
    self, a64fx, save_fresh_stream, shell_quote, Scenario, LIVENESS_TIMEOUT,
};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Save the stream of a running a64fx guest on `version` with `exec:cat > FILE`.
fn save_running_stream(s: &mut Scenario, version: Version, file: &Path) -> Result<()> {
    let mut source = s.start_source(&format!("src-{}", version.tag()), &a64fx(version))?;
    source.qmp.execute(
        "migrate",
        json!({ "uri": format!("exec:cat > {}", shell_quote(file)) }),
    )?;
    let info = source
        .qmp
        .wait_migration(&[], migproxy_integration_tests::MIGRATION_TIMEOUT)?;
    if migration_status(&info) != "completed" {
        bail!(
            "saving the running stream failed: {info}; log: {}",
            source.log()
        );
    }
    source.quit()
}

/// `migproxy rewrite IN OUT --dest-profile D --source-profile S`; returns its standard error.
fn rewrite(input: &Path, output: &Path, dest: &Path, source: Option<&Path>) -> Result<String> {
    let (i, o, d) = (display(input), display(output), display(dest));
    let mut args = vec!["rewrite", &i, &o, "--dest-profile", &d];
    let s = source.map(display);
    if let Some(s) = &s {
        args.extend(["--source-profile", s]);
    }
    let out = run_command(&args, COMMAND_TIMEOUT)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "migproxy {} failed ({}): {stderr}",
            args.join(" "),
            out.status
        );
    }
    Ok(stderr)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// A destination of `version` loading `file` with `-incoming "exec:cat FILE"` and no `-S`.
fn incoming_from_file(version: Version, file: &Path) -> VmConfig {
    let mut config = a64fx(version);
    config.extra_args = vec![
        "-incoming".into(),
        format!("exec:cat {}", shell_quote(file)),
    ];
    config
}

/// The destination loads `file` and runs the guest on.
fn assert_loads_and_runs(s: &mut Scenario, version: Version, file: &Path) -> Result<()> {
    let mut dest = Vm::spawn(
        &s.dir,
        &format!("dst-{}", version.tag()),
        &incoming_from_file(version, file),
    )?;
    let info = dest
        .qmp
        .wait_migration(&[], migproxy_integration_tests::MIGRATION_TIMEOUT)
        .with_context(|| format!("destination log: {}", dest.log()))?;
    if migration_status(&info) != "completed" {
        bail!(
            "{version} did not load the stream: {info}; log: {}",
            dest.log()
        );
    }
    dest.qmp
        .wait_status("running", Duration::from_secs(30))
        .with_context(|| format!("destination log: {}", dest.log()))?;
    let counter = guest::assert_running(&mut dest, LIVENESS_TIMEOUT)?;
    eprintln!(
        "  {version} loaded {} and the guest counts on ({counter})",
        file.display()
    );
    dest.quit()
}

/// The destination refuses `file` with every one of `errors` in its log and exits.
fn assert_load_fails(
    s: &mut Scenario,
    version: Version,
    file: &Path,
    errors: &[&str],
) -> Result<()> {
    let name = format!("dst-raw-{}", version.tag());
    let log = match Vm::spawn(&s.dir, &name, &incoming_from_file(version, file)) {
        Ok(mut vm) => {
            // A failed `-incoming` load makes QEMU exit.
            vm.wait_exit(migproxy_integration_tests::MIGRATION_TIMEOUT)?;
            vm.log()
        }
        // QEMU may die before its QMP socket answers.
        Err(_) => std::fs::read_to_string(s.dir.join(&format!("{name}.log"))).unwrap_or_default(),
    };
    for error in errors {
        if !log.contains(error) {
            bail!("{version} log lacks {error:?}: {log}");
        }
    }
    Ok(())
}

fn rewrite_loads(s: &mut Scenario, from: Version, to: Version, errors: &[&str]) -> Result<()> {
    let source_profile = s.profile(&a64fx(from))?;
    let dest_profile = s.profile(&a64fx(to))?;
    let raw = s.dir.join("running.stream");
    save_running_stream(s, from, &raw)?;
    let rewritten = s.dir.join("rewritten.stream");
    let report = rewrite(&raw, &rewritten, &dest_profile, Some(&source_profile))?;
    eprintln!("{report}");
    assert_loads_and_runs(s, to, &rewritten)?;
    assert_load_fails(s, to, &raw, errors)
}

#[test]
fn rewritten_10_0_stream_loads_in_7_2() {
    scenario::run("offline_rewrite_10_to_72", |s| {
        rewrite_loads(
            s,
            V10,
            V72,
            &[
                "Invalid value 261 expecting positive value <= 248",
                "Failed to load cpu:cpreg_vmstate_array_len",
            ],
        )
    });
}

#[test]
fn rewritten_7_2_stream_loads_in_10_0() {
    scenario::run("offline_rewrite_72_to_10", |s| {
        rewrite_loads(
            s,
            V72,
            V10,
            &["error while loading state for instance 0x0 of device 'cpu'"],
        )
    });
}

/// `plan` for a running 11.1 stream towards `to`: the idle wfxt timer is removed for each vCPU,
/// listed under that vCPU's registers, and the verdict is positive; then the rewrite loads.
fn plan_and_rewrite_from_11_1(s: &mut Scenario, to: Version, errors: &[&str]) -> Result<()> {
    let source_profile = s.profile(&a64fx(V111))?;
    let dest_profile = s.profile(&a64fx(to))?;
    let raw = s.dir.join("running.stream");
    save_running_stream(s, V111, &raw)?;
    let (src, dst, sp) = (
        display(&raw),
        display(&dest_profile),
        display(&source_profile),
    );
    let out = run_command(
        &[
            "plan",
            // Per vCPU (the default digest would share one block between alike vCPUs).
            "--all",
            "--source",
            &src,
            "--dest-profile",
            &dst,
            "--source-profile",
            &sp,
        ],
        COMMAND_TIMEOUT,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("plan exited {}: {stdout}", out.status);
    }
    for vcpu in ["vcpu 0", "vcpu 1"] {
        let block = stdout
            .split(&format!("{vcpu}: subsections: 1 removed, 0 refused"))
            .nth(1)
            .with_context(|| format!("plan shows no removed subsection for {vcpu}: {stdout}"))?;
        if !block
            .trim_start()
            .starts_with("remove subsection cpu/wfxt-timer:")
        {
            bail!("plan does not name cpu/wfxt-timer for {vcpu}: {stdout}");
        }
    }
    if !stdout.contains("verdict: the migration can go through migproxy") {
        bail!("plan verdict is not positive: {stdout}");
    }
    let rewritten = s.dir.join("rewritten.stream");
    let report = rewrite(&raw, &rewritten, &dest_profile, Some(&source_profile))?;
    eprintln!("{report}");
    assert_loads_and_runs(s, to, &rewritten)?;
    assert_load_fails(s, to, &raw, errors)
}

#[test]
fn plan_and_rewrite_11_1_stream_for_10_0() {
    scenario::run("offline_plan_rewrite_111_to_10", |s| {
        plan_and_rewrite_from_11_1(s, V10, &["vmstate_load_state: Assertion"])
    });
}

#[test]
fn plan_and_rewrite_11_1_stream_for_7_2() {
    scenario::run("offline_plan_rewrite_111_to_72", |s| {
        plan_and_rewrite_from_11_1(s, V72, &["Failed to load cpu:cpreg_vmstate_array_len"])
    });
}

#[test]
fn plan_names_the_cortex_a57_id_register_and_refuses() {
    scenario::run("plan_cortex_a57", |s| {
        let a57 = |v| VmConfig::new(v, "virt-7.2", "cortex-a57");
        let source = s.profile(&a57(V72))?;
        let dest = s.profile(&a57(V10))?;
        let (src, dst) = (display(&source), display(&dest));
        let out = run_command(
            &["plan", "--source", &src, "--dest-profile", &dst],
            COMMAND_TIMEOUT,
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(3) {
            bail!("plan exited {} (wanted 3): {stdout}{stderr}", out.status);
        }
        for needle in ["ID_DFR0_EL1", "0x3010006", "0x3000006", "REFUSED"] {
            if !stdout.contains(needle) {
                bail!("plan output lacks {needle:?}: {stdout}");
            }
        }
        if !stderr.contains("ID_DFR0_EL1: source 0x3010006, destination 0x3000006") {
            bail!("refusal message does not name the register and values: {stderr}");
        }
        Ok(())
    });
}

#[test]
fn rewrite_for_the_streams_own_profile_is_byte_identical() {
    scenario::run("rewrite_identity", |s| {
        let config = a64fx(V72);
        let stream = s.dir.join("fresh.stream");
        save_fresh_stream(&config, &stream)?;
        let profile = s.profile(&config)?;
        let out = s.dir.join("same.stream");
        let report = rewrite(&stream, &out, &profile, None)?;
        // Both vCPUs alike: the default report gives them one line.
        if !report.contains("vcpu 0-1 (2 vcpus): unchanged") {
            bail!("report does not say unchanged: {report}");
        }
        let (a, b) = (std::fs::read(&stream)?, std::fs::read(&out)?);
        if a != b {
            bail!(
                "rewrite changed the stream ({} vs {} bytes)",
                a.len(),
                b.len()
            );
        }
        Ok(())
    });
}

#[test]
fn capture_from_qmp_equals_capture_from_stream() {
    scenario::run("capture_from_qmp", |s| {
        // The harness holds the VM's first QMP socket; migproxy gets a second one.
        let qmp_socket: PathBuf = s.dir.join("capture.qmp");
        let mut config = a64fx(V10);
        config.paused = true;
        config.extra_args = vec![
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_socket.display()),
        ];
        let mut vm = Vm::spawn(&s.dir, "fresh-qmp", &config)?;
        let from_qmp = s.dir.join("qmp.json");
        let (sock, out) = (display(&qmp_socket), display(&from_qmp));
        let result = run_command(
            &["profile", "capture", "--from-qmp", &sock, "-o", &out],
            COMMAND_TIMEOUT,
        )?;
        if !result.status.success() {
            bail!(
                "capture --from-qmp failed: {}",
                String::from_utf8_lossy(&result.stderr)
            );
        }
        let status = vm.qmp.status()?;
        if status != "postmigrate" {
            bail!("the captured QEMU is {status}, expected postmigrate");
        }
        vm.quit()?;
        let from_stream = s.profile(&config)?;
        let registers = |p: &Path| -> Result<Vec<(u64, Option<u64>)>> {
            let profile = migproxy_config::Profile::load(p)?;
            Ok(profile
                .entries()
                .iter()
                .map(|r| (r.id.0, r.value))
                .collect())
        };
        let (q, f) = (registers(&from_qmp)?, registers(&from_stream)?);
        if q != f || q.is_empty() {
            bail!(
                "qmp capture has {} registers, stream capture {}, or they differ",
                q.len(),
                f.len()
            );
        }
        let text = std::fs::read_to_string(&from_qmp)?;
        if !text.contains("\"qemu_version\": \"10.0") {
            bail!("qmp capture did not record the QEMU version: {text}");
        }
        Ok(())
    });
}
