//! The KVM rules on register lists shaped like those of Linux 6.1, 6.12 and 7.3 (inner QEMU 10.0,
//! `-cpu host` on an emulated Neoverse-N1): the registers that differ between the kernels, with
//! the values measured in the lab's streams (ids and values of docs/profiles.md's KVM table).
//! The values of the 6.1 host's real cache geometry are the ones QEMU's neoverse-n1 model gives
//! (64 KiB 4-way L1s, 1 MiB 8-way L2, 64-byte lines).

use std::collections::BTreeMap;

use super::*;
use crate::regid::{
    RegId, KVM_REG_ARM_PSCI_VERSION, KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1,
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2, KVM_REG_ARM_STD_BMAP, KVM_REG_ARM_VENDOR_HYP_BMAP,
    KVM_REG_ARM_VENDOR_HYP_BMAP_2,
};

const MIDR: u64 = 0x6030_0000_0013_c000;
const ID_AA64DFR0: u64 = 0x6030_0000_0013_c028;
const ID_AA64MMFR3: u64 = 0x6030_0000_0013_c03b;
const TCR2: u64 = 0x6030_0000_0013_c103;
const PIRE0: u64 = 0x6030_0000_0013_c512;
const PIR: u64 = 0x6030_0000_0013_c513;
const PMMIR: u64 = 0x6030_0000_0013_c4f6;
const CLIDR: u64 = 0x6030_0000_0013_c801;
const CTR: u64 = 0x6030_0000_0013_d801;
const PMCR: u64 = 0x6030_0000_0013_dce0;
const CNTPCT: u64 = 0x6030_0000_0013_df01;
const CNTP_CTL: u64 = 0x6030_0000_0013_df11;
const CNTP_CVAL: u64 = 0x6030_0000_0013_df12;
const PSCI: u64 = KVM_REG_ARM_PSCI_VERSION;
const BMAP2: u64 = KVM_REG_ARM_VENDOR_HYP_BMAP_2;
/// KVM's value for registers whose reset value is UNKNOWN (`reset_unknown`).
const UNKNOWN: u64 = 0x1de7_ec7e_dbad_c0de;

fn ccsidr(sel: u8) -> u64 {
    RegId::ccsidr(sel).0
}

/// The registers all three kernels list with the same value here.
fn common() -> Vec<(u64, u64)> {
    vec![
        (MIDR, 0x414f_d0c1),
        (ID_AA64MMFR3, 0),
        // IDC set, DIC clear: what the fabricated CLIDR 0x2000021 of 6.12/7.3 implies.
        (CTR, 0x9444_8004),
        (KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1, 1),
        (KVM_REG_ARM_STD_BMAP, 0x1),
        (KVM_REG_ARM_VENDOR_HYP_BMAP, 0x3),
    ]
}

fn sorted(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    v
}

/// Linux 6.1: the host's three real caches, invariant CLIDR, debug limited to v8.0, no physical
/// timer registers.
fn linux_6_1() -> Vec<(u64, u64)> {
    let mut v = common();
    v.extend([
        (ccsidr(0), 0x1f_e01a),
        (ccsidr(1), 0x1f_e01a),
        (ccsidr(2), 0xff_e03a),
        (CLIDR, 0x8200_0023),
        (ID_AA64DFR0, 0x1030_5406),
        (PMCR, 0x410c_30ac),
        (PSCI, 0x10001),
    ]);
    sorted(v)
}

/// Linux 6.12: 14 fabricated CCSIDR entries, CLIDR 0x2000021, the physical timer, and TCR2_EL1,
/// PIRE0_EL1, PIR_EL1 although the CPU has neither feature.
fn linux_6_12() -> Vec<(u64, u64)> {
    let mut v = common();
    v.extend((0..14).map(|s| (ccsidr(s), 0x2)));
    v.extend([
        (CLIDR, 0x200_0021),
        (ID_AA64DFR0, 0x1030_5408),
        (PMCR, 0x3000),
        (PSCI, 0x10001),
        (TCR2, 0),
        (PIRE0, UNKNOWN),
        (PIR, UNKNOWN),
        (CNTPCT, 0x0000_0012_3456_789a),
        (CNTP_CTL, 0x4),
        (CNTP_CVAL, 0),
    ]);
    sorted(v)
}

/// Linux 7.3: as 6.12 without TCR2/PIRE0/PIR, with PMMIR_EL1, VENDOR_HYP_BMAP_2 and PSCI 1.3.
fn linux_7_3() -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = linux_6_12()
        .into_iter()
        .filter(|(id, _)| ![TCR2, PIRE0, PIR].contains(id))
        .collect();
    for (id, value) in &mut v {
        if *id == PSCI {
            *value = 0x10003;
        }
    }
    v.extend([(PMMIR, 0), (BMAP2, 0)]);
    sorted(v)
}

/// A destination profile as `profile capture --from-stream` makes it (no writable masks).
fn kvm_profile(regs: &[(u64, u64)]) -> Profile {
    match Profile::from_vcpus(Accel::Kvm, &[(0, regs.to_vec())]) {
        Ok(p) => p,
        Err(e) => panic!("test profile: {e}"),
    }
}

fn run(source: &[(u64, u64)], dest: &Profile, policy: &Policy) -> Rewrite {
    rewrite(0, source, dest, None, policy)
}

fn dropped_ids(r: &RewriteReport) -> Vec<u64> {
    r.dropped.iter().map(|d| d.id.0).collect()
}

fn refused_ids(r: &RewriteReport) -> Vec<u64> {
    r.refused.iter().map(|x| x.id.0).collect()
}

#[test]
fn from_6_1_everything_passes_byte_for_byte() {
    for dest in [linux_6_12(), linux_7_3()] {
        let out = run(&linux_6_1(), &kvm_profile(&dest), &Policy::default());
        assert!(!out.report.is_refused(), "{}", out.report);
        assert!(out.report.is_unchanged(), "{}", out.report);
        assert_eq!(out.registers, linux_6_1());
        // The real geometry is taken by 6.3+ (`set_ccsidr`: line size >= the host's minimum).
        let accepted: Vec<u64> = out
            .report
            .id_mismatches
            .iter()
            .filter(|m| m.action == IdAction::KernelAccepts && m.id.0 != PSCI)
            .map(|m| m.id.0)
            .collect();
        assert_eq!(accepted, vec![ccsidr(0), ccsidr(1), ccsidr(2), CLIDR]);
    }
    // 1.1 -> 1.3 is a version 7.3 takes.
    let out = run(&linux_6_1(), &kvm_profile(&linux_7_3()), &Policy::default());
    assert!(out.report.to_string().contains(
        "value  KVM_REG_ARM_PSCI_VERSION: source 1.1 (0x10001), destination 1.3 (0x10003): kept; the destination kernel takes it"
    ), "{}", out.report);
}

#[test]
fn from_6_1_with_writable_masks_passes_too() {
    // A --from-kvm profile of 6.12: masks for CLIDR (all but RES0, bits 63:47) and ID_AA64DFR0 (PMUVer,
    // DebugVer), no mask for the CCSIDR entries (not in the feature-ID space).
    let mut dest = kvm_profile(&linux_6_12());
    dest.set_writable_mask(RegId(CLIDR), (1 << 47) - 1);
    dest.set_writable_mask(RegId(ID_AA64DFR0), 0xf0f);
    dest.set_writable_mask(RegId(MIDR), 0);
    let out = run(&linux_6_1(), &dest, &Policy::default());
    assert!(!out.report.is_refused(), "{}", out.report);
    assert!(out.report.is_unchanged());
}

#[test]
fn the_upgrade_6_12_to_7_3_drops_the_registers_the_cpu_lacks() {
    let out = run(
        &linux_6_12(),
        &kvm_profile(&linux_7_3()),
        &Policy::default(),
    );
    assert!(!out.report.is_refused(), "{}", out.report);
    assert_eq!(dropped_ids(&out.report), vec![TCR2, PIRE0, PIR]);
    for d in &out.report.dropped {
        assert!(matches!(
            d.reason,
            DropReason::Kvm(KvmDrop::FeatureAbsent { .. })
        ));
    }
    let text = out.report.to_string();
    assert!(text.contains("drop   PIR_EL1 (0x603000000013c513) = 0x1de7ec7edbadc0de: the source CPU has no FEAT_S1PIE (ID_AA64MMFR3_EL1.S1PIE = 0)"), "{text}");
    assert!(text.contains("TCR2_EL1 (0x603000000013c103) = 0x0: the source CPU has no FEAT_TCR2"));
    let expected: Vec<(u64, u64)> = linux_6_12()
        .into_iter()
        .filter(|(id, _)| ![TCR2, PIRE0, PIR].contains(id))
        .collect();
    assert_eq!(out.registers, expected);
    // The destination's PMMIR_EL1 and VENDOR_HYP_BMAP_2 keep the kernel's reset values.
    assert_eq!(out.report.left_missing, vec![RegId(PMMIR), RegId(BMAP2)]);
}

#[test]
fn a_cpu_with_s1pie_keeps_pir_as_guest_state() {
    // FEAT_S1PIE present (ID_AA64MMFR3_EL1.S1PIE = 1) and a destination without PIR_EL1: the
    // guest may have written it, so the general rules decide (nonzero, no source default).
    let mut src = linux_6_12();
    for (id, v) in &mut src {
        if *id == ID_AA64MMFR3 {
            *v = 0x100;
        }
    }
    let mut dest_regs = linux_7_3();
    for (id, v) in &mut dest_regs {
        if *id == ID_AA64MMFR3 {
            *v = 0x100;
        }
    }
    let out = run(&src, &kvm_profile(&dest_regs), &Policy::default());
    assert_eq!(refused_ids(&out.report), vec![PIRE0, PIR]);
    assert!(matches!(
        out.report.refused[0].reason,
        RefusalReason::InUse { .. }
    ));
    // TCR2 has its own feature field (TCRX = 0) and is still dropped.
    assert_eq!(dropped_ids(&out.report), vec![TCR2]);
}

#[test]
fn the_downgrade_7_3_to_6_12_is_refused_on_the_psci_version() {
    let out = run(
        &linux_7_3(),
        &kvm_profile(&linux_6_12()),
        &Policy::default(),
    );
    assert_eq!(refused_ids(&out.report), vec![PSCI]);
    let summary = out.report.refusal_summary();
    assert!(summary.contains(
        "KVM_REG_ARM_PSCI_VERSION 1.3 (0x10003): the destination kernel offers at most 1.1 (0x10001) and rejects anything higher (hypercalls.c kvm_arm_set_fw_reg)"
    ), "{summary}");
    // What would be dropped is still listed, with the reason.
    assert_eq!(dropped_ids(&out.report), vec![PMMIR, BMAP2]);
    let text = out.report.to_string();
    assert!(text.contains("drop   PMMIR_EL1 (0x603000000013c4f6) = 0x0: 0, what a kernel that does not list it shows the guest (read-as-zero)"), "{text}");
    assert!(text.contains("drop   KVM_REG_ARM_VENDOR_HYP_BMAP_2 (0x6030000000160003) = 0x0: 0: the guest was offered none of its hypercall services"));
    // The operator cannot talk the kernel into it: the firmware rule ignores --on-id-mismatch.
    for on_id_mismatch in [OnIdMismatch::Warn, OnIdMismatch::UseDestination] {
        let policy = Policy {
            on_id_mismatch,
            ..Policy::default()
        };
        assert!(run(&linux_7_3(), &kvm_profile(&linux_6_12()), &policy)
            .report
            .is_refused());
    }
}

#[test]
fn nonzero_pmmir_and_service_bitmaps_are_refused() {
    let mut src = linux_7_3();
    for (id, v) in &mut src {
        match *id {
            PMMIR => *v = 0x8,
            BMAP2 => *v = 0x3,
            PSCI => *v = 0x10001,
            _ => {}
        }
    }
    let out = run(&src, &kvm_profile(&linux_6_12()), &Policy::default());
    assert_eq!(refused_ids(&out.report), vec![PMMIR, BMAP2]);
    let summary = out.report.refusal_summary();
    assert!(summary.contains("PMMIR_EL1 = 0x8: the destination kernel does not list it and shows the guest 0 (read-as-zero)"), "{summary}");
    assert!(summary.contains("KVM_REG_ARM_VENDOR_HYP_BMAP_2 = 0x3: the guest was offered hypercall services the destination kernel does not have"));
    // --allow-drop still names a register away.
    let policy = Policy {
        allow_drop: vec![RegId(PMMIR), RegId(BMAP2)],
        ..Policy::default()
    };
    assert!(!run(&src, &kvm_profile(&linux_6_12()), &policy)
        .report
        .is_refused());
}

#[test]
fn to_6_1_is_refused_by_name_on_cache_geometry_and_debug_version() {
    for src in [linux_6_12(), linux_7_3()] {
        let out = run(&src, &kvm_profile(&linux_6_1()), &Policy::default());
        let refused = refused_ids(&out.report);
        for id in [ccsidr(0), ccsidr(1), ccsidr(2), CLIDR, ID_AA64DFR0] {
            assert!(refused.contains(&id), "{id:#x} in {}", out.report);
        }
        let summary = out.report.refusal_summary();
        assert!(summary.contains("CCSIDR[L1 data]: source 0x2, destination 0x1fe01a; the destination kernel (before Linux 6.3: it lists only its host's real caches) takes only its own host's cache geometry"), "{summary}");
        assert!(summary.contains("CLIDR_EL1: source 0x2000021, destination 0x82000023"));
        assert!(summary.contains("ID_AA64DFR0_EL1: source 0x10305408, destination 0x10305406"));
        // What the destination lacks goes under the kernel rules, not refused: caches the
        // source's CLIDR does not describe, the idle physical timer, the absent features.
        let dropped = dropped_ids(&out.report);
        for sel in 3..14 {
            assert!(dropped.contains(&ccsidr(sel)), "CCSIDR {sel}");
        }
        for id in [CNTPCT, CNTP_CTL, CNTP_CVAL] {
            assert!(dropped.contains(&id), "{id:#x}");
        }
        assert!(out
            .report
            .to_string()
            .contains("drop   CCSIDR[L3 data] (0x6020000000110004) = 0x2: the source's CLIDR_EL1 describes no such cache"));
    }
    // 7.3 adds the PSCI refusal.
    let out = run(&linux_7_3(), &kvm_profile(&linux_6_1()), &Policy::default());
    assert!(refused_ids(&out.report).contains(&PSCI));
}

#[test]
fn use_destination_is_the_operators_explicit_choice() {
    let policy = Policy {
        on_id_mismatch: OnIdMismatch::UseDestination,
        ..Policy::default()
    };
    let out = run(&linux_6_12(), &kvm_profile(&linux_6_1()), &policy);
    assert!(!out.report.is_refused(), "{}", out.report);
    let sent: BTreeMap<u64, u64> = out.registers.iter().copied().collect();
    assert_eq!(sent.get(&ccsidr(0)), Some(&0x1f_e01a));
    assert_eq!(sent.get(&CLIDR), Some(&0x8200_0023));
    assert!(out.report.to_string().contains(
        "value  CCSIDR[L1 data]: source 0x2, destination 0x1fe01a: sent the destination value: the guest sees a changed CPU"
    ));
}

#[test]
fn a_physical_timer_in_use_is_refused() {
    let with = |ctl: u64, cval: u64| -> Vec<(u64, u64)> {
        linux_6_12()
            .into_iter()
            .map(|(id, v)| match id {
                CNTP_CTL => (id, ctl),
                CNTP_CVAL => (id, cval),
                _ => (id, v),
            })
            .collect()
    };
    // 6.1 without the cache refusals: a 6.1-shaped destination that lists all 14 entries
    // does not exist, so check the timer rules against a destination list without the timer.
    let dest = kvm_profile(
        &linux_6_12()
            .into_iter()
            .filter(|(id, _)| ![CNTPCT, CNTP_CTL, CNTP_CVAL].contains(id))
            .collect::<Vec<_>>(),
    );
    // ENABLE set: the armed deadline would be lost; all three are refused.
    let out = run(&with(0x1, 0x1234), &dest, &Policy::default());
    assert_eq!(refused_ids(&out.report), vec![CNTPCT, CNTP_CTL, CNTP_CVAL]);
    assert!(out.report.refusal_summary().contains(
        "CNTP_CTL_EL0 = 0x1: the guest's physical timer is in use (CNTP_CTL_EL0 = 0x1, ENABLE or IMASK set)"
    ));
    // IMASK alone is guest-written state too.
    assert_eq!(
        refused_ids(&run(&with(0x6, 0), &dest, &Policy::default()).report),
        vec![CNTPCT, CNTP_CTL]
    );
    // Disabled, but a deadline was written: only CVAL is guest state worth refusing for.
    let out = run(&with(0x4, 0x99), &dest, &Policy::default());
    assert_eq!(refused_ids(&out.report), vec![CNTP_CVAL]);
    assert!(out
        .report
        .refusal_summary()
        .contains("CNTP_CVAL_EL0 = 0x99: the guest programmed a physical-timer deadline"));
    // Idle (ISTATUS alone is computed, not written): dropped.
    let out = run(&with(0x4, 0), &dest, &Policy::default());
    assert!(!out.report.is_refused());
    assert_eq!(dropped_ids(&out.report), vec![CNTPCT, CNTP_CTL, CNTP_CVAL]);
    // --on-extra drop overrides the kernel rules' refusals, as documented.
    let policy = Policy {
        on_extra: OnExtra::Drop,
        ..Policy::default()
    };
    assert!(!run(&with(0x1, 0x1234), &dest, &policy).report.is_refused());
}

#[test]
fn a_cache_the_source_describes_is_not_dropped() {
    // The source's CLIDR says L2 is unified (Ctype2 = 4): CCSIDR[L2 data] is the guest's view of
    // a real cache; a destination without that entry is refused.
    let dest = kvm_profile(
        &linux_6_12()
            .into_iter()
            .filter(|(id, _)| *id != ccsidr(2))
            .collect::<Vec<_>>(),
    );
    let out = run(&linux_6_12(), &dest, &Policy::default());
    assert_eq!(refused_ids(&out.report), vec![ccsidr(2)]);
    assert!(out.report.refusal_summary().contains(
        "CCSIDR[L2 data] = 0x2: the source's CLIDR_EL1 describes this cache and the destination kernel does not list it"
    ));
}

#[test]
fn clidr_values_linux_6_3_rejects_are_refused() {
    // LoC = LoUU = LoUIS = 0 implies IDC; a destination host without CTR_EL0.IDC rejects it.
    let no_idc: Vec<(u64, u64)> = linux_6_12()
        .into_iter()
        .map(|(id, v)| {
            if id == CTR {
                (id, v & !(1 << 28))
            } else {
                (id, v)
            }
        })
        .collect();
    let src: Vec<(u64, u64)> = linux_6_1()
        .into_iter()
        .map(|(id, v)| if id == CLIDR { (id, 0x23) } else { (id, v) })
        .collect();
    let out = run(&src, &kvm_profile(&no_idc), &Policy::default());
    assert_eq!(refused_ids(&out.report), vec![CLIDR]);
    assert!(out
        .report
        .refusal_summary()
        .contains("CLIDR_EL1 = 0x23: the destination kernel rejects it"));
    // The same value toward a host with IDC is taken; RES0 bits never are.
    assert!(!run(&src, &kvm_profile(&linux_6_12()), &Policy::default())
        .report
        .is_refused());
    let res0: Vec<(u64, u64)> = linux_6_1()
        .into_iter()
        .map(|(id, v)| {
            if id == CLIDR {
                (id, v | 1 << 50)
            } else {
                (id, v)
            }
        })
        .collect();
    assert_eq!(
        refused_ids(&run(&res0, &kvm_profile(&linux_6_12()), &Policy::default()).report),
        vec![CLIDR]
    );
}

#[test]
fn a_cache_line_below_the_destinations_minimum_is_refused() {
    // Destination CTR_EL0 with 128-byte minimum lines (DminLine = IminLine = 5).
    let dest_regs: Vec<(u64, u64)> = linux_6_12()
        .into_iter()
        .map(|(id, v)| {
            if id == CTR {
                (id, 0x9445_8005)
            } else {
                (id, v)
            }
        })
        .collect();
    let out = run(&linux_6_1(), &kvm_profile(&dest_regs), &Policy::default());
    assert_eq!(
        refused_ids(&out.report),
        vec![ccsidr(0), ccsidr(1), ccsidr(2)]
    );
    assert!(out.report.refusal_summary().contains(
        "CCSIDR[L1 data] = 0x1fe01a: its line size, 64 bytes, is below the destination host's minimum 128 bytes (CTR_EL0); the kernel rejects it (sys_regs.c set_ccsidr)"
    ));
}

#[test]
fn firmware_levels_and_service_bitmaps_must_fit_the_destination() {
    let dest = kvm_profile(&[
        (KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1, 1),
        (KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2, 0),
        (KVM_REG_ARM_STD_BMAP, 0x1),
        (KVM_REG_ARM_VENDOR_HYP_BMAP, 0x3),
    ]);
    // Lower or equal: taken.
    let ok = [
        (KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1, 0),
        (KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2, 1), // UNKNOWN loads as NOT_AVAIL
        (KVM_REG_ARM_STD_BMAP, 0),
        (KVM_REG_ARM_VENDOR_HYP_BMAP, 0x1),
    ];
    let out = run(&ok, &dest, &Policy::default());
    assert!(!out.report.is_refused(), "{}", out.report);
    assert!(out.report.is_unchanged());
    // Higher: rejected by the kernel, refused here first.
    let bad = [
        (KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1, 2),
        (KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2, 3), // NOT_REQUIRED on a NOT_AVAIL host
        (KVM_REG_ARM_STD_BMAP, 0x1),
        (KVM_REG_ARM_VENDOR_HYP_BMAP, 0x7),
    ];
    let out = run(&bad, &dest, &Policy::default());
    assert_eq!(
        refused_ids(&out.report),
        vec![
            KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1,
            KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2,
            KVM_REG_ARM_VENDOR_HYP_BMAP
        ]
    );
    assert!(out.report.refusal_summary().contains(
        "KVM_REG_ARM_VENDOR_HYP_BMAP = 0x7: bits 0x4 name hypercall services the destination kernel does not offer (0x3)"
    ));
    // PSCI 0.1 is another vCPU feature than 0.2+, in both directions.
    let psci = |v: u64| kvm_profile(&[(PSCI, v)]);
    assert!(matches!(
        run(&[(PSCI, 1)], &psci(0x10001), &Policy::default())
            .report
            .refused[0]
            .reason,
        RefusalReason::Kvm(KvmRefusal::PsciInterfaceDiffers { dest: 0x10001 })
    ));
    assert!(run(&[(PSCI, 2)], &psci(1), &Policy::default())
        .report
        .is_refused());
    assert!(!run(&[(PSCI, 2)], &psci(0x10001), &Policy::default())
        .report
        .is_refused());
}

#[test]
fn implementation_ids_are_invariant_without_masks() {
    let dest = kvm_profile(&[(MIDR, 0x414f_d0c1)]);
    let out = run(&[(MIDR, 0x410f_d0c0)], &dest, &Policy::default());
    assert!(matches!(
        out.report.refused[0].reason,
        RefusalReason::Kvm(KvmRefusal::ImplementationIdInvariant { dest: 0x414f_d0c1 })
    ));
    assert!(out
        .report
        .refusal_summary()
        .contains("unless the VMM enables KVM_CAP_ARM_WRITABLE_IMP_ID_REGS"));
}

#[test]
fn tcg_destinations_are_untouched_by_the_kvm_rules() {
    // The same PIR_EL1 filler toward a TCG destination: no KVM rule, the general ones refuse.
    let dest = match Profile::from_vcpus(Accel::Tcg, &[(0, vec![(ID_AA64MMFR3, 0)])]) {
        Ok(p) => p,
        Err(e) => panic!("test profile: {e}"),
    };
    let out = run(
        &[(ID_AA64MMFR3, 0), (PIR, UNKNOWN)],
        &dest,
        &Policy::default(),
    );
    assert!(matches!(
        out.report.refused[0].reason,
        RefusalReason::InUse { .. }
    ));
}
