//! Unit and property tests of the rewrite rules (DESIGN.md, "Rewriting").

use proptest::prelude::*;

use super::*;
use crate::regid::{RegId, KVM_REG_ARM_VENDOR_HYP_BMAP_2};

const TCR2: u64 = 0x6030_0000_0013_c103;
const RMR: u64 = 0x6030_0000_0013_c602;
const SCTLR: u64 = 0x6030_0000_0013_c080;
const MPIDR: u64 = 0x6030_0000_0013_c005;
const ID_DFR0: u64 = 0x6030_0000_0013_c00a;
const ID_DFR0_A32: u64 = 0x4020_0000_200f_0082;
const DACR32: u64 = 0x6030_0000_0013_e180;
const BMAP2: u64 = KVM_REG_ARM_VENDOR_HYP_BMAP_2;

/// A profile from `(id, value)` pairs plus extra raw JSON register entries.
fn profile(accel: &str, regs: &[(u64, u64)], extra: &[&str]) -> Profile {
    let mut entries: Vec<String> = regs
        .iter()
        .map(|(id, v)| format!(r#"{{"id": "{id:#x}", "value": "{v:#x}"}}"#))
        .collect();
    entries.extend(extra.iter().map(|s| s.to_string()));
    let text = format!(
        r#"{{"format_version": 1, "accel": "{accel}", "vcpus": 2, "registers": [{}]}}"#,
        entries.join(",")
    );
    match Profile::from_json(&text) {
        Ok(p) => p,
        Err(e) => panic!("test profile: {e}"),
    }
}

fn run(source: &[(u64, u64)], dest: &Profile, src: Option<&Profile>, policy: &Policy) -> Rewrite {
    rewrite(0, source, dest, src, policy)
}

#[test]
fn identical_lists_are_returned_unchanged() {
    let regs = [(ID_DFR0, 0x3010006), (SCTLR, 0xc50838), (RMR, 1)];
    let dest = profile("tcg", &regs, &[]);
    let out = run(&regs, &dest, None, &Policy::default());
    assert!(out.report.is_unchanged());
    assert!(!out.report.is_refused());
    assert_eq!(out.registers, regs.to_vec());
    assert!(out.report.to_string().contains("unchanged (3 registers)"));
}

#[test]
fn extra_zero_register_is_dropped() {
    let dest = profile("tcg", &[(SCTLR, 1)], &[]);
    let out = run(&[(SCTLR, 1), (TCR2, 0)], &dest, None, &Policy::default());
    assert_eq!(out.registers, vec![(SCTLR, 1)]);
    assert_eq!(
        out.report.dropped,
        vec![Dropped {
            id: RegId(TCR2),
            value: 0,
            reason: DropReason::Zero
        }]
    );
    assert!(out
        .report
        .to_string()
        .contains("drop   TCR2_EL1 (0x603000000013c103) = 0x0"));
}

#[test]
fn extra_nonzero_register_needs_a_source_default() {
    let dest = profile("tcg", &[(SCTLR, 1)], &[]);
    let source = [(SCTLR, 1), (RMR, 1)];
    // Without a source profile a nonzero register cannot be shown unused: refuse, by name.
    let out = run(&source, &dest, None, &Policy::default());
    assert!(out.report.is_refused());
    let summary = out.report.refusal_summary();
    assert!(summary.contains("RMR_EL1 = 0x1"), "{summary}");
    // Equal to the source's reset value: unused since reset, dropped.
    let src = profile("tcg", &[(SCTLR, 0), (RMR, 1)], &[]);
    let out = run(&source, &dest, Some(&src), &Policy::default());
    assert!(!out.report.is_refused());
    assert_eq!(out.report.dropped[0].reason, DropReason::SourceDefault);
    assert_eq!(out.registers, vec![(SCTLR, 1)]);
    // The guest changed it since reset: refuse, naming both values.
    let out = run(
        &[(SCTLR, 1), (RMR, 3)],
        &dest,
        Some(&src),
        &Policy::default(),
    );
    assert_eq!(
        out.report.refused,
        vec![Refusal {
            id: RegId(RMR),
            value: 3,
            reason: RefusalReason::InUse {
                source_default: Some(1)
            }
        }]
    );
    assert!(out
        .report
        .refusal_summary()
        .contains("differs from the source default 0x1"));
}

#[test]
fn allow_drop_and_on_extra() {
    let dest = profile("tcg", &[(SCTLR, 1)], &[]);
    let source = [(SCTLR, 1), (TCR2, 0), (RMR, 7)];
    let allow = Policy {
        allow_drop: vec![RegId(RMR)],
        ..Policy::default()
    };
    let out = run(&source, &dest, None, &allow);
    assert!(!out.report.is_refused());
    assert_eq!(out.registers, vec![(SCTLR, 1)]);
    assert!(out
        .report
        .dropped
        .iter()
        .any(|d| d.id == RegId(RMR) && d.reason == DropReason::AllowedByFlag));

    let drop = Policy {
        on_extra: OnExtra::Drop,
        ..Policy::default()
    };
    let out = run(&source, &dest, None, &drop);
    assert!(!out.report.is_refused());
    assert!(out
        .report
        .dropped
        .iter()
        .all(|d| d.reason == DropReason::OnExtraDrop));

    let refuse = Policy {
        on_extra: OnExtra::Refuse,
        ..Policy::default()
    };
    let out = run(&source, &dest, None, &refuse);
    assert_eq!(
        out.report.refused.len(),
        2,
        "even the zero register is refused"
    );
    assert!(out
        .report
        .refused
        .iter()
        .all(|r| r.reason == RefusalReason::OnExtraRefuse));

    // --allow-drop is the operator's explicit word and wins over --on-extra refuse.
    let both = Policy {
        on_extra: OnExtra::Refuse,
        allow_drop: vec![RegId(RMR), RegId(TCR2)],
        ..Policy::default()
    };
    assert!(!run(&source, &dest, None, &both).report.is_refused());
}

#[test]
fn profile_rules_allow_forbid_and_condition() {
    // QEMU 11.1's tolerance: VENDOR_HYP_BMAP_2 may go only when it is 0.
    let bmap_rule = r#"{"name": "KVM_REG_ARM_VENDOR_HYP_BMAP_2", "absent": true, "rule": {"drop": "allow", "when": {"equals": "0x0"}}}"#;
    let dest = profile("kvm", &[(SCTLR, 1)], &[bmap_rule]);
    let out = run(&[(SCTLR, 1), (BMAP2, 0)], &dest, None, &Policy::default());
    assert_eq!(out.report.dropped[0].reason, DropReason::ProfileRule);
    let out = run(&[(SCTLR, 1), (BMAP2, 1)], &dest, None, &Policy::default());
    assert!(
        matches!(out.report.refused[0].reason, RefusalReason::RuleCondition(c) if c.equals == 0)
    );
    // Even --on-extra drop respects the rule; --allow-drop overrides it.
    let drop = Policy {
        on_extra: OnExtra::Drop,
        ..Policy::default()
    };
    assert!(run(&[(SCTLR, 1), (BMAP2, 1)], &dest, None, &drop)
        .report
        .is_refused());
    let allow = Policy {
        allow_drop: vec![RegId(BMAP2)],
        ..Policy::default()
    };
    assert!(!run(&[(SCTLR, 1), (BMAP2, 1)], &dest, None, &allow)
        .report
        .is_refused());

    // A rule with a mask: only bit 0 matters.
    let masked = r#"{"id": "0x6030000000160003", "absent": true, "rule": {"drop": "allow", "when": {"mask": "0x1", "equals": "0x0"}}}"#;
    let dest = profile("kvm", &[(SCTLR, 1)], &[masked]);
    assert!(
        !run(&[(SCTLR, 1), (BMAP2, 2)], &dest, None, &Policy::default())
            .report
            .is_refused()
    );
    assert!(
        run(&[(SCTLR, 1), (BMAP2, 3)], &dest, None, &Policy::default())
            .report
            .is_refused()
    );

    // Forbid: even a zero register stays, and the migration is refused.
    let forbid = r#"{"name": "TCR2_EL1", "absent": true, "rule": {"drop": "forbid"}}"#;
    let dest = profile("tcg", &[(SCTLR, 1)], &[forbid]);
    let out = run(&[(SCTLR, 1), (TCR2, 0)], &dest, None, &Policy::default());
    assert_eq!(out.report.refused[0].reason, RefusalReason::RuleForbids);

    // Allow without condition drops a nonzero value; a source profile's rule applies too.
    let allow_any = r#"{"name": "RMR_EL1", "value": "0x1", "rule": {"drop": "allow"}}"#;
    let src = profile("tcg", &[(SCTLR, 0)], &[allow_any]);
    let dest = profile("tcg", &[(SCTLR, 1)], &[]);
    let out = run(
        &[(SCTLR, 1), (RMR, 5)],
        &dest,
        Some(&src),
        &Policy::default(),
    );
    assert_eq!(out.report.dropped[0].reason, DropReason::ProfileRule);
}

#[test]
fn missing_registers_are_filled_under_tcg_only() {
    let regs = [(SCTLR, 1), (DACR32, 0x55)];
    let tcg = profile("tcg", &regs, &[]);
    let out = run(&[(SCTLR, 9)], &tcg, None, &Policy::default());
    assert_eq!(out.registers, vec![(SCTLR, 9), (DACR32, 0x55)]);
    assert_eq!(
        out.report.filled,
        vec![Filled {
            id: RegId(DACR32),
            value: 0x55
        }]
    );
    assert!(out
        .report
        .to_string()
        .contains("fill   DACR32_EL2 (0x603000000013e180) = 0x55"));

    let kvm = profile("kvm", &regs, &[]);
    let out = run(&[(SCTLR, 9)], &kvm, None, &Policy::default());
    assert!(out.report.is_unchanged());
    assert_eq!(out.registers, vec![(SCTLR, 9)]);
    assert_eq!(out.report.left_missing, vec![RegId(DACR32)]);

    let always = Policy {
        fill_missing: FillMissing::Always,
        ..Policy::default()
    };
    assert_eq!(run(&[(SCTLR, 9)], &kvm, None, &always).registers.len(), 2);
    let never = Policy {
        fill_missing: FillMissing::Never,
        ..Policy::default()
    };
    assert_eq!(
        run(&[(SCTLR, 9)], &tcg, None, &never).registers,
        vec![(SCTLR, 9)]
    );
}

#[test]
fn id_mismatch_under_tcg_is_refused_with_both_values() {
    let dest = profile(
        "tcg",
        &[(ID_DFR0, 0x3000006), (ID_DFR0_A32, 0x3000006)],
        &[],
    );
    let out = run(
        &[(ID_DFR0_A32, 0x3010006), (ID_DFR0, 0x3010006)],
        &dest,
        None,
        &Policy::default(),
    );
    assert!(out.report.is_refused());
    let summary = out.report.refusal_summary();
    assert!(
        summary.contains("ID_DFR0_EL1: source 0x3010006, destination 0x3000006"),
        "{summary}"
    );
    assert!(summary.contains("ID_DFR0: source 0x3010006"), "{summary}");
    assert_eq!(out.report.id_mismatches.len(), 2);
    assert!(out
        .report
        .id_mismatches
        .iter()
        .all(|m| m.action == IdAction::Refused));

    let warn = Policy {
        on_id_mismatch: OnIdMismatch::Warn,
        ..Policy::default()
    };
    let out = run(
        &[(ID_DFR0_A32, 0x3000006), (ID_DFR0, 0x3010006)],
        &dest,
        None,
        &warn,
    );
    assert!(!out.report.is_refused());
    assert!(out.report.is_unchanged());
    assert_eq!(out.registers[0], (ID_DFR0_A32, 0x3000006));

    let use_dest = Policy {
        on_id_mismatch: OnIdMismatch::UseDestination,
        ..Policy::default()
    };
    let out = run(
        &[(ID_DFR0_A32, 0x3000006), (ID_DFR0, 0x3010006)],
        &dest,
        None,
        &use_dest,
    );
    assert!(!out.report.is_refused());
    assert!(!out.report.is_unchanged());
    assert!(out.registers.contains(&(ID_DFR0, 0x3000006)));
    assert!(out
        .report
        .to_string()
        .contains("sent the destination value"));
}

#[test]
fn id_mismatch_under_kvm_uses_writable_masks() {
    // No masks at all: the kernel may accept it (Linux 6.7+): warn.
    let dest = profile("kvm", &[(ID_DFR0, 0x3000006)], &[]);
    let out = run(&[(ID_DFR0, 0x3010006)], &dest, None, &Policy::default());
    assert!(!out.report.is_refused());
    assert_eq!(out.report.id_mismatches[0].action, IdAction::Warned);
    // Explicit refuse.
    let refuse = Policy {
        on_id_mismatch: OnIdMismatch::Refuse,
        ..Policy::default()
    };
    assert!(run(&[(ID_DFR0, 0x3010006)], &dest, None, &refuse)
        .report
        .is_refused());

    // With masks: differing bits 16..19 writable -> fine; bit 24 not -> refused.
    let masked = r#"{"name": "ID_DFR0_EL1", "value": "0x3000006", "writable_mask": "0xf0000"}"#;
    let dest = profile("kvm", &[], &[masked]);
    let out = run(&[(ID_DFR0, 0x3010006)], &dest, None, &Policy::default());
    assert_eq!(
        out.report.id_mismatches[0].action,
        IdAction::WithinWritableMask
    );
    assert!(!out.report.is_refused());
    let out = run(&[(ID_DFR0, 0x2000006)], &dest, None, &Policy::default());
    assert!(matches!(
        out.report.refused[0].reason,
        RefusalReason::IdOutsideWritableMask { mask: 0xf0000, .. }
    ));
    // A profile with masks but none for this ID register: the kernel does not let it change.
    let other = r#"{"name": "ID_AA64MMFR3_EL1", "value": "0x0", "writable_mask": "0xf"}"#;
    let dest = profile("kvm", &[(ID_DFR0, 0x3000006)], &[other]);
    assert!(run(
        &[(ID_DFR0, 0x3010006), (0x6030_0000_0013_c03b, 0)],
        &dest,
        None,
        &Policy::default()
    )
    .report
    .is_refused());
}

#[test]
fn per_vcpu_values_are_compared_per_vcpu() {
    let mpidr =
        r#"{"name": "MPIDR_EL1", "value": "0x80000000", "per_vcpu": ["0x80000000", "0x80000001"]}"#;
    let dest = profile("kvm", &[], &[mpidr]);
    assert!(
        !rewrite(0, &[(MPIDR, 0x8000_0000)], &dest, None, &Policy::default())
            .report
            .is_refused()
    );
    let out = rewrite(1, &[(MPIDR, 0x8000_0001)], &dest, None, &Policy::default());
    assert!(
        out.report.id_mismatches.is_empty(),
        "vcpu 1 has its own MPIDR"
    );
    let out = rewrite(1, &[(MPIDR, 0x8000_0000)], &dest, None, &Policy::default());
    assert_eq!(out.report.id_mismatches.len(), 1);
    // A vCPU the profile was not captured with: unknown, reported, not compared.
    let out = rewrite(5, &[(MPIDR, 0x8000_0005)], &dest, None, &Policy::default());
    assert!(out.report.id_mismatches.is_empty());
    assert_eq!(out.report.warnings.len(), 1);
    // Filled per vCPU, too.
    let tcg = profile("tcg", &[], &[mpidr]);
    assert_eq!(
        rewrite(1, &[], &tcg, None, &Policy::default()).registers,
        vec![(MPIDR, 0x8000_0001)]
    );
}

#[test]
fn duplicate_source_ids_are_refused() {
    let dest = profile("tcg", &[(SCTLR, 1)], &[]);
    let out = run(&[(SCTLR, 1), (SCTLR, 2)], &dest, None, &Policy::default());
    assert_eq!(out.report.refused[0].reason, RefusalReason::Duplicate);
}

#[test]
fn the_a64fx_pair_rewrites_both_ways() {
    // The shape of cpreg-scenarios.md: 10.0 has RMR_EL1 = 1 and a cp14 register the 7.2 lacks,
    // 7.2 has DACR32_EL2 the 10.0 lacks; equal values otherwise.
    let q72 = [(SCTLR, 0xc50838), (DACR32, 0)];
    let q10 = [(0x4020_0000_200e_0298, 0), (SCTLR, 0xc50838), (RMR, 1)];
    let p72 = profile("tcg", &q72, &[]);
    let p10 = profile("tcg", &q10, &[]);
    let down = run(&q10, &p72, Some(&p10), &Policy::default());
    assert!(!down.report.is_refused(), "{}", down.report);
    assert_eq!(down.registers, q72.to_vec());
    let up = run(&q72, &p10, Some(&p72), &Policy::default());
    assert!(!up.report.is_refused(), "{}", up.report);
    assert_eq!(up.registers, q10.to_vec());
    // Without the source profile, RMR_EL1 = 1 cannot be shown unused.
    assert!(run(&q10, &p72, None, &Policy::default())
        .report
        .is_refused());
}

// ---- Properties ----

/// A small universe of ids so that sources and destinations overlap often.
/// Includes registers of the KVM rules: CCSIDR[L1 data], CLIDR_EL1, ID_AA64MMFR3_EL1, PIR_EL1,
/// CNTP_CTL_EL0, CNTPCT_EL0.
const UNIVERSE: [u64; 16] = [
    0x6020_0000_0011_0000,
    0x6030_0000_0013_c801,
    0x6030_0000_0013_c03b,
    0x6030_0000_0013_c513,
    0x6030_0000_0013_df11,
    0x6030_0000_0013_df01,
    ID_DFR0_A32,
    0x4020_0000_200e_0298,
    MPIDR,
    ID_DFR0,
    SCTLR,
    TCR2,
    RMR,
    DACR32,
    0x6030_0000_0014_0000,
    BMAP2,
];

fn arb_list() -> impl Strategy<Value = Vec<(u64, u64)>> {
    proptest::collection::vec(
        (
            any::<bool>(),
            prop_oneof![Just(0u64), Just(1u64), any::<u64>()],
        ),
        UNIVERSE.len(),
    )
    .prop_map(|picks| {
        UNIVERSE
            .iter()
            .zip(picks)
            .filter(|(_, (keep, _))| *keep)
            .map(|(&id, (_, v))| (id, v))
            .collect()
    })
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![
            Just(OnExtra::DropUnused),
            Just(OnExtra::Drop),
            Just(OnExtra::Refuse)
        ],
        proptest::collection::vec(proptest::sample::select(UNIVERSE.to_vec()), 0..3),
        prop_oneof![
            Just(FillMissing::Auto),
            Just(FillMissing::Always),
            Just(FillMissing::Never)
        ],
        prop_oneof![
            Just(OnIdMismatch::Auto),
            Just(OnIdMismatch::Refuse),
            Just(OnIdMismatch::Warn),
            Just(OnIdMismatch::UseDestination)
        ],
    )
        .prop_map(|(on_extra, allow, fill_missing, on_id_mismatch)| Policy {
            on_extra,
            allow_drop: allow.into_iter().map(RegId).collect(),
            fill_missing,
            on_id_mismatch,
        })
}

fn arb_accel() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("tcg"), Just("kvm")]
}

proptest! {
    // With the KVM registers in the universe most random pairs are refused; the idempotence
    // property skips those, so allow enough rejects to still reach the full case count.
    #![proptest_config(ProptestConfig { max_global_rejects: 100_000, ..ProptestConfig::default() })]

    #[test]
    fn output_is_strictly_ascending(src in arb_list(), dst in arb_list(), accel in arb_accel(), policy in arb_policy()) {
        let dest = profile(accel, &dst, &[]);
        let out = rewrite(0, &src, &dest, None, &policy);
        prop_assert!(out.registers.windows(2).all(|w| w[0].0 < w[1].0));
        prop_assert_eq!(out.report.output_len, out.registers.len());
    }

    #[test]
    fn the_destinations_own_list_is_unchanged(dst in arb_list(), accel in arb_accel(), policy in arb_policy()) {
        let dest = profile(accel, &dst, &[]);
        let own = dest.registers_for_vcpu(0);
        prop_assert!(own.windows(2).all(|w| w[0].0 < w[1].0));
        let out = rewrite(0, &own, &dest, None, &policy);
        prop_assert!(out.report.is_unchanged());
        prop_assert!(!out.report.is_refused());
        prop_assert_eq!(out.registers, own);
    }

    #[test]
    fn no_register_vanishes_silently(src in arb_list(), dst in arb_list(), accel in arb_accel(), policy in arb_policy()) {
        let dest = profile(accel, &dst, &[]);
        let out = rewrite(0, &src, &dest, None, &policy);
        for &(id, value) in &src {
            if out.registers.iter().any(|&(o, _)| o == id) {
                continue;
            }
            // Gone: it must be reported as dropped, for a reason the policy gives.
            let dropped = out.report.dropped.iter().find(|d| d.id.0 == id);
            prop_assert!(dropped.is_some(), "{:#x} vanished", id);
            let reason = dropped.map(|d| d.reason);
            let justified = match reason {
                Some(DropReason::Zero) => value == 0,
                Some(DropReason::AllowedByFlag) => policy.allow_drop.contains(&RegId(id)),
                Some(DropReason::OnExtraDrop) => policy.on_extra == OnExtra::Drop,
                // The kernel rules: only toward KVM, never against --on-extra refuse, and the
                // "it is 0" ones only for 0.
                Some(DropReason::Kvm(k)) => {
                    accel == "kvm"
                        && policy.on_extra != OnExtra::Refuse
                        && (value == 0
                            || !matches!(
                                k,
                                KvmDrop::NoServicesOffered
                                    | KvmDrop::ReadAsZeroOnDestination
                                    | KvmDrop::PhysicalTimerUnprogrammed
                            ))
                }
                _ => false,
            };
            prop_assert!(justified, "{:#x} = {:#x} dropped for {:?}", id, value, reason);
        }
    }

    #[test]
    fn rewriting_twice_changes_nothing_more(src in arb_list(), dst in arb_list(), accel in arb_accel(), policy in arb_policy()) {
        let dest = profile(accel, &dst, &[]);
        let once = rewrite(0, &src, &dest, None, &policy);
        prop_assume!(!once.report.is_refused());
        let twice = rewrite(0, &once.registers, &dest, None, &policy);
        prop_assert!(twice.report.is_unchanged(), "{}", twice.report);
        prop_assert_eq!(twice.registers, once.registers);
    }
}

/// A plan's steps without its `Missing` ones, and the ids of those.
fn split_missing(steps: Vec<Step<'_>>) -> (Vec<Step<'_>>, Vec<RegId>) {
    let missing = steps
        .iter()
        .filter_map(|step| match step {
            Step::Missing(reg) => Some(reg.id),
            _ => None,
        })
        .collect();
    // Without the missing registers between them, adjacent copied runs are one run.
    let mut source: Vec<Step<'_>> = Vec::new();
    for step in steps {
        match (source.last_mut(), step) {
            (_, Step::Missing(_)) => {}
            (Some(Step::Copy { end, .. }), Step::Copy { start, end: next }) if *end == start => {
                *end = next;
            }
            (_, step) => source.push(step),
        }
    }
    (source, missing)
}

proptest! {
    /// The one-pass merge of a sorted source list classifies every id and finds the same missing
    /// registers as a search per id (the path an unsorted list takes), absent entries included;
    /// only where the missing ones go differs (in id order, against last).
    #[test]
    fn sorted_merge_plans_like_the_search(src in arb_list(), dst in arb_list(), accel in arb_accel(), absent in any::<bool>()) {
        let extra = [r#"{"name": "TCR2_EL1", "absent": true, "rule": {"drop": "forbid"}}"#];
        // An absent (rule-only) TCR2_EL1 entry, where the destination does not list it present.
        let absent = absent && !dst.iter().any(|&(id, _)| id == TCR2);
        let dest = profile(accel, &dst, if absent { &extra[..] } else { &[] });
        // The universe is not in id order; the merge is for the ascending lists QEMU sends.
        let mut ids: Vec<u64> = src.iter().map(|&(id, _)| id).collect();
        ids.sort_unstable();
        let merged = split_missing(RewritePlan::merge_sorted(&ids, &dest));
        let searched = split_missing(RewritePlan::search_unsorted(&ids, &dest));
        prop_assert_eq!(merged, searched);
    }

    /// The step plan gives exactly what the plan before it gave (a slot per position, the filled
    /// registers merged in afterwards): the same registers and the same report, refusals and
    /// warnings included, for sorted and unsorted lists, per-vCPU values, source profiles, and a
    /// plan applied to a list it was not made for (which it plans anew).
    #[test]
    fn steps_rewrite_like_the_previous_plan(
        src in arb_list(),
        dst in arb_list(),
        other in arb_list(),
        accel in arb_accel(),
        policy in arb_policy(),
        sort in any::<bool>(),
        vcpu in 0u32..3,
        per_vcpu in any::<bool>(),
        with_source in any::<bool>(),
    ) {
        let mut src = src;
        if sort {
            src.sort_by_key(|&(id, _)| id);
        }
        // Per-vCPU destination values for two registers (vCPU 2 has none: filled with vCPU 0's).
        let per_vcpu_entries = [
            format!(r#"{{"id": "{SCTLR:#x}", "value": "0x1", "per_vcpu": ["0x1", "0x2"]}}"#),
            format!(r#"{{"id": "{MPIDR:#x}", "value": "0x80000000", "per_vcpu": ["0x80000000", "0x80000001"]}}"#),
        ];
        let dst: Vec<(u64, u64)> = if per_vcpu {
            dst.into_iter().filter(|&(id, _)| id != SCTLR && id != MPIDR).collect()
        } else {
            dst
        };
        let extra: Vec<&str> = if per_vcpu { per_vcpu_entries.iter().map(String::as_str).collect() } else { Vec::new() };
        let dest = profile(accel, &dst, &extra);
        let source_profile = profile(accel, &other, &[]);
        let source_profile = with_source.then_some(&source_profile);
        let ids: Vec<u64> = src.iter().map(|&(id, _)| id).collect();
        let new = RewritePlan::new(&ids, &dest).apply(vcpu, &src, &dest, source_profile, &policy);
        let old = previous::PreviousPlan::new(&ids, &dest).apply(vcpu, &src, &dest, source_profile, &policy);
        prop_assert_eq!(&new, &old);
        // A plan applied to a list it was not made for plans that list anew.
        let other_ids: Vec<u64> = other.iter().map(|&(id, _)| id).collect();
        let new = RewritePlan::new(&ids, &dest).apply(vcpu, &other, &dest, source_profile, &policy);
        let old = previous::PreviousPlan::new(&other_ids, &dest).apply(vcpu, &other, &dest, source_profile, &policy);
        prop_assert_eq!(new, old);
        // The plan kept across vCPUs: reused for the same ids, replaced for others.
        let mut plan = None;
        for (list, list_ids) in [(&src, &ids), (&src, &ids), (&other, &other_ids)] {
            let new = RewritePlan::rewrite_with(&mut plan, vcpu, list, &dest, source_profile, &policy);
            let old = previous::PreviousPlan::new(list_ids, &dest).apply(vcpu, list, &dest, source_profile, &policy);
            prop_assert_eq!(new, old);
        }
    }
}
