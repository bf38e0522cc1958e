//! Register names: the architectural name of a cpreg index, and back.
//!
//! How the table (`regnames/table.rs`) was built, so it can be rebuilt:
//! - AArch64 system registers: every `mrs x0, S<op0>_<op1>_C<n>_C<m>_<op2>` for op0 in {2,3},
//!   assembled with GNU as (`-march=armv9.2-a`) and disassembled with objdump, which prints the
//!   architectural name where binutils knows one (Armv8-R-only names removed); then by hand the
//!   registers binutils 2.40 does not know yet (TCR2_EL1, PIR_EL1, PIRE0_EL1, POR_EL1,
//!   SCTLR2_EL1, HCRX_EL2, FPMR, GCS, the newer ID_AA64*_EL1) and the implementation-defined
//!   registers QEMU's Cortex-A53/A57/A72 models list (L2CTLR_EL1, CPUACTLR_EL1, ...);
//! - AArch32 cp14/cp15 views: by hand from the Arm ARM (QEMU's TCG lists them; `_S` marks the
//!   secure bank, which QEMU lists with the NS bit clear; `_64` the 64-bit view where a 32-bit
//!   register of the same name exists);
//! - firmware pseudo-registers: the names of `linux/arch/arm64/include/uapi/asm/kvm.h`.
//!
//! Every index QEMU 7.2 and 10.0 put in the cpreg lists of the captured a64fx, cortex-a57 and
//! max streams has a name, except reserved (RAZ) encodings of the ID space, which have none
//! architecturally and print in the generic form.
//!
//! Note on KVM's timer quirk: KVM calls `S3_3_C14_C3_2` `KVM_REG_ARM_TIMER_CNT` (the virtual
//! count) and `S3_3_C14_C0_2` `KVM_REG_ARM_TIMER_CVAL`; the table gives architectural names,
//! and the KVM names are accepted as input ([`KVM_TIMER_ALIASES`]).

mod table;

use table::REGISTER_NAMES;

use crate::regid::KVM_REG_ARM_CCSIDR_DEMUX_BASE;

/// KVM's CCSIDR demux pseudo-registers (`KVM_REG_ARM_DEMUX_ID_CCSIDR`), by the cache their
/// `CSSELR_EL1` selector names: (level - 1) << 1 | InD, InD = 0 the data or unified cache.
const CCSIDR_NAMES: [&str; 14] = [
    "CCSIDR[L1 data]",
    "CCSIDR[L1 instruction]",
    "CCSIDR[L2 data]",
    "CCSIDR[L2 instruction]",
    "CCSIDR[L3 data]",
    "CCSIDR[L3 instruction]",
    "CCSIDR[L4 data]",
    "CCSIDR[L4 instruction]",
    "CCSIDR[L5 data]",
    "CCSIDR[L5 instruction]",
    "CCSIDR[L6 data]",
    "CCSIDR[L6 instruction]",
    "CCSIDR[L7 data]",
    "CCSIDR[L7 instruction]",
];

/// KVM's uapi names of the timer registers (`arch/arm64/include/uapi/asm/kvm.h`), accepted as
/// input. Two of them are not the architectural register of their encoding: KVM lists the virtual
/// *count* under CNTV_CVAL_EL0's encoding and the virtual *compare value* under CNTVCT_EL0's
/// (an old encoding mix-up kept for ABI). TCG lists the same `0x603000000013df1a` with its
/// architectural meaning, so names print architecturally; docs/profiles.md says which is which.
const KVM_TIMER_ALIASES: [(&str, u64); 6] = [
    ("KVM_REG_ARM_TIMER_CTL", 0x6030_0000_0013_df19),
    ("KVM_REG_ARM_TIMER_CNT", 0x6030_0000_0013_df1a),
    ("KVM_REG_ARM_TIMER_CVAL", 0x6030_0000_0013_df02),
    ("KVM_REG_ARM_PTIMER_CTL", 0x6030_0000_0013_df11),
    ("KVM_REG_ARM_PTIMER_CNT", 0x6030_0000_0013_df01),
    ("KVM_REG_ARM_PTIMER_CVAL", 0x6030_0000_0013_df12),
];

/// The architectural name of a register index, if the table has one.
pub fn reg_name(id: u64) -> Option<&'static str> {
    if let Some(selector) = id.checked_sub(KVM_REG_ARM_CCSIDR_DEMUX_BASE) {
        if let Some(name) = usize::try_from(selector)
            .ok()
            .and_then(|i| CCSIDR_NAMES.get(i))
        {
            return Some(name);
        }
    }
    REGISTER_NAMES
        .binary_search_by_key(&id, |&(k, _)| k)
        .ok()
        .and_then(|i| REGISTER_NAMES.get(i))
        .map(|&(_, name)| name)
}

/// The index of a register name (case-insensitive).
pub(crate) fn reg_by_name(name: &str) -> Option<u64> {
    if let Some(i) = CCSIDR_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
    {
        return u64::try_from(i)
            .ok()
            .map(|i| KVM_REG_ARM_CCSIDR_DEMUX_BASE | i);
    }
    if let Some(&(_, id)) = KVM_TIMER_ALIASES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
    {
        return Some(id);
    }
    REGISTER_NAMES
        .iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(name))
        .map(|&(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_names_are_unique() {
        assert!(REGISTER_NAMES.windows(2).all(|w| w[0].0 < w[1].0));
        let mut names: Vec<String> = REGISTER_NAMES
            .iter()
            .map(|(_, n)| n.to_ascii_uppercase())
            .collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn kvm_timer_names_are_accepted() {
        assert_eq!(
            reg_by_name("KVM_REG_ARM_TIMER_CNT"),
            reg_by_name("CNTV_CVAL_EL0")
        );
        assert_eq!(
            reg_by_name("kvm_reg_arm_timer_cval"),
            reg_by_name("CNTVCT_EL0")
        );
        assert_eq!(
            reg_by_name("KVM_REG_ARM_PTIMER_CNT"),
            reg_by_name("CNTPCT_EL0")
        );
        assert_eq!(
            reg_by_name("KVM_REG_ARM_PTIMER_CTL"),
            reg_by_name("CNTP_CTL_EL0")
        );
        assert_eq!(
            reg_by_name("KVM_REG_ARM_TIMER_CTL"),
            reg_by_name("CNTV_CTL_EL0")
        );
        assert_eq!(
            reg_by_name("KVM_REG_ARM_PTIMER_CVAL"),
            reg_by_name("CNTP_CVAL_EL0")
        );
        assert_eq!(
            reg_name(0x6020_0000_0011_0003),
            Some("CCSIDR[L2 instruction]")
        );
        assert_eq!(
            reg_by_name("ccsidr[l7 instruction]"),
            Some(0x6020_0000_0011_000d)
        );
        assert_eq!(reg_name(0x6020_0000_0011_000e), None);
    }

    #[test]
    fn required_names_are_present() {
        for (id, name) in [
            (0x6030_0000_0013_c103, "TCR2_EL1"),
            (0x6030_0000_0013_c513, "PIR_EL1"),
            (0x6030_0000_0013_c512, "PIRE0_EL1"),
            (0x6030_0000_0013_c514, "POR_EL1"),
            (0x6030_0000_0013_c083, "SCTLR2_EL1"),
            (0x6030_0000_0013_e092, "HCRX_EL2"),
            (0x6030_0000_0013_c602, "RMR_EL1"),
            (0x6030_0000_0013_e180, "DACR32_EL2"),
            (0x6030_0000_0013_e281, "IFSR32_EL2"),
            (0x6030_0000_0013_8002, "OSDTRRX_EL1"),
            (0x6030_0000_0013_9828, "DBGDTRRX_EL0"),
            (0x6030_0000_0013_c00a, "ID_DFR0_EL1"),
            (0x6030_0000_0013_c03b, "ID_AA64MMFR3_EL1"),
            (0x4020_0000_200f_0082, "ID_DFR0"),
            (0x4020_0000_200e_0298, "DBGDTRTX"),
            (0x6030_0000_0014_0000, "KVM_REG_ARM_PSCI_VERSION"),
            (0x6030_0000_0014_0001, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1"),
            (0x6030_0000_0014_0002, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2"),
            (0x6030_0000_0014_0003, "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3"),
            (0x6030_0000_0016_0000, "KVM_REG_ARM_STD_BMAP"),
            (0x6030_0000_0016_0003, "KVM_REG_ARM_VENDOR_HYP_BMAP_2"),
        ] {
            assert_eq!(reg_name(id), Some(name), "{id:#x}");
            assert_eq!(reg_by_name(name), Some(id), "{name}");
        }
        // Every AArch64 ID register (op0=3, op1=0, CRn=0) named architecturally has an entry.
        for name in [
            "MIDR_EL1",
            "MPIDR_EL1",
            "REVIDR_EL1",
            "ID_AA64PFR0_EL1",
            "ID_AA64ZFR0_EL1",
            "ID_AA64ISAR2_EL1",
            "CLIDR_EL1",
            "CTR_EL0",
            "DCZID_EL0",
        ] {
            assert!(reg_by_name(name).is_some(), "{name}");
        }
    }
}
