//! QEMU 7.2, 10.0 and 11.1 in every direction (`-M virt-7.2 -smp 2`, TCG, a running guest).
//!
//! For each of the six ordered pairs with `-cpu a64fx`: the direct migration (its failure
//! recorded: what the destination's own tolerance does, QEMU 11.1's included), then the same
//! pair through `migproxy run` with both fresh profiles three ways (plain; multifd; return path).
//! Every proxied run completes with the guest counting on the destination, and no destination
//! ever hits an assertion on a stream migproxy forwarded (11.1 sends `cpu/wfxt-timer`, which
//! 10.0 would load into a missing timer and abort on, and 7.2 does not know: migproxy removes it,
//! the timer being idle). The 3x3 matrix is printed at the end.
//!
//! cortex-a57 and max: the cross-version pairs migproxy must refuse (the builds disagree on ID
//! register values, which no rewrite can fix under TCG) are refused with the register named,
//! before the destination loads any device state; cortex-a57 between 10.0 and 11.1 (same ID
//! registers) goes through.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use migproxy_config::Profile;
use migproxy_integration_tests::flows::{
    assert_destination_untouched, check_channels, check_device_phase_ending, expect_summary,
    start_proxy, Pair, Setup,
};
use migproxy_integration_tests::migproxy::event_field;
use migproxy_integration_tests::qemu::Version::{self, V10, V111, V72};
use migproxy_integration_tests::scenario::{self, a64fx, virt72, Scenario};

/// Multifd connections besides the main channel.
const MULTIFD_CHANNELS: u32 = 2;
/// How long a destination may take to exit after a failed or refused incoming migration.
const DEST_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The six ordered pairs.
fn pairs() -> Vec<(Version, Version)> {
    let mut pairs = Vec::new();
    for from in Version::ALL {
        for to in Version::ALL {
            if from != to {
                pairs.push((from, to));
            }
        }
    }
    pairs
}

/// What the destination says when the direct a64fx migration fails (measured; the 11.1 lines
/// are its built-in cpreg tolerance refusing, the 10.0 one an abort).
fn direct_failure(from: Version, to: Version) -> &'static str {
    match (from, to) {
        (_, V72) => "Failed to load cpu:cpreg_vmstate_array_len",
        (V72, V10) => "error while loading state for instance 0x0 of device 'cpu'",
        (V111, V10) => "vmstate_load_state: Assertion",
        (_, _) => "in the incoming stream but unknown on the destination: fail migration",
    }
}

fn name(from: Version, to: Version) -> String {
    format!("{}_to_{}", from.tag(), to.tag())
}

/// Direct migration: it fails on the destination with the expected message, and the source
/// (return path on) keeps running the guest. Returns the destination's line.
fn direct(s: &mut Scenario, from: Version, to: Version) -> Result<String> {
    let setup = Setup::new(a64fx(from), a64fx(to)).return_path();
    let mut pair = Pair::start(s, &setup, "")?;
    scenario::migrate(&mut pair.source, pair.dest_port)?;
    scenario::assert_source_kept_running(&mut pair.source)?;
    let status = pair
        .dest
        .wait_exit(DEST_EXIT_TIMEOUT)
        .context("the destination should exit after a failed incoming migration")?;
    let log = pair.dest.log();
    let needle = direct_failure(from, to);
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .with_context(|| format!("destination log lacks {needle:?}; it says:\n{log}"))?;
    let line = line.trim().trim_start_matches("qemu-system-aarch64: ");
    eprintln!("  direct: destination exited ({status}): {line}");
    Ok(line.to_owned())
}

/// Through migproxy with both fresh profiles: completes, the guest continues on the destination,
/// and the destination never asserted. Returns a short account of what migproxy changed.
fn proxied(s: &mut Scenario, setup: &Setup) -> Result<String> {
    let profiles = s.profile_args(&setup.source, &setup.dest)?;
    let mut pair = Pair::start(s, setup, "")?;
    let daemon = start_proxy(s, pair.dest_port, &profiles)?;
    scenario::migrate(&mut pair.source, daemon.listen_port)?;
    scenario::assert_migrated(&mut pair.source, &mut pair.dest)?;
    let summary = expect_summary(&daemon, "completed")?;
    check_channels(&summary, setup)?;
    check_device_phase_ending(&daemon, &profiles)?;
    // Every cross-version pair here differs in its register lists: every vCPU is rewritten.
    let rewritten = event_field(&summary, "cpus_rewritten");
    if rewritten != setup.source.smp.to_string() {
        bail!(
            "migproxy rewrote {rewritten} vCPU(s), expected all {}",
            setup.source.smp
        );
    }
    let log = pair.dest.log();
    if log.contains("Assertion") {
        bail!("the destination hit an assertion on the forwarded stream: {log}");
    }
    let removed = event_field(&summary, "subsections_removed");
    // 11.1 sends the idle FEAT_WFxT timer; neither older build can take it.
    let expect_removed = setup.source.version == V111 && setup.dest.version != V111;
    if expect_removed != (removed == "cpu/wfxt-timer") {
        bail!("subsections removed: {removed:?}, expected cpu/wfxt-timer only for 11.1 -> older");
    }
    // Per vCPU 0 (register names may contain commas, so count from the rewrite event).
    let rewrite = daemon
        .events_named("cpu registers rewritten")
        .into_iter()
        .find(|e| event_field(e, "vcpu") == "0");
    let count = |field: &str| {
        rewrite
            .as_ref()
            .map_or_else(|| "0".to_owned(), |e| event_field(e, field))
    };
    let mut text = format!(
        "vcpu 0: {} dropped, {} filled",
        count("dropped"),
        count("filled")
    );
    if !removed.is_empty() {
        let _ = write!(text, ", removed {removed}");
    }
    Ok(text)
}

struct Row {
    from: Version,
    to: Version,
    direct: String,
    proxied: Vec<(&'static str, std::result::Result<String, String>)>,
}

#[test]
fn version_matrix_a64fx() {
    let mut rows = Vec::new();
    for (from, to) in pairs() {
        let pair = name(from, to);
        let mut direct_line = String::new();
        let direct_result = scenario::try_run(&format!("matrix_direct_{pair}"), |s| {
            direct_line = direct(s, from, to)?;
            Ok(())
        });
        let direct = match direct_result {
            Ok(()) => format!("fails: {direct_line}"),
            Err(err) => format!("UNEXPECTED: {err}"),
        };
        let mut proxied_results = Vec::new();
        for (mode, setup) in [
            ("plain", Setup::new(a64fx(from), a64fx(to))),
            (
                "multifd",
                Setup::new(a64fx(from), a64fx(to)).multifd(MULTIFD_CHANNELS),
            ),
            (
                "return path",
                Setup::new(a64fx(from), a64fx(to)).return_path(),
            ),
        ] {
            let mut account = String::new();
            let result = scenario::try_run(
                &format!("matrix_proxy_{pair}_{}", mode.replace(' ', "_")),
                |s| {
                    account = proxied(s, &setup)?;
                    Ok(())
                },
            );
            proxied_results.push((mode, result.map(|()| account)));
        }
        rows.push(Row {
            from,
            to,
            direct,
            proxied: proxied_results,
        });
    }
    let (table, failures) = matrix(&rows);
    eprintln!("{table}");
    assert!(
        failures.is_empty(),
        "version matrix: {}",
        failures.join("; ")
    );
}

/// The 3x3 matrix (rows: source, columns: destination) and the list of failed cells.
fn matrix(rows: &[Row]) -> (String, Vec<String>) {
    let mut failures = Vec::new();
    let mut text = String::from(
        "\nversion matrix, -M virt-7.2 -cpu a64fx -smp 2, TCG, running guest\n\
         (direct = without migproxy; proxied = plain / multifd / return path through migproxy)\n",
    );
    let cell = |from: Version, to: Version| -> String {
        if from == to {
            return "-".into();
        }
        let Some(row) = rows.iter().find(|r| r.from == from && r.to == to) else {
            return "not run".into();
        };
        let direct_ok = row.direct.starts_with("fails:");
        let proxied: Vec<&str> = row
            .proxied
            .iter()
            .map(|(_, r)| if r.is_ok() { "ok" } else { "FAIL" })
            .collect();
        format!(
            "direct {} | proxied {}",
            if direct_ok { "fails" } else { "UNEXPECTED" },
            proxied.join("/")
        )
    };
    let _ = write!(text, "{:>10} |", "from \\ to");
    for to in Version::ALL {
        let _ = write!(text, " {:<36} |", format!("QEMU {}", to.number()));
    }
    text.push('\n');
    for from in Version::ALL {
        let _ = write!(text, "{:>10} |", format!("QEMU {}", from.number()));
        for to in Version::ALL {
            let _ = write!(text, " {:<36} |", cell(from, to));
        }
        text.push('\n');
    }
    text.push_str("details:\n");
    for row in rows {
        let pair = format!("{} -> {}", row.from.number(), row.to.number());
        let _ = writeln!(text, "  {pair:<12} direct: {}", row.direct);
        if !row.direct.starts_with("fails:") {
            failures.push(format!("{pair} direct: {}", row.direct));
        }
        for (mode, result) in &row.proxied {
            match result {
                Ok(account) => {
                    let _ = writeln!(text, "  {pair:<12} proxied {mode}: ok ({account})");
                }
                Err(err) => {
                    let _ = writeln!(text, "  {pair:<12} proxied {mode}: FAIL ({err})");
                    failures.push(format!("{pair} proxied {mode}: {err}"));
                }
            }
        }
    }
    (text, failures)
}

/// The cross-version pairs of `cpu` that migproxy refuses: each one is refused (return path on,
/// the source keeps running), the reason names an identification register whose reset value
/// differs between the two builds, and the destination loaded no device state.
fn refusals(cpu: &str, refused_pairs: &[(Version, Version)]) {
    let mut failures = Vec::new();
    for &(from, to) in refused_pairs {
        let scenario_name = format!("matrix_refuse_{}_{}", cpu.replace('-', "_"), name(from, to));
        if let Err(err) = scenario::try_run(&scenario_name, |s| {
            refused_naming_id_register(s, &Setup::new(virt72(from, cpu), virt72(to, cpu)))
        }) {
            failures.push(format!("{scenario_name}: {err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
}

fn refused_naming_id_register(s: &mut Scenario, setup: &Setup) -> Result<()> {
    let setup = setup.clone().return_path();
    let profiles = s.profile_args(&setup.source, &setup.dest)?;
    let source_profile = Profile::load(&s.profile(&setup.source)?)?;
    let dest_profile = Profile::load(&s.profile(&setup.dest)?)?;
    let differing: Vec<String> = dest_profile
        .present()
        .filter(|entry| entry.id.is_identification())
        .filter_map(|entry| {
            let theirs = source_profile.value_for(0, entry.id)?;
            (Some(theirs) != entry.value_for(0)).then(|| entry.id.to_string())
        })
        .collect();
    if differing.is_empty() {
        bail!("the profiles agree on every ID register: this scenario lost its premise");
    }
    let mut pair = Pair::start(s, &setup, "")?;
    let daemon = start_proxy(s, pair.dest_port, &profiles)?;
    scenario::migrate(&mut pair.source, daemon.listen_port)?;
    scenario::assert_source_kept_running(&mut pair.source)?;
    let summary = expect_summary(&daemon, "refused")?;
    let reason = event_field(&summary, "reason");
    let Some(named) = differing.iter().find(|n| reason.contains(n.as_str())) else {
        bail!("the refusal names none of the differing ID registers {differing:?}: {reason}");
    };
    eprintln!("  refused naming {named}");
    let _ = pair.dest.wait_exit(DEST_EXIT_TIMEOUT);
    assert_destination_untouched(&mut pair.dest)
}

#[test]
fn version_matrix_cortex_a57() {
    // 7.2 differs from both newer builds on an ID register (ID_DFR0): refused. 10.0 and 11.1
    // agree on every ID register: those two pairs go through (11.1 -> 10.0 with its idle
    // cpu/wfxt-timer removed).
    let mut failures = Vec::new();
    for (from, to) in [(V10, V111), (V111, V10)] {
        let scenario_name = format!("matrix_proxy_cortex_a57_{}", name(from, to));
        let setup = Setup::new(virt72(from, "cortex-a57"), virt72(to, "cortex-a57"));
        if let Err(err) = scenario::try_run(&scenario_name, |s| {
            let account = proxied(s, &setup)?;
            eprintln!("  {account}");
            Ok(())
        }) {
            failures.push(format!("{scenario_name}: {err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
    refusals(
        "cortex-a57",
        &[(V72, V10), (V10, V72), (V72, V111), (V111, V72)],
    );
}

#[test]
fn version_matrix_max_refusals() {
    refusals("max", &pairs());
}

/// The 11.1 pairs with other vCPU counts and channel mixes (profiles captured with the same count).
#[test]
fn version_matrix_other_vcpu_counts_and_channels() {
    let with_smp = |from: Version, to: Version, smp: u32| {
        let mut source = a64fx(from);
        source.smp = smp;
        let mut dest = a64fx(to);
        dest.smp = smp;
        Setup::new(source, dest)
    };
    let cases = [
        (
            "q111_to_q10_4vcpus_multifd_return_path",
            with_smp(V111, V10, 4)
                .multifd(MULTIFD_CHANNELS)
                .return_path(),
        ),
        ("q111_to_q72_1vcpu", with_smp(V111, V72, 1)),
        (
            "q111_to_q72_3vcpus_multifd_return_path",
            with_smp(V111, V72, 3).multifd(3).return_path(),
        ),
        (
            "q10_to_q111_4vcpus_multifd",
            with_smp(V10, V111, 4).multifd(1),
        ),
        (
            "q72_to_q111_1vcpu_return_path",
            with_smp(V72, V111, 1).return_path(),
        ),
    ];
    let mut failures = Vec::new();
    for (label, setup) in cases {
        let scenario_name = format!("matrix_proxy_{label}");
        if let Err(err) = scenario::try_run(&scenario_name, |s| {
            let account = proxied(s, &setup)?;
            eprintln!("  {account}");
            Ok(())
        }) {
            failures.push(format!("{scenario_name}: {err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
}
