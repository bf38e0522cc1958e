//! The rewrite plan as it was before the step plan (a slot per source position, the filled
//! registers merged in afterwards): the reference the differential tests compare the step plan
//! against, output and report alike. Test-only; the rules it applies (`drop_decision`,
//! `check_identification`) are the module's own.

use std::collections::BTreeSet;

use super::*;

/// What one source position is to the destination: decided by the id alone.
#[derive(Clone, Copy, Debug)]
enum Slot<'p> {
    /// An id listed earlier (only in an unsorted list): refused as a duplicate.
    Duplicate,
    /// The destination has it and nothing to compare: the value is copied.
    Copied,
    /// The destination has it and its value is compared (an identification register, or on KVM
    /// a firmware register or CCSIDR entry) against this destination entry.
    Compared(&'p ProfileRegister),
    /// The destination lacks it: dropped or refused by its value.
    Extra,
}

/// The part of a rewrite that depends only on the source's id list and the destination: which
/// positions are kept, compared or extra, and which destination registers the source lacks.
/// All vCPUs of a VM list the same ids, so one plan serves them all ([`RewritePlan::serves`]);
/// applying it per vCPU reads the values by position.
#[derive(Clone, Debug)]
pub(super) struct PreviousPlan<'p> {
    sorted: bool,
    slots: Vec<Slot<'p>>,
    /// Present destination registers the source lacks, in id order.
    missing: Vec<&'p ProfileRegister>,
}

impl<'p> PreviousPlan<'p> {
    /// The plan for a source listing `ids` (in its order) against `dest`.
    pub(super) fn new(ids: &[u64], dest: &'p Profile) -> PreviousPlan<'p> {
        // QEMU always sends the list sorted strictly ascending; then it has no duplicates and one
        // merge with the destination's sorted entries classifies every id and finds the missing
        // registers, with no search. Only a malformed (unsorted) list pays for a set of the ids
        // seen and a search per id.
        let sorted = ids.windows(2).all(|w| w[0] < w[1]);
        let (slots, missing) = if sorted {
            Self::merge_sorted(ids, dest)
        } else {
            Self::search_unsorted(ids, dest)
        };
        PreviousPlan {
            sorted,
            slots,
            missing,
        }
    }

    /// Slots and missing registers of a strictly ascending id list: one pass over both lists.
    fn merge_sorted(ids: &[u64], dest: &'p Profile) -> (Vec<Slot<'p>>, Vec<&'p ProfileRegister>) {
        let kvm = dest.accel == Accel::Kvm;
        let mut entries = dest.entries().iter().peekable();
        let mut missing = Vec::new();
        let slots = ids
            .iter()
            .map(|&raw_id| {
                // Destination registers below this id are ones the source lacks.
                while let Some(entry) = entries.next_if(|e| e.id.0 < raw_id) {
                    if entry.is_present() {
                        missing.push(entry);
                    }
                }
                let entry = entries
                    .next_if(|e| e.id.0 == raw_id)
                    .filter(|e| e.is_present());
                Self::slot(RegId(raw_id), entry, kvm)
            })
            .collect();
        missing.extend(entries.filter(|e| e.is_present()));
        (slots, missing)
    }

    /// Slots and missing registers of an unsorted list (duplicates marked): a search per id.
    fn search_unsorted(
        ids: &[u64],
        dest: &'p Profile,
    ) -> (Vec<Slot<'p>>, Vec<&'p ProfileRegister>) {
        let kvm = dest.accel == Accel::Kvm;
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        let slots = ids
            .iter()
            .map(|&raw_id| {
                if !seen.insert(raw_id) {
                    return Slot::Duplicate;
                }
                let id = RegId(raw_id);
                Self::slot(id, dest.entry(id).filter(|r| r.is_present()), kvm)
            })
            .collect();
        let missing = dest
            .present()
            .filter(|reg| !seen.contains(&reg.id.0))
            .collect();
        (slots, missing)
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

    /// Rewrite one vCPU whose list has this plan's ids ([`RewritePlan::serves`]; otherwise the
    /// lists are compared position by position up to the shorter one, which callers avoid).
    pub(super) fn apply(
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
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(source.len() + self.missing.len());
        // The KVM rules look at other registers of the same vCPU (CNTP_CTL_EL0, CLIDR_EL1, ...).
        let source_regs = (dest.accel == Accel::Kvm).then(|| SourceRegs::new(source, sorted));
        for (&(raw_id, value), slot) in source.iter().zip(&self.slots) {
            let id = RegId(raw_id);
            match *slot {
                Slot::Duplicate => report.refused.push(Refusal {
                    id,
                    value,
                    reason: RefusalReason::Duplicate,
                }),
                Slot::Copied => out.push((raw_id, value)),
                Slot::Compared(entry) => {
                    let kept =
                        check_identification(vcpu, id, value, entry, dest, policy, &mut report);
                    out.push((raw_id, kept));
                }
                Slot::Extra => {
                    let kvm = source_regs.as_ref();
                    match drop_decision(vcpu, id, value, dest, source_profile, kvm, policy) {
                        Ok(reason) => report.dropped.push(Dropped { id, value, reason }),
                        Err(reason) => {
                            report.refused.push(Refusal { id, value, reason });
                            // Keep it in the output so a refused rewrite still shows what came in.
                            out.push((raw_id, value));
                        }
                    }
                }
            }
        }
        let kept_len = out.len();
        let fill = match policy.fill_missing {
            FillMissing::Always => true,
            FillMissing::Never => false,
            FillMissing::Auto => dest.accel == Accel::Tcg,
        };
        // Registers filled with vCPU 0's value: one warning for all of them, not one each.
        let mut filled_from_vcpu0: Vec<RegId> = Vec::new();
        for reg in &self.missing {
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
            if sorted {
                // Two ascending runs (kept, then filled) with distinct ids: one merge orders them.
                merge_runs(out, kept_len)
            } else {
                // An unsorted source is sorted here, as QEMU's `cpu_post_load` needs.
                out.sort_by_key(|&(id, _)| id);
                out
            }
        };
        report.output_len = registers.len();
        Rewrite { registers, report }
    }
}

/// Merge `out[..kept_len]` and `out[kept_len..]`, each ascending by id, with no id in both.
fn merge_runs(out: Vec<(u64, u64)>, kept_len: usize) -> Vec<(u64, u64)> {
    let (kept, filled) = out.split_at(kept_len.min(out.len()));
    match (kept.last(), filled.first()) {
        (Some(last_kept), Some(first_filled)) if last_kept.0 > first_filled.0 => {}
        // One run is empty, or the filled ones all come after the kept ones: already in order.
        _ => return out,
    }
    let mut merged = Vec::with_capacity(out.len());
    let (mut kept, mut filled) = (kept.iter().peekable(), filled.iter().peekable());
    loop {
        let next = match (kept.peek(), filled.peek()) {
            (Some(k), Some(f)) if k.0 < f.0 => kept.next(),
            (Some(_), Some(_)) | (None, Some(_)) => filled.next(),
            (Some(_), None) => kept.next(),
            (None, None) => break,
        };
        merged.extend(next.copied());
    }
    merged
}
