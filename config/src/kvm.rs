//! The destination register list as KVM gives it, filtered the way QEMU filters it.
//!
//! QEMU's `kvm_arm_init_cpreg_list()` (`target/arm/kvm.c`) takes `KVM_GET_REG_LIST`, drops the
//! classes it syncs by hand (`kvm_arm_reg_syncs_via_cpreg_list()`: core registers 0x0010 and SVE
//! 0x0015), and accepts only 32- and 64-bit registers (any other size aborts vCPU init with
//! "Can't handle size of register in kernel list"). [`cpreg_list_from_kvm`] is that filter, pure,
//! so it is tested here on recorded lists; [`capture`] runs it against the real kernel on aarch64.

use crate::regid::{
    RegId, KVM_REG_ARCH_MASK, KVM_REG_ARM64, KVM_REG_ARM64_SVE, KVM_REG_ARM_COPROC_MASK,
    KVM_REG_ARM_CORE, KVM_REG_SIZE_MASK, KVM_REG_SIZE_U32, KVM_REG_SIZE_U64,
};

/// Why an index of `KVM_GET_REG_LIST` is not in QEMU's cpreg list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Excluded {
    /// Core registers (0x0010): migrated as `xregs`, `pc`, `pstate`... in the `cpu` section.
    Core,
    /// SVE registers (0x0015): migrated in the `cpu/sve` subsection.
    Sve,
    /// Not 32 or 64 bits wide: QEMU's list cannot carry it (it would abort instead).
    Size,
    /// Not an ARM64 index at all.
    NotArm64,
}

/// Whether QEMU would put this `KVM_GET_REG_LIST` index in its cpreg list.
pub fn qemu_keeps(id: u64) -> Result<(), Excluded> {
    if id & KVM_REG_ARCH_MASK != KVM_REG_ARM64 {
        return Err(Excluded::NotArm64);
    }
    match id & KVM_REG_ARM_COPROC_MASK {
        KVM_REG_ARM_CORE => return Err(Excluded::Core),
        KVM_REG_ARM64_SVE => return Err(Excluded::Sve),
        _ => {}
    }
    match id & KVM_REG_SIZE_MASK {
        KVM_REG_SIZE_U32 | KVM_REG_SIZE_U64 => Ok(()),
        _ => Err(Excluded::Size),
    }
}

/// QEMU's cpreg list from a `KVM_GET_REG_LIST` result: filtered and sorted ascending
/// (QEMU sorts with `qsort(compare_u64)`), duplicates removed.
pub fn cpreg_list_from_kvm(reg_list: &[u64]) -> Vec<RegId> {
    let mut ids: Vec<RegId> = reg_list
        .iter()
        .copied()
        .filter(|&id| qemu_keeps(id).is_ok())
        .map(RegId)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `KVM_ARM_GET_REG_WRITABLE_MASKS` describes the feature-ID space op0=3, CRn=0, op1 in
/// {0, 1, 3}, CRm=0..7, op2=0..7 as one array of `KVM_ARM_FEATURE_ID_RANGE_SIZE` (192) masks,
/// indexed as linux `KVM_ARM_FEATURE_ID_RANGE_IDX()` does: op1 3 takes slot 2, then
/// `op1 << 6 | (crm & 7) << 3 | op2`. The index of a sysreg in that space, for reading masks.
pub fn feature_id_space_index(id: RegId) -> Option<usize> {
    let (op0, op1, crn, crm, op2) = id.sysreg_fields()?;
    if op0 != 3 || crn != 0 || crm > 7 {
        return None;
    }
    let slot: usize = match op1 {
        0 => 0,
        1 => 1,
        3 => 2,
        _ => return None,
    };
    Some((slot << 6) | (usize::from(crm) << 3) | usize::from(op2))
}

#[cfg(target_arch = "aarch64")]
mod capture_aarch64;
#[cfg(target_arch = "aarch64")]
pub use capture_aarch64::capture;

/// Capture from KVM directly: only on aarch64 hosts.
#[cfg(not(target_arch = "aarch64"))]
pub fn capture() -> Result<crate::Profile, crate::ConfigError> {
    Err(crate::ConfigError::Invalid(
        "--from-kvm reads KVM's ARM64 register list and is only available on aarch64 hosts".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `KVM_GET_REG_LIST` excerpt of the shape Linux 6.x returns for a vCPU with SVE: core
    /// registers (incl. 128-bit V registers), CCSIDR demux (U32), sysregs, firmware, SVE (2048-bit
    /// Z and 256-bit P registers, the U64 VLS pseudo-register), bitmaps. Ids unsorted on purpose.
    const RECORDED: &[u64] = &[
        0x6030_0000_0010_0000, // core x0
        0x6040_0000_0010_0050, // core v0 (U128)
        0x6020_0000_0010_0040, // core fpsr? (U32 core)
        0x6020_0000_0011_0000, // CCSIDR demux 0 (U32)
        0x6030_0000_0013_c103, // TCR2_EL1
        0x6030_0000_0013_c000, // MIDR_EL1
        0x6030_0000_0013_c005, // MPIDR_EL1
        0x6030_0000_0014_0000, // PSCI version
        0x6030_0000_0014_0003, // SMCCC workaround 3
        0x6080_0000_0015_0000, // SVE Z0 (U2048)
        0x6050_0000_0015_0400, // SVE P0 (U256)
        0x6060_0000_0015_ffff, // SVE VLS (U512)
        0x6030_0000_0016_0003, // VENDOR_HYP_BMAP_2
        0x6030_0000_0016_0000, // STD_BMAP
        0x6030_0000_0013_c000, // duplicate MIDR
        0x6050_0000_0013_c200, // a hypothetical 128-bit sysreg (FEAT_SYSREG128)
        0x4020_0000_000f_0000, // not ARM64
    ];

    #[test]
    fn filter_matches_qemu() {
        let list: Vec<u64> = cpreg_list_from_kvm(RECORDED)
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(
            list,
            vec![
                0x6020_0000_0011_0000,
                0x6030_0000_0013_c000,
                0x6030_0000_0013_c005,
                0x6030_0000_0013_c103,
                0x6030_0000_0014_0000,
                0x6030_0000_0014_0003,
                0x6030_0000_0016_0000,
                0x6030_0000_0016_0003,
            ]
        );
        assert_eq!(qemu_keeps(0x6030_0000_0010_0000), Err(Excluded::Core));
        assert_eq!(qemu_keeps(0x6030_0000_0015_0000), Err(Excluded::Sve));
        assert_eq!(qemu_keeps(0x6050_0000_0013_c200), Err(Excluded::Size));
        assert_eq!(qemu_keeps(0x4020_0000_000f_0000), Err(Excluded::NotArm64));
    }

    /// The full shape of a `KVM_GET_REG_LIST` answer for a vCPU with SVE and PMU (Linux 6.x
    /// layout: `struct kvm_regs` offsets in 32-bit words for core registers, SVE slices 0),
    /// checked class by class against what QEMU keeps.
    #[test]
    fn filter_keeps_exactly_qemus_classes_on_a_full_list() {
        use crate::regid::{KVM_REG_ARM_DEMUX, KVM_REG_ARM_FW, KVM_REG_ARM_FW_FEAT_BMAP};
        const U128: u64 = 0x0040_0000_0000_0000;
        const U256: u64 = 0x0050_0000_0000_0000;
        const U512: u64 = 0x0060_0000_0000_0000;
        const U2048: u64 = 0x0080_0000_0000_0000;
        let core = |size: u64, word: u64| KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | word;
        let sve = |size: u64, idx: u64| KVM_REG_ARM64 | size | KVM_REG_ARM64_SVE | idx;
        let mut list = Vec::new();
        // regs[0..31], sp, pc, pstate (64-bit words 0..33), sp_el1, elr_el1, spsr[0..5].
        list.extend((0..34).map(|n| core(KVM_REG_SIZE_U64, 2 * n)));
        list.extend((34..41).map(|n| core(KVM_REG_SIZE_U64, 2 * n)));
        // fp_regs.vregs[0..32] (128-bit), fpsr, fpcr (32-bit).
        list.extend((0..32).map(|n| core(U128, 84 + 4 * n)));
        list.extend([core(KVM_REG_SIZE_U32, 212), core(KVM_REG_SIZE_U32, 213)]);
        // SVE: Z0..Z31 (2048-bit), P0..P15 and FFR (256-bit), the VLS pseudo-register (512-bit).
        list.extend((0..32).map(|n| sve(U2048, n << 5)));
        list.extend((0..17).map(|n| sve(U256, 0x400 + (n << 5))));
        list.push(sve(U512, 0xffff));
        // CCSIDR demux (32-bit), firmware and bitmap registers.
        list.extend((0..7).map(|n| KVM_REG_ARM64 | KVM_REG_SIZE_U32 | KVM_REG_ARM_DEMUX | n));
        list.extend((0..4).map(|n| KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | n));
        list.extend(
            (0..4).map(|n| KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP | n),
        );
        // System registers: the ID space and a few others, unsorted as the kernel may list them.
        let mut sysregs: Vec<u64> = (0..64u8)
            .map(|i| RegId::arm64_sysreg(3, 0, 0, i >> 3, i & 7).0)
            .collect();
        sysregs.extend([
            0x6030_0000_0013_df1a,
            0x6030_0000_0013_c080,
            0x6030_0000_0013_df19,
        ]);
        list.extend(sysregs.iter().rev());

        let kept = cpreg_list_from_kvm(&list);
        assert_eq!(kept.len(), 7 + 4 + 4 + sysregs.len());
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert!(kept
            .iter()
            .all(|id| id.coproc() != 0x10 && id.coproc() != 0x15));
        assert!(kept.iter().all(|id| matches!(id.size_bytes(), Some(4 | 8))));
        assert_eq!(
            list.iter()
                .filter(|&&id| qemu_keeps(id) == Err(Excluded::Core))
                .count(),
            75
        );
        assert_eq!(
            list.iter()
                .filter(|&&id| qemu_keeps(id) == Err(Excluded::Sve))
                .count(),
            50
        );
        // The firmware and bitmap registers sort after every sysreg, as QEMU's merge expects.
        assert_eq!(kept.last().map(|id| id.0), Some(0x6030_0000_0016_0003));
    }

    #[test]
    fn feature_id_space_indexes() {
        assert_eq!(
            feature_id_space_index(RegId(0x6030_0000_0013_c000)),
            Some(0)
        ); // MIDR_EL1
        assert_eq!(
            feature_id_space_index(RegId(0x6030_0000_0013_c00a)),
            Some(10)
        ); // ID_DFR0_EL1
        assert_eq!(
            feature_id_space_index(RegId(0x6030_0000_0013_c03b)),
            Some(59)
        ); // ID_AA64MMFR3_EL1
        assert_eq!(
            feature_id_space_index(RegId(0x6030_0000_0013_c801)),
            Some(65)
        ); // CLIDR_EL1
        assert_eq!(
            feature_id_space_index(RegId(0x6030_0000_0013_d801)),
            Some(129)
        ); // CTR_EL0
        assert_eq!(feature_id_space_index(RegId(0x6030_0000_0013_d007)), None); // CSSELR_EL1 (op1=2)
        assert_eq!(feature_id_space_index(RegId(0x6030_0000_0013_c103)), None); // TCR2_EL1
    }
}
