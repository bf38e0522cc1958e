//! Migrations migproxy must refuse, and what the guest looks like afterwards.
//!
//! - cortex-a57 10.0 -> 7.2: the two builds disagree on ID register values, which no register-set
//!   rewrite can fix under TCG; the proxy refuses before the destination sees device state and
//!   names the register. With the return path the source learns of it and keeps running; without
//!   it the source believes the migration completed and leaves the guest paused, and `cont`
//!   resumes it with its counter intact.
//!
//! Postcopy refusals are in `postcopy.rs`.

use std::time::Duration;

use anyhow::{bail, Result};
use migproxy_config::Profile;
use migproxy_integration_tests::flows::{
    assert_destination_untouched, expect_summary, start_proxy, Pair, Setup,
};
use migproxy_integration_tests::guest;
use migproxy_integration_tests::migproxy::event_field;
use migproxy_integration_tests::qemu::Version::{V10, V72};
use migproxy_integration_tests::qmp::migration_status;
use migproxy_integration_tests::scenario::{self, virt72, Scenario};
use migproxy_integration_tests::MIGRATION_TIMEOUT;

/// How long a refused destination may take to give up on its broken stream.
const DEST_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Names of the identification registers whose reset values differ between the two profiles:
/// the registers a correct refusal can name.
fn differing_id_registers(source: &Profile, dest: &Profile) -> Vec<String> {
    dest.present()
        .filter(|entry| entry.id.is_identification())
        .filter_map(|entry| {
            let theirs = source.value_for(0, entry.id)?;
            (Some(theirs) != entry.value_for(0)).then(|| entry.id.to_string())
        })
        .collect()
}

/// The refusal reason names one of the differing ID registers (by name or hex id).
fn check_names_id_register(s: &mut Scenario, setup: &Setup, reason: &str) -> Result<()> {
    let source = Profile::load(&s.profile(&setup.source)?)?;
    let dest = Profile::load(&s.profile(&setup.dest)?)?;
    let differing = differing_id_registers(&source, &dest);
    if differing.is_empty() {
        bail!("the profiles agree on every ID register: this scenario lost its premise");
    }
    let named = differing.iter().any(|name| reason.contains(name.as_str()))
        || dest
            .present()
            .filter(|e| e.id.is_identification())
            .any(|e| reason.contains(&format!("{:#x}", e.id.raw())));
    if !named {
        bail!("the refusal names none of the differing ID registers {differing:?}: {reason}");
    }
    eprintln!(
        "  refusal names an ID register (differing: {})",
        differing.join(", ")
    );
    Ok(())
}

fn a57_setup() -> Setup {
    Setup::new(virt72(V10, "cortex-a57"), virt72(V72, "cortex-a57"))
}

#[test]
fn refuse_a57_10_to_72_id_mismatch_with_return_path() {
    scenario::run("refuse_a57_10_to_72_return_path", |s| {
        let setup = a57_setup().return_path();
        let profiles = s.profile_args(&setup.source, &setup.dest)?;
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &profiles)?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        scenario::assert_source_kept_running(&mut pair.source)?;
        let summary = expect_summary(&daemon, "refused")?;
        check_names_id_register(s, &setup, &event_field(&summary, "reason"))?;
        let _ = pair.dest.wait_exit(DEST_EXIT_TIMEOUT);
        assert_destination_untouched(&mut pair.dest)
    });
}

#[test]
fn refuse_a57_10_to_72_id_mismatch_without_return_path_source_paused_then_cont() {
    scenario::run("refuse_a57_10_to_72_no_return_path", |s| {
        let setup = a57_setup();
        let profiles = s.profile_args(&setup.source, &setup.dest)?;
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &profiles)?;
        scenario::migrate(&mut pair.source, daemon.listen_port)?;
        let info = pair.source.qmp.wait_migration(&[], MIGRATION_TIMEOUT)?;
        let summary = expect_summary(&daemon, "refused")?;
        check_names_id_register(s, &setup, &event_field(&summary, "reason"))?;
        // Without a return path the source cannot learn the outcome once its last byte is out:
        // it stops the guest for the switchover and stays stopped.
        let run_state = pair.source.qmp.status()?;
        eprintln!(
            "  source: migration {}, run state {run_state}",
            migration_status(&info)
        );
        if run_state == "running" {
            bail!("the source resumed by itself; expected it paused (no return path)");
        }
        let paused_at = guest::assert_stopped(&mut pair.source, Duration::from_millis(300))?;
        let _ = pair.dest.wait_exit(DEST_EXIT_TIMEOUT);
        assert_destination_untouched(&mut pair.dest)?;
        pair.source.qmp.execute("cont", serde_json::json!({}))?;
        pair.source
            .qmp
            .wait_status("running", Duration::from_secs(10))?;
        let resumed =
            guest::wait_counter_above(&mut pair.source, paused_at, scenario::LIVENESS_TIMEOUT)?;
        eprintln!("  after cont the source counter went on: {paused_at} -> {resumed}");
        Ok(())
    });
}
