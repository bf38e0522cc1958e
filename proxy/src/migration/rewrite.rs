//! Rewriting the held device state of one migration: every vCPU's cpreg arrays against the
//! destination's profile, by the pure rewrite function of `migproxy_config` (rules in
//! `config/src/rewrite.rs` and `docs/profiles.md`).
//!
//! Then the `cpu` subsections the destination cannot load are removed or refused
//! (`subsection_rules`, shared with the offline commands).
//!
//! Runs while both QEMUs are stopped, so [`rewrite_cpus`] only computes and applies; what was done
//! is logged and counted by [`report_rewrites`] once the device state has been written.

use migproxy_codec::DeviceState;
use migproxy_config::{RewriteReport, SubsectionReport};

use crate::error::{ProxyError, Refusal};
use crate::migration::profile_source::RewriteSetup;
use crate::migration::state::MigrationState;
use crate::subsection_rules;

/// One vCPU whose cpreg arrays were replaced (or that raised warnings), for the log and metrics.
#[derive(Debug)]
pub struct RewrittenCpu {
    report: RewriteReport,
    registers: usize,
}

/// Replace every vCPU's cpreg arrays with the destination's list; a refusal names the vCPU and
/// the registers.
pub fn rewrite_cpus(
    state: &mut DeviceState,
    setup: &RewriteSetup,
) -> Result<Vec<RewrittenCpu>, ProxyError> {
    let mut rewritten = Vec::new();
    for cpu in state.cpus() {
        let result = migproxy_config::rewrite(
            cpu.instance,
            &cpu.registers,
            &setup.dest,
            setup.source.as_deref(),
            &setup.policy,
        );
        let report = result.report;
        if report.is_refused() {
            for warning in &report.warnings {
                tracing::warn!(vcpu = cpu.instance, "{warning}");
            }
            // The summary already names the vCPU.
            return Err(ProxyError::Refused(Refusal::Registers(vec![
                report.refusal_summary()
            ])));
        }
        if !report.is_unchanged() {
            state
                .set_cpregs(cpu.instance, &result.registers)
                .map_err(ProxyError::Decode)?;
        }
        if !report.is_unchanged() || !report.warnings.is_empty() {
            rewritten.push(RewrittenCpu {
                report,
                registers: result.registers.len(),
            });
        }
    }
    Ok(rewritten)
}

/// Remove the `cpu` subsections the destination cannot load where no guest state is lost; refuse
/// (naming them) otherwise.
pub fn fix_subsections(
    state: &mut DeviceState,
    setup: &RewriteSetup,
) -> Result<Vec<SubsectionReport>, ProxyError> {
    subsection_rules::apply(state, &setup.dest)
}

/// Log what [`fix_subsections`] removed, after the device state has been released.
pub fn report_removed_subsections(reports: &[SubsectionReport], state: &MigrationState) {
    for report in reports {
        for removed in &report.removed {
            tracing::info!(
                vcpu = report.vcpu,
                subsection = %removed.name,
                reason = %removed.reason,
                "cpu subsection removed"
            );
            state.record_removed_subsection(&removed.name);
        }
    }
}

/// Log and count what [`rewrite_cpus`] did, after the device state has been released.
pub fn report_rewrites(rewritten: &[RewrittenCpu], state: &MigrationState) {
    for RewrittenCpu { report, registers } in rewritten {
        for warning in &report.warnings {
            tracing::warn!(vcpu = report.vcpu, "{warning}");
        }
        if report.is_unchanged() {
            continue;
        }
        tracing::info!(
            vcpu = report.vcpu,
            dropped = report.dropped.len(),
            filled = report.filled.len(),
            registers,
            "cpu registers rewritten"
        );
        state.record_rewrite(report);
    }
}
