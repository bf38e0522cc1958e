//! Rewriting the held device state of one migration: every vCPU's cpreg arrays against the
//! destination's profile, by the pure rewrite function of `migproxy_config` (rules in
//! `config/src/rewrite.rs` and `docs/profiles.md`).
//!
//! Then the `cpu` subsections the destination cannot load are removed or refused
//! (`subsection_rules`, shared with the offline commands).
//!
//! Runs while both QEMUs are stopped, so [`rewrite_cpus`] only computes and applies; what was done
//! is logged and counted by [`report_rewrites`] once the device state has been written.
//!
//! A source chooses how many vCPUs and registers its stream has (up to the codec's budgets), so
//! what is logged is bounded by `migproxy_config::digest`: vCPUs with the same outcome share one
//! line, a few outcomes are described and the rest counted, register lists name a few and count
//! the rest. Nothing here keeps a per-vCPU report once the vCPU is done.

use migproxy_codec::DeviceState;
use migproxy_config::digest::{Grouped, NameList};
use migproxy_config::{RefusalDigest, RegId, RewritePlan, RewriteReport, SubsectionReport};

use crate::error::{ProxyError, Refusal};
use crate::migration::profile_source::RewriteSetup;
use crate::migration::state::MigrationState;
use crate::subsection_rules;

/// What one vCPU's rewrite changed; vCPUs changed alike share one log line.
#[derive(Debug, PartialEq, Eq)]
struct Change {
    dropped: Vec<RegId>,
    filled: Vec<RegId>,
    registers: usize,
}

/// What the rewrite of one device state did, for the log and the metrics; its size does not
/// grow with the number of vCPUs or registers beyond the digest's bounds.
#[derive(Debug, Default)]
pub struct Rewritten {
    changes: Grouped<Change>,
    warnings: Grouped<String>,
    pub(crate) cpus_rewritten: u32,
    pub(crate) registers_dropped: u64,
    pub(crate) registers_filled: u64,
    pub(crate) dropped: NameList,
    pub(crate) filled: NameList,
    /// The registers last noted in `dropped` and `filled` (all of them are in there already).
    last_noted_dropped: Vec<RegId>,
    last_noted_filled: Vec<RegId>,
}

impl Rewritten {
    fn note_warnings(&mut self, report: &RewriteReport) {
        for warning in &report.warnings {
            self.warnings.add_borrowed(report.vcpu, warning.as_str());
        }
    }

    fn note(&mut self, report: &RewriteReport, registers: usize) {
        self.note_warnings(report);
        if report.is_unchanged() {
            return;
        }
        self.cpus_rewritten = self.cpus_rewritten.saturating_add(1);
        self.registers_dropped = self
            .registers_dropped
            .saturating_add(count(report.dropped.len()));
        self.registers_filled = self
            .registers_filled
            .saturating_add(count(report.filled.len()));
        let change = Change {
            dropped: report.dropped.iter().map(|d| d.id).collect(),
            filled: report.filled.iter().map(|f| f.id).collect(),
            registers,
        };
        // vCPUs of one plan drop and fill the same registers: the names are noted once for
        // them, not hashed again per vCPU (noting a name twice changes nothing).
        if self.last_noted_dropped != change.dropped {
            for &id in &change.dropped {
                self.dropped.insert(id);
            }
            self.last_noted_dropped.clone_from(&change.dropped);
        }
        if self.last_noted_filled != change.filled {
            for &id in &change.filled {
                self.filled.insert(id);
            }
            self.last_noted_filled.clone_from(&change.filled);
        }
        self.changes.add(report.vcpu, change);
    }

    /// The warning lines, at most `DESCRIBED_OUTCOMES` + 1, each naming its vCPUs.
    pub fn warning_lines(&self) -> Vec<String> {
        self.warnings
            .lines(String::clone, "vCPUs with other warnings (not logged)")
    }
}

/// Log what [`rewrite_cpus`] did: one "cpu registers rewritten" event per distinct change with
/// the counts as fields (`vcpu` is the first vCPU of its group, `vcpus` all of them), then one
/// counting the vCPUs of changes beyond the described ones.
fn log_changes(changes: &Grouped<Change>) {
    for (change, vcpus) in changes.groups() {
        tracing::info!(
            vcpu = vcpus.first(),
            vcpus = %vcpus,
            dropped = change.dropped.len(),
            filled = change.filled.len(),
            registers = change.registers,
            "cpu registers rewritten"
        );
    }
    let undescribed = changes.undescribed();
    if !undescribed.is_empty() {
        tracing::info!(
            vcpus = %undescribed,
            "cpu registers rewritten otherwise on more vCPUs (not logged one by one)"
        );
    }
}

/// Replace every vCPU's cpreg arrays with the destination's list. A refusal names the refused
/// registers and vCPUs, every vCPU's: all are rewritten before it is decided, so the operator
/// sees the whole problem at once.
pub fn rewrite_cpus(
    state: &mut DeviceState,
    setup: &RewriteSetup,
) -> Result<Rewritten, ProxyError> {
    let mut rewritten = Rewritten::default();
    let mut refusals = RefusalDigest::default();
    // All vCPUs normally list the same ids: the merge with the destination's list is planned
    // once and applied to each by position; a vCPU with another list gets its own plan.
    let mut plan: Option<RewritePlan<'_>> = None;
    // One buffer reads every vCPU's registers in turn (no list of all of them, no copy each).
    let mut registers: Vec<(u64, u64)> = Vec::new();
    let mut index = 0;
    while let Some(instance) = state.read_cpu(index, &mut registers) {
        index += 1;
        let result = RewritePlan::rewrite_with(
            &mut plan,
            instance,
            &registers,
            &setup.dest,
            setup.source.as_deref(),
            &setup.policy,
        );
        if result.report.is_refused() || refusals.is_refused() {
            // Refused: nothing is applied any more, only the refusals and warnings collected.
            refusals.add(&result.report);
            rewritten.note_warnings(&result.report);
            continue;
        }
        let output_len = result.registers.len();
        if !result.report.is_unchanged() {
            state
                .replace_cpregs(instance, result.registers)
                .map_err(ProxyError::Decode)?;
        }
        rewritten.note(&result.report, output_len);
    }
    if refusals.is_refused() {
        for line in rewritten.warning_lines() {
            tracing::warn!("{line}");
        }
        return Err(ProxyError::Refused(Refusal::Registers(
            refusals.summaries(),
        )));
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

/// Log what [`fix_subsections`] removed, after the device state has been released: one line per
/// distinct removal, naming its vCPUs.
pub fn report_removed_subsections(reports: &[SubsectionReport], state: &MigrationState) {
    let mut removals: Grouped<(String, String)> = Grouped::default();
    for report in reports {
        for removed in &report.removed {
            removals.add(report.vcpu, (removed.name.clone(), removed.reason.clone()));
            state.record_removed_subsection(&removed.name);
        }
    }
    // The same event as before grouping (docs/profiles.md names it); `vcpu` is the first vCPU
    // of its group, `vcpus` all of them.
    for ((name, reason), vcpus) in removals.groups() {
        tracing::info!(
            vcpu = vcpus.first(),
            vcpus = %vcpus,
            subsection = %name,
            reason = %reason,
            "cpu subsection removed"
        );
    }
    let undescribed = removals.undescribed();
    if !undescribed.is_empty() {
        tracing::info!(
            vcpus = %undescribed,
            "cpu subsections removed otherwise on more vCPUs (not logged one by one)"
        );
    }
}

/// Log and count what [`rewrite_cpus`] did, after the device state has been released.
pub fn report_rewrites(rewritten: &Rewritten, state: &MigrationState) {
    for line in rewritten.warning_lines() {
        tracing::warn!("{line}");
    }
    log_changes(&rewritten.changes);
    state.record_rewrites(rewritten);
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}
