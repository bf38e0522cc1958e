//! The cpreg rewrite: one vCPU's source registers + the destination profile (+ optionally a
//! profile of a fresh source VM) + a policy -> the registers to send and a report.
//!
//! Pure and total: no I/O, no clock, no error type; everything that stops a migration is a
//! [`Refusal`] in the report, so `plan` and the proxy make the same decision from the same input.
//! The rules (DESIGN.md, "Rewriting"; the operator's view in `docs/profiles.md`):
//!
//! ```text
//! source has, destination lacks  -> drop if allowed, else refuse (naming register and value)
//!     --allow-drop REG           -> drop
//!     --on-extra refuse          -> refuse
//!     profile rule forbid        -> refuse;  rule allow [when value&mask==equals] -> drop/refuse
//!     --on-extra drop            -> drop
//!     --on-extra drop-unused     -> drop if value == 0 or == the source profile's default
//! destination has, source lacks  -> fill with the destination default (TCG, or --fill-missing
//!                                   always), else leave out (KVM keeps its own reset value)
//! both have, ID register differs -> report; refuse / warn / use the destination value
//! ```
//!
//! A KVM destination adds the kernel's own rules (`kvm_rules`, docs/profiles.md): after a profile
//! rule and before `--on-extra drop`, for registers the destination lacks; for firmware registers
//! and CCSIDR entries both sides have, whether the destination kernel takes the source's value.
//!
//! The output is sorted strictly ascending by id (QEMU's `cpu_post_load` merges two sorted
//! lists); when nothing changes it is the input itself.

use std::collections::BTreeSet;
use std::fmt;

use crate::digest::{self, Grouped};
use crate::policy::{FillMissing, OnExtra, OnIdMismatch, Policy};
use crate::profile::{Accel, DropRuleKind, Profile, ProfileRegister, ValueCondition};
use crate::regid::RegId;

mod kvm_rules;

use kvm_rules::SourceRegs;
pub use kvm_rules::{destination_kernel_note, KvmDrop, KvmRefusal};

/// Why a register the destination lacks was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Its value is 0: unused since reset.
    Zero,
    /// Its value equals the source profile's reset value: unused since reset.
    SourceDefault,
    /// Named by `--allow-drop`.
    AllowedByFlag,
    /// A profile rule allows it (and its condition holds).
    ProfileRule,
    /// `--on-extra drop`.
    OnExtraDrop,
    /// The KVM rules: the destination kernel recreates the same guest-visible state.
    Kvm(KvmDrop),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub id: RegId,
    pub value: u64,
    pub reason: DropReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filled {
    pub id: RegId,
    pub value: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The destination lacks it and its value is neither 0 nor the source's reset value.
    InUse { source_default: Option<u64> },
    /// `--on-extra refuse`.
    OnExtraRefuse,
    /// A profile rule forbids dropping it.
    RuleForbids,
    /// A profile rule allows dropping it only when the condition holds, and it does not.
    RuleCondition(ValueCondition),
    /// An identification register differs and the destination cannot take the source's value.
    IdMismatch { dest: u64, accel: Accel },
    /// As above, KVM destination with writable masks: bits outside the mask differ.
    IdOutsideWritableMask { dest: u64, mask: u64 },
    /// The source lists this id more than once: a malformed stream.
    Duplicate,
    /// The KVM rules: guest state would be lost, or the destination kernel rejects the value.
    Kvm(KvmRefusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub id: RegId,
    pub value: u64,
    pub reason: RefusalReason,
}

/// What was done about a differing identification register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdAction {
    Refused,
    Warned,
    /// The source value was replaced with the destination's (`--on-id-mismatch use-destination`).
    UsedDestination,
    /// KVM destination with writable masks: the difference is within them, KVM will take it.
    WithinWritableMask,
    /// The KVM rules say the destination kernel takes the source's value (a lower firmware
    /// version, a cache geometry Linux 6.3+ accepts).
    KernelAccepts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMismatch {
    pub id: RegId,
    pub source: u64,
    pub dest: u64,
    pub action: IdAction,
}

/// Everything the rewrite of one vCPU did or refused to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RewriteReport {
    pub vcpu: u32,
    pub source_len: usize,
    pub output_len: usize,
    pub dropped: Vec<Dropped>,
    pub filled: Vec<Filled>,
    pub refused: Vec<Refusal>,
    pub id_mismatches: Vec<IdMismatch>,
    /// Registers the source lacks and that were not filled (KVM keeps its reset value).
    pub left_missing: Vec<RegId>,
    /// The source list was not sorted strictly ascending (QEMU always sorts it); it was sorted.
    pub reordered: bool,
    /// Identification registers the destination profile has no value for on this vCPU.
    pub uncompared: Vec<RegId>,
    /// At most three, none naming the vCPU (so identical ones of many vCPUs can be grouped):
    /// registers filled with vCPU 0's value, registers not compared, a reordered list.
    pub warnings: Vec<String>,
}

/// The new arrays plus the report; `registers` is only meaningful when the report is not refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub registers: Vec<(u64, u64)>,
    pub report: RewriteReport,
}

impl RewriteReport {
    pub fn is_refused(&self) -> bool {
        !self.refused.is_empty()
    }

    /// Nothing dropped, filled or changed: the output equals the input.
    pub fn is_unchanged(&self) -> bool {
        self.dropped.is_empty()
            && self.filled.is_empty()
            && !self.reordered
            && !self
                .id_mismatches
                .iter()
                .any(|m| m.action == IdAction::UsedDestination)
    }

    /// One line naming the refused registers and why, for logs and error messages: the first
    /// [`NAMED_REGISTERS`](crate::digest::NAMED_REGISTERS), then how many more.
    pub fn refusal_summary(&self) -> String {
        format!("vcpu {}: {}", self.vcpu, describe_refusals(&self.refused))
    }
}

/// The refusals of many vCPUs in a bounded number of lines: vCPUs refused for exactly the same
/// registers and values share one line (`vcpu 0-511 (512 vcpus): ...`), each line names the first
/// few registers, and at most [`DESCRIBED_OUTCOMES`](crate::digest::DESCRIBED_OUTCOMES) distinct
/// refusals are described before the rest are counted.
#[derive(Debug, Clone, Default)]
pub struct RefusalDigest {
    refusals: Grouped<Vec<Refusal>>,
}

impl RefusalDigest {
    /// Note one vCPU's report; one that refuses nothing changes nothing.
    pub fn add(&mut self, report: &RewriteReport) {
        if report.is_refused() {
            self.refusals
                .add_borrowed(report.vcpu, report.refused.as_slice());
        }
    }

    pub fn is_refused(&self) -> bool {
        !self.refusals.is_empty()
    }

    /// One line per distinct refusal, each naming its vCPUs, then one counting the rest.
    pub fn summaries(&self) -> Vec<String> {
        self.refusals.lines(
            |refused| describe_refusals(refused),
            "vCPUs refused for other registers",
        )
    }
}

fn describe_refusals(refused: &[Refusal]) -> String {
    digest::first_few(refused, describe_refusal, "; ", "refused registers")
}

impl Refusal {
    /// The sentence naming the register, its value and why it is refused.
    pub fn describe(&self) -> String {
        describe_refusal(self)
    }
}

fn describe_refusal(r: &Refusal) -> String {
    let Refusal { id, value, reason } = *r;
    match reason {
        RefusalReason::InUse { source_default: Some(d) } => format!(
            "{id} = {value:#x} is not on the destination and differs from the source default {d:#x}: dropping it would lose guest state"
        ),
        RefusalReason::InUse { source_default: None } => format!(
            "{id} = {value:#x} is not on the destination and is nonzero (no source profile shows it is a reset default)"
        ),
        RefusalReason::OnExtraRefuse => {
            format!("{id} = {value:#x} is not on the destination (--on-extra refuse)")
        }
        RefusalReason::RuleForbids => {
            format!("{id} = {value:#x} is not on the destination and a profile rule forbids dropping it")
        }
        RefusalReason::RuleCondition(c) => format!(
            "{id} = {value:#x} is not on the destination and a profile rule drops it only when value & {:#x} == {:#x}",
            c.mask, c.equals
        ),
        RefusalReason::IdMismatch { dest, accel: Accel::Tcg } => format!(
            "identification register {id}: source {value:#x}, destination {dest:#x}; a TCG destination treats it as a constant and would fail to load"
        ),
        RefusalReason::IdMismatch { dest, accel: Accel::Kvm } => format!(
            "identification register {id}: source {value:#x}, destination {dest:#x} (refused by --on-id-mismatch refuse)"
        ),
        RefusalReason::IdOutsideWritableMask { dest, mask } => format!(
            "identification register {id}: source {value:#x}, destination {dest:#x}; bits {:#x} differ outside KVM's writable mask {mask:#x}",
            (value ^ dest) & !mask
        ),
        RefusalReason::Duplicate => format!("{id} appears more than once in the source list"),
        RefusalReason::Kvm(k) => kvm_rules::describe_refusal(id, value, k),
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let DropReason::Kvm(k) = self {
            return k.fmt(f);
        }
        f.write_str(match self {
            DropReason::Zero => "zero, unused since reset",
            DropReason::SourceDefault => "equals the source default, unused since reset",
            DropReason::AllowedByFlag => "--allow-drop",
            DropReason::ProfileRule => "allowed by a profile rule",
            DropReason::OnExtraDrop => "--on-extra drop",
            DropReason::Kvm(_) => "",
        })
    }
}

impl fmt::Display for RewriteReport {
    /// One readable block: a summary line, then one line per register concerned.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unchanged() && self.refused.is_empty() {
            // Forwarded byte for byte; values that differ from the destination's are listed below.
            write!(
                f,
                "vcpu {}: unchanged ({} registers)",
                self.vcpu, self.source_len
            )?;
            if !self.id_mismatches.is_empty() {
                write!(
                    f,
                    ", {} values differ from the destination profile's",
                    self.id_mismatches.len()
                )?;
            }
        } else {
            write!(
                f,
                "vcpu {}: {} -> {} registers: {} dropped, {} filled, {} refused, {} id mismatches",
                self.vcpu,
                self.source_len,
                self.output_len,
                self.dropped.len(),
                self.filled.len(),
                self.refused.len(),
                self.id_mismatches.len()
            )?;
        }
        for r in &self.refused {
            write!(f, "\n  REFUSE {}", describe_refusal(r))?;
        }
        for d in &self.dropped {
            write!(
                f,
                "\n  drop   {} ({:#x}) = {:#x}: {}",
                d.id, d.id.0, d.value, d.reason
            )?;
        }
        for x in &self.filled {
            write!(
                f,
                "\n  fill   {} ({:#x}) = {:#x} (destination default)",
                x.id, x.id.0, x.value
            )?;
        }
        for m in &self.id_mismatches {
            let what = match m.action {
                IdAction::Refused => continue,
                IdAction::Warned => "kept the source value; the destination may reject it",
                IdAction::UsedDestination => {
                    "sent the destination value: the guest sees a changed CPU"
                }
                IdAction::WithinWritableMask => "kept; within KVM's writable mask",
                IdAction::KernelAccepts => "kept; the destination kernel takes it",
            };
            write!(
                f,
                "\n  value  {}: source {}, destination {}: {what}",
                m.id,
                kvm_rules::show_value(m.id, m.source),
                kvm_rules::show_value(m.id, m.dest)
            )?;
        }
        if !self.left_missing.is_empty() {
            let names: Vec<String> = self.left_missing.iter().map(RegId::to_string).collect();
            write!(
                f,
                "\n  absent from the source, left to the destination's reset value: {}",
                names.join(", ")
            )?;
        }
        for w in &self.warnings {
            write!(f, "\n  warning: {w}")?;
        }
        Ok(())
    }
}

/// Rewrite one vCPU's cpreg list for the destination. See the module docs for the rules.
pub fn rewrite(
    vcpu: u32,
    source: &[(u64, u64)],
    dest: &Profile,
    source_profile: Option<&Profile>,
    policy: &Policy,
) -> Rewrite {
    let ids: Vec<u64> = source.iter().map(|&(id, _)| id).collect();
    RewritePlan::new(&ids, dest).apply_served(vcpu, source, dest, source_profile, policy)
}

/// What the rewrite does at one place of its output, decided by the ids alone. A plan's steps
/// are in output order: for a sorted source, ascending by id (the registers the source lacks
/// interleaved where they belong, so the output needs no merge or sort); for an unsorted one,
/// source order with the missing registers last (then sorted once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step<'p> {
    /// Source positions `start..end`: the destination has them and nothing to compare, so the
    /// (id, value) pairs are copied as one run.
    Copy { start: usize, end: usize },
    /// Source position `at` repeats an id listed earlier (only in an unsorted list): refused.
    Duplicate { at: usize },
    /// Source position `at`: the destination has it and its value is compared (an
    /// identification register, or on KVM a firmware register or CCSIDR entry) against `entry`.
    Compared {
        at: usize,
        entry: &'p ProfileRegister,
    },
    /// Source position `at`: the destination lacks it; dropped or refused by its value.
    Extra { at: usize },
    /// A present destination register the source lacks: filled, or left to the destination.
    Missing(&'p ProfileRegister),
}

/// How one source id is handled (before runs of copied ones are joined).
#[derive(Clone, Copy, Debug)]
enum Slot<'p> {
    Duplicate,
    Copied,
    Compared(&'p ProfileRegister),
    Extra,
}

/// The part of a rewrite that depends only on the source's id list and the destination: the
/// output's steps (which source positions are copied, compared or extra, where the registers
/// the source lacks go). All vCPUs of a VM list the same ids, so one plan serves them all
/// ([`RewritePlan::serves`]); applying it per vCPU reads the values by position, copying the
/// runs of plain registers whole.
#[derive(Clone, Debug)]
pub struct RewritePlan<'p> {
    ids: Vec<u64>,
    sorted: bool,
    steps: Vec<Step<'p>>,
    /// How many `Missing` steps there are (the output's capacity beyond the source's).
    missing: usize,
}

impl<'p> RewritePlan<'p> {
    /// The plan for a source listing `ids` (in its order) against `dest`.
    pub fn new(ids: &[u64], dest: &'p Profile) -> RewritePlan<'p> {
        // QEMU always sends the list sorted strictly ascending; then it has no duplicates and one
        // merge with the destination's sorted entries classifies every id and places the missing
        // registers, with no search. Only a malformed (unsorted) list pays for a set of the ids
        // seen and a search per id.
        let sorted = ids.windows(2).all(|w| w[0] < w[1]);
        let steps = if sorted {
            Self::merge_sorted(ids, dest)
        } else {
            Self::search_unsorted(ids, dest)
        };
        let missing = steps
            .iter()
            .filter(|step| matches!(step, Step::Missing(_)))
            .count();
        RewritePlan {
            ids: ids.to_vec(),
            sorted,
            steps,
            missing,
        }
    }

    /// The steps of a strictly ascending id list: one pass over both lists, in id order.
    fn merge_sorted(ids: &[u64], dest: &'p Profile) -> Vec<Step<'p>> {
        let kvm = dest.accel == Accel::Kvm;
        let mut entries = dest.entries().iter().peekable();
        let mut steps = Vec::new();
        for (at, &raw_id) in ids.iter().enumerate() {
            // Destination registers below this id are ones the source lacks.
            while let Some(entry) = entries.next_if(|e| e.id.0 < raw_id) {
                if entry.is_present() {
                    steps.push(Step::Missing(entry));
                }
            }
            let entry = entries
                .next_if(|e| e.id.0 == raw_id)
                .filter(|e| e.is_present());
            push_source_step(&mut steps, at, Self::slot(RegId(raw_id), entry, kvm));
        }
        steps.extend(entries.filter(|e| e.is_present()).map(Step::Missing));
        steps
    }

    /// The steps of an unsorted list (duplicates marked): a search per id, the missing
    /// registers last.
    fn search_unsorted(ids: &[u64], dest: &'p Profile) -> Vec<Step<'p>> {
        let kvm = dest.accel == Accel::Kvm;
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        let mut steps = Vec::new();
        for (at, &raw_id) in ids.iter().enumerate() {
            let slot = if seen.insert(raw_id) {
                let id = RegId(raw_id);
                Self::slot(id, dest.entry(id).filter(|r| r.is_present()), kvm)
            } else {
                Slot::Duplicate
            };
            push_source_step(&mut steps, at, slot);
        }
        steps.extend(
            dest.present()
                .filter(|reg| !seen.contains(&reg.id.0))
                .map(Step::Missing),
        );
        steps
    }

    /// How a source id the destination has as `entry` (present), or lacks (`None`), is handled.
    fn slot(id: RegId, entry: Option<&'p ProfileRegister>, kvm: bool) -> Slot<'p> {
        match entry {
            None => Slot::Extra,
            Some(entry) => {
                let compared = id.is_identification()
                    || (kvm && (id.is_firmware() || id.ccsidr_selector().is_some()));
                if compared {
                    Slot::Compared(entry)
                } else {
                    Slot::Copied
                }
            }
        }
    }

    /// Whether this plan was made for exactly this source list's ids (compared in full).
    pub fn serves(&self, source: &[(u64, u64)]) -> bool {
        self.ids.len() == source.len()
            && self
                .ids
                .iter()
                .zip(source)
                .all(|(&planned, &(id, _))| planned == id)
    }

    /// Rewrite one vCPU with `plan` when it serves the vCPU's list, else with a new plan for that
    /// list, kept in `plan` for the next vCPU (all vCPUs of a VM normally list the same ids).
    pub fn rewrite_with(
        plan: &mut Option<RewritePlan<'p>>,
        vcpu: u32,
        source: &[(u64, u64)],
        dest: &'p Profile,
        source_profile: Option<&Profile>,
        policy: &Policy,
    ) -> Rewrite {
        let planned = match plan.take() {
            Some(planned) if planned.serves(source) => planned,
            _ => {
                let ids: Vec<u64> = source.iter().map(|&(id, _)| id).collect();
                RewritePlan::new(&ids, dest)
            }
        };
        let rewrite = planned.apply_served(vcpu, source, dest, source_profile, policy);
        *plan = Some(planned);
        rewrite
    }

    /// Rewrite one vCPU. A list with other ids than this plan's ([`RewritePlan::serves`]; all
    /// vCPUs of a VM normally have the same) is planned anew: the steps place values by position.
    pub fn apply(
        &self,
        vcpu: u32,
        source: &[(u64, u64)],
        dest: &Profile,
        source_profile: Option<&Profile>,
        policy: &Policy,
    ) -> Rewrite {
        if !self.serves(source) {
            let ids: Vec<u64> = source.iter().map(|&(id, _)| id).collect();
            return RewritePlan::new(&ids, dest).apply_served(
                vcpu,
                source,
                dest,
                source_profile,
                policy,
            );
        }
        self.apply_served(vcpu, source, dest, source_profile, policy)
    }

    /// [`apply`](Self::apply) to a list this plan serves.
    fn apply_served(
        &self,
        vcpu: u32,
        source: &[(u64, u64)],
        dest: &Profile,
        source_profile: Option<&Profile>,
        policy: &Policy,
    ) -> Rewrite {
        let mut report = RewriteReport {
            vcpu,
            source_len: source.len(),
            ..RewriteReport::default()
        };
        let sorted = self.sorted;
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(source.len() + self.missing);
        // The KVM rules look at other registers of the same vCPU (CNTP_CTL_EL0, CLIDR_EL1, ...).
        let source_regs = (dest.accel == Accel::Kvm).then(|| SourceRegs::new(source, sorted));
        let fill = match policy.fill_missing {
            FillMissing::Always => true,
            FillMissing::Never => false,
            FillMissing::Auto => dest.accel == Accel::Tcg,
        };
        // Registers filled with vCPU 0's value: one warning for all of them, not one each.
        let mut filled_from_vcpu0: Vec<RegId> = Vec::new();
        for step in &self.steps {
            match *step {
                Step::Copy { start, end } => {
                    // Inside the source: the plan serves it.
                    if let Some(run) = source.get(start..end) {
                        out.extend_from_slice(run);
                    }
                }
                Step::Duplicate { at } => {
                    if let Some(&(raw_id, value)) = source.get(at) {
                        report.refused.push(Refusal {
                            id: RegId(raw_id),
                            value,
                            reason: RefusalReason::Duplicate,
                        });
                    }
                }
                Step::Compared { at, entry } => {
                    if let Some(&(raw_id, value)) = source.get(at) {
                        let id = RegId(raw_id);
                        let kept =
                            check_identification(vcpu, id, value, entry, dest, policy, &mut report);
                        out.push((raw_id, kept));
                    }
                }
                Step::Extra { at } => {
                    if let Some(&(raw_id, value)) = source.get(at) {
                        let id = RegId(raw_id);
                        let kvm = source_regs.as_ref();
                        match drop_decision(vcpu, id, value, dest, source_profile, kvm, policy) {
                            Ok(reason) => report.dropped.push(Dropped { id, value, reason }),
                            Err(reason) => {
                                report.refused.push(Refusal { id, value, reason });
                                // Kept in the output so a refused rewrite still shows what came in.
                                out.push((raw_id, value));
                            }
                        }
                    }
                }
                Step::Missing(reg) => {
                    if !fill {
                        report.left_missing.push(reg.id);
                        continue;
                    }
                    let value = match reg.value_for(vcpu) {
                        Some(v) => v,
                        None => {
                            filled_from_vcpu0.push(reg.id);
                            reg.value.unwrap_or(0)
                        }
                    };
                    out.push((reg.id.0, value));
                    report.filled.push(Filled { id: reg.id, value });
                }
            }
        }
        if !filled_from_vcpu0.is_empty() {
            report.warnings.push(format!(
                "the destination profile (captured with {} vcpus) has no value for this vcpu: filled vcpu 0's value of {} registers: {}",
                dest.vcpus,
                filled_from_vcpu0.len(),
                digest::first_few(&filled_from_vcpu0, RegId::to_string, ", ", "")
            ));
        }
        if !report.uncompared.is_empty() {
            report.warnings.push(format!(
                "the destination profile (captured with {} vcpus) has no value for this vcpu: {} identification registers not compared: {}",
                dest.vcpus,
                report.uncompared.len(),
                digest::first_few(&report.uncompared, RegId::to_string, ", ", "")
            ));
        }
        if !sorted {
            report.reordered = true;
            report
                .warnings
                .push("the source list was not sorted by id; sorted it".into());
        }
        let registers = if report.is_unchanged() && report.refused.is_empty() {
            source.to_vec()
        } else {
            if !sorted {
                // An unsorted source is sorted here, as QEMU's `cpu_post_load` needs; a sorted
                // one's steps were already in id order.
                out.sort_by_key(|&(id, _)| id);
            }
            out
        };
        report.output_len = registers.len();
        Rewrite { registers, report }
    }
}

/// Append source position `at` as `slot` says; a copied position right after a copied run
/// extends it.
fn push_source_step<'p>(steps: &mut Vec<Step<'p>>, at: usize, slot: Slot<'p>) {
    let step = match slot {
        Slot::Copied => {
            if let Some(Step::Copy { end, .. }) = steps.last_mut() {
                if *end == at {
                    *end = at + 1;
                    return;
                }
            }
            Step::Copy {
                start: at,
                end: at + 1,
            }
        }
        Slot::Duplicate => Step::Duplicate { at },
        Slot::Compared(entry) => Step::Compared { at, entry },
        Slot::Extra => Step::Extra { at },
    };
    steps.push(step);
}

/// `Ok(reason)` to drop a register the destination lacks, `Err(reason)` to refuse.
fn drop_decision(
    vcpu: u32,
    id: RegId,
    value: u64,
    dest: &Profile,
    source_profile: Option<&Profile>,
    kvm: Option<&SourceRegs<'_>>,
    policy: &Policy,
) -> Result<DropReason, RefusalReason> {
    if policy.allow_drop.contains(&id) {
        return Ok(DropReason::AllowedByFlag);
    }
    if policy.on_extra == OnExtra::Refuse {
        return Err(RefusalReason::OnExtraRefuse);
    }
    // The destination's rule first (it knows what it can live without), then the source's.
    if let Some(rule) = dest
        .rule(id)
        .or_else(|| source_profile.and_then(|p| p.rule(id)))
    {
        return match (rule.kind, rule.when) {
            (DropRuleKind::Forbid, _) => Err(RefusalReason::RuleForbids),
            (DropRuleKind::Allow, None) => Ok(DropReason::ProfileRule),
            (DropRuleKind::Allow, Some(c)) if c.holds(value) => Ok(DropReason::ProfileRule),
            (DropRuleKind::Allow, Some(c)) => Err(RefusalReason::RuleCondition(c)),
        };
    }
    // The destination kernel's rules; `--on-extra drop` still overrides their refusals.
    match kvm.and_then(|regs| kvm_rules::extra_register(id, value, regs)) {
        Some(Ok(reason)) => return Ok(DropReason::Kvm(reason)),
        Some(Err(reason)) if policy.on_extra != OnExtra::Drop => {
            return Err(RefusalReason::Kvm(reason))
        }
        _ => {}
    }
    if policy.on_extra == OnExtra::Drop {
        return Ok(DropReason::OnExtraDrop);
    }
    if value == 0 {
        return Ok(DropReason::Zero);
    }
    let source_default = source_profile.and_then(|p| p.value_for(vcpu, id));
    if source_default == Some(value) {
        return Ok(DropReason::SourceDefault);
    }
    Err(RefusalReason::InUse { source_default })
}

/// Compare an identification register (or, on KVM, a CCSIDR entry or firmware register) both
/// sides have (`entry` is the destination's); returns the value to send.
fn check_identification(
    vcpu: u32,
    id: RegId,
    value: u64,
    entry: &ProfileRegister,
    dest: &Profile,
    policy: &Policy,
    report: &mut RewriteReport,
) -> u64 {
    let kvm = dest.accel == Accel::Kvm;
    let firmware = kvm && id.is_firmware();
    let Some(dest_value) = entry.value_for(vcpu) else {
        // One warning after the loop names them all.
        report.uncompared.push(id);
        return value;
    };
    if dest_value == value {
        return value;
    }
    if firmware {
        // Not a policy choice: the destination takes the value or rejects it at load.
        let (action, refusal) = match kvm_rules::firmware_value(id, value, dest_value) {
            Ok(()) => (IdAction::KernelAccepts, None),
            Err(k) => (IdAction::Refused, Some(RefusalReason::Kvm(k))),
        };
        report.id_mismatches.push(IdMismatch {
            id,
            source: value,
            dest: dest_value,
            action,
        });
        if let Some(reason) = refusal {
            report.refused.push(Refusal { id, value, reason });
        }
        return value;
    }
    let mask = entry.writable_mask;
    let (action, refusal) = match policy.on_id_mismatch {
        OnIdMismatch::Refuse => (
            IdAction::Refused,
            Some(RefusalReason::IdMismatch {
                dest: dest_value,
                accel: dest.accel,
            }),
        ),
        OnIdMismatch::Warn => (IdAction::Warned, None),
        OnIdMismatch::UseDestination => (IdAction::UsedDestination, None),
        OnIdMismatch::Auto => match dest.accel {
            Accel::Tcg => (
                IdAction::Refused,
                Some(RefusalReason::IdMismatch {
                    dest: dest_value,
                    accel: Accel::Tcg,
                }),
            ),
            Accel::Kvm => match kvm_rules::identification_value(id, value, dest_value, dest) {
                Some(Ok(())) => (IdAction::KernelAccepts, None),
                Some(Err(k)) => (IdAction::Refused, Some(RefusalReason::Kvm(k))),
                None => match mask {
                    Some(mask) if (value ^ dest_value) & !mask != 0 => (
                        IdAction::Refused,
                        Some(RefusalReason::IdOutsideWritableMask {
                            dest: dest_value,
                            mask,
                        }),
                    ),
                    Some(_) => (IdAction::WithinWritableMask, None),
                    // Without masks a profile cannot tell what the kernel accepts: say so, go on.
                    None if dest.has_writable_masks() => (
                        IdAction::Refused,
                        Some(RefusalReason::IdOutsideWritableMask {
                            dest: dest_value,
                            mask: 0,
                        }),
                    ),
                    None => (IdAction::Warned, None),
                },
            },
        },
    };
    report.id_mismatches.push(IdMismatch {
        id,
        source: value,
        dest: dest_value,
        action,
    });
    if let Some(reason) = refusal {
        report.refused.push(Refusal { id, value, reason });
    }
    if action == IdAction::UsedDestination {
        dest_value
    } else {
        value
    }
}

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod capture_tests;
#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod previous;
#[cfg(test)]
mod tests;
