//! The destination register list as KVM gives it, filtered the way QEMU filters it.
//!
//! QEMU's `kvm_arm_init_cpreg_list()` (`target/arm/kvm.c`) takes `KVM_GET_REG_LIST`, drops the
//! classes it syncs by hand (`kvm_arm_reg_syncs_via_cpreg_list()`: core registers 0x0010 and SVE
//! 0x0015), and accepts only 32- and 64-bit registers (any other size aborts vCPU init with
//! "Can't handle size of register in kernel list"). [`cpreg_list_from_kvm`] is that filter, pure,
//! so it is tested here on recorded lists; [`capture`] runs it against the real kernel on aarch64.
//!
//! The writable ID-register masks (`KVM_ARM_GET_REG_WRITABLE_MASKS`) come as one array over the
//! feature-ID space; [`feature_id_space_reg`] maps an index back to its register and
//! [`record_writable_masks`] stores an answer in a profile, both pure and tested here. The ioctl
//! itself is in the aarch64-only `writable_masks` module, the project's one `unsafe` block.

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

/// `KVM_ARM_FEATURE_ID_RANGE_SIZE`: the masks `KVM_ARM_GET_REG_WRITABLE_MASKS` writes, one per
/// register of the feature-ID space (3 op1 values x 8 CRm x 8 op2 = 192).
pub const KVM_ARM_FEATURE_ID_RANGE_SIZE: usize = 3 * 8 * 8;

/// The register at an index of the feature-ID space: the inverse of [`feature_id_space_index`],
/// used to read a `KVM_ARM_GET_REG_WRITABLE_MASKS` answer back into register ids.
pub fn feature_id_space_reg(index: usize) -> Option<RegId> {
    // Slot 2 is op1 3: the kernel's KVM_ARM_FEATURE_ID_RANGE_IDX() folds op1 {0, 1, 3} into 0..2.
    let op1 = match index >> 6 {
        0 => 0,
        1 => 1,
        2 => 3,
        _ => return None,
    };
    let crm = u8::try_from((index >> 3) & 7).ok()?;
    let op2 = u8::try_from(index & 7).ok()?;
    Some(RegId::arm64_sysreg(3, op1, 0, crm, op2))
}

/// `KVMIO`, the ioctl type of every KVM ioctl (`include/uapi/linux/kvm.h`).
pub const KVMIO: u8 = 0xae;

/// `sizeof(struct reg_mask_range)`: `__u64 addr; __u32 range; __u32 reserved[13];`
/// (`arch/arm64/include/uapi/asm/kvm.h`); checked against kvm-bindings on aarch64.
pub const REG_MASK_RANGE_SIZE: usize = 64;

/// `KVM_ARM_GET_REG_WRITABLE_MASKS`, defined in `include/uapi/linux/kvm.h` as
/// `_IOR(KVMIO, 0xb6, struct reg_mask_range)`; kvm-ioctls has no wrapper for it.
pub const KVM_ARM_GET_REG_WRITABLE_MASKS: u64 = ioc_read(KVMIO, 0xb6, REG_MASK_RANGE_SIZE);

/// Linux's `_IOR(type, nr, size)` in the generic ioctl layout arm64 uses
/// (`include/uapi/asm-generic/ioctl.h`): direction `_IOC_READ` (2) in bits 30-31, the argument
/// size in bits 16-29, the type in bits 8-15, the number in bits 0-7.
pub const fn ioc_read(ty: u8, nr: u8, size: usize) -> u64 {
    const IOC_READ: u64 = 2;
    // `_IOC_SIZEBITS` is 14: a larger argument cannot be encoded (a compile error in const use).
    assert!(size < 1 << 14);
    (IOC_READ << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// The mask a destination QEMU on KVM can use, from the kernel's mask for one register of the
/// feature-ID space. The kernel reports the `val` of every descriptor that has a `set_user` hook
/// (`kvm_vm_ioctl_get_reg_writable_masks()`, `arch/arm64/kvm/sys_regs.c`); two registers need a
/// correction for what QEMU's `write_list_to_kvmstate()` meets on the destination:
///
/// - MIDR_EL1, REVIDR_EL1, AIDR_EL1: kernels that know `KVM_CAP_ARM_WRITABLE_IMP_ID_REGS` report
///   masks for them, but only a VM that enabled that capability may change them
///   (`set_imp_id_reg()` refuses a different value otherwise; older kernels treat them as
///   invariant), and QEMU 10.0 does not enable it. Treated as not writable (0).
/// - MPIDR_EL1: its descriptor has no `set_user`, so the kernel reports 0, yet `KVM_SET_ONE_REG`
///   stores any value (it is how QEMU restores each vCPU's MPIDR). Treated as all writable.
pub fn effective_writable_mask(id: RegId, kernel_mask: u64) -> u64 {
    const MIDR_EL1: RegId = RegId::arm64_sysreg(3, 0, 0, 0, 0);
    const MPIDR_EL1: RegId = RegId::arm64_sysreg(3, 0, 0, 0, 5);
    const REVIDR_EL1: RegId = RegId::arm64_sysreg(3, 0, 0, 0, 6);
    const AIDR_EL1: RegId = RegId::arm64_sysreg(3, 1, 0, 0, 7);
    match id {
        MIDR_EL1 | REVIDR_EL1 | AIDR_EL1 => 0,
        MPIDR_EL1 => u64::MAX,
        _ => kernel_mask,
    }
}

/// Store a `KVM_ARM_GET_REG_WRITABLE_MASKS` answer (`masks[i]` belongs to the register at
/// feature-ID index `i`) in a profile: every register of the space the profile has gets its mask,
/// 0 included (0 = KVM takes no change, so a difference there refuses). Registers the profile
/// lacks are not migrated and get nothing. Returns how many registers got a mask.
pub fn record_writable_masks(profile: &mut crate::Profile, masks: &[u64]) -> usize {
    let mut recorded = 0;
    for (index, &mask) in masks.iter().enumerate() {
        let Some(id) = feature_id_space_reg(index) else {
            break;
        };
        if profile.has(id) {
            profile.set_writable_mask(id, effective_writable_mask(id, mask));
            recorded += 1;
        }
    }
    recorded
}

#[cfg(target_arch = "aarch64")]
mod capture_aarch64;
#[cfg(target_arch = "aarch64")]
mod writable_masks;
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

    #[test]
    fn feature_id_space_maps_both_ways() {
        // Every index names a register whose forward index is that index, and no two coincide.
        let regs: Vec<RegId> = (0..KVM_ARM_FEATURE_ID_RANGE_SIZE)
            .filter_map(feature_id_space_reg)
            .collect();
        assert_eq!(regs.len(), 192);
        for (index, &id) in regs.iter().enumerate() {
            assert_eq!(feature_id_space_index(id), Some(index), "{id}");
        }
        let mut sorted = regs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 192);
        assert_eq!(feature_id_space_reg(192), None);
        assert_eq!(feature_id_space_reg(usize::MAX), None);
        // Landmarks, by name: the kernel's KVM_ARM_FEATURE_ID_RANGE_IDX() of each.
        let named = |index: usize| feature_id_space_reg(index).map(|id| id.to_string());
        assert_eq!(named(0).as_deref(), Some("MIDR_EL1"));
        assert_eq!(named(5).as_deref(), Some("MPIDR_EL1"));
        assert_eq!(named(10).as_deref(), Some("ID_DFR0_EL1"));
        assert_eq!(named(40).as_deref(), Some("ID_AA64DFR0_EL1"));
        assert_eq!(named(59).as_deref(), Some("ID_AA64MMFR3_EL1"));
        assert_eq!(named(65).as_deref(), Some("CLIDR_EL1"));
        assert_eq!(named(71).as_deref(), Some("AIDR_EL1"));
        assert_eq!(named(129).as_deref(), Some("CTR_EL0"));
        assert_eq!(named(135).as_deref(), Some("DCZID_EL0"));
    }

    #[test]
    fn ioctl_number_is_linux_ior() {
        // _IOR(KVMIO, 0xb6, struct reg_mask_range): READ, 64 bytes, type 0xae, number 0xb6.
        assert_eq!(KVM_ARM_GET_REG_WRITABLE_MASKS, 0x8040_aeb6);
        // The same macro for a well-known number: KVM_GET_REGS on x86 (144-byte struct kvm_regs).
        assert_eq!(ioc_read(KVMIO, 0x81, 144), 0x8090_ae81);
    }

    /// A `KVM_ARM_GET_REG_WRITABLE_MASKS` answer in the layout the kernel writes: 192 masks, 0
    /// where no descriptor with `set_user` sits. Hand-built, not recorded (no aarch64 host was
    /// available): ID_DFR0_EL1 and ID_AA64DFR0_EL1 as their Linux 6.7 descriptors in
    /// `arch/arm64/kvm/sys_regs.c` give them, MIDR_EL1/REVIDR_EL1 as `IMPLEMENTATION_ID()` does
    /// in kernels with `KVM_CAP_ARM_WRITABLE_IMP_ID_REGS`, the rest illustrative.
    fn kernel_masks() -> Vec<u64> {
        let mut masks = vec![0u64; KVM_ARM_FEATURE_ID_RANGE_SIZE];
        let mut set = |id: u64, mask: u64| {
            if let Some(slot) = feature_id_space_index(RegId(id)).and_then(|i| masks.get_mut(i)) {
                *slot = mask;
            }
        };
        set(0x6030_0000_0013_c000, 0xffff_ffff); // MIDR_EL1: IMPLEMENTATION_ID(MIDR_EL1, GENMASK(31, 0))
        set(0x6030_0000_0013_c006, u64::MAX); // REVIDR_EL1
        set(0x6030_0000_0013_c00a, 0x0f00_000f); // ID_DFR0_EL1: PerfMon | CopDbg
        set(0x6030_0000_0013_c028, 0xf0f); // ID_AA64DFR0_EL1: PMUVer | DebugVer
        set(0x6030_0000_0013_c03b, 0xf0f); // ID_AA64MMFR3_EL1
        set(0x6030_0000_0013_c801, u64::MAX); // CLIDR_EL1
        set(0x6030_0000_0013_c807, u64::MAX); // AIDR_EL1
        masks
    }

    #[test]
    fn writable_masks_are_recorded_and_round_trip() {
        use crate::{rewrite, Accel, IdAction, Policy, Profile, RefusalReason};
        let midr = 0x6030_0000_0013_c000;
        let mpidr = 0x6030_0000_0013_c005;
        let dfr0 = 0x6030_0000_0013_c028; // ID_AA64DFR0_EL1
        let pfr0 = 0x6030_0000_0013_c020; // ID_AA64PFR0_EL1: no mask in kernel_masks()
        let sctlr = 0x6030_0000_0013_c080;
        let registers = vec![
            (midr, 0x410f_d0c0),
            (mpidr, 0x8000_0000),
            (pfr0, 0x1100_0000_0011_1111),
            (dfr0, 0x0000_0000_1010_5106),
            (sctlr, 0x00c5_0838),
            (0x6030_0000_0014_0000, 0x1_0001), // PSCI version
        ];
        let mut profile = match Profile::from_vcpus(Accel::Kvm, &[(0, registers.clone())]) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        // MIDR, MPIDR, ID_AA64PFR0, ID_AA64DFR0 are in the space and in the profile; REVIDR,
        // ID_DFR0, MMFR3, CLIDR, AIDR are not in the profile; SCTLR and PSCI are outside the space.
        assert_eq!(record_writable_masks(&mut profile, &kernel_masks()), 4);
        assert_eq!(
            profile.writable_mask(RegId(midr)),
            Some(0),
            "needs WRITABLE_IMP_ID_REGS"
        );
        assert_eq!(profile.writable_mask(RegId(mpidr)), Some(u64::MAX));
        assert_eq!(profile.writable_mask(RegId(pfr0)), Some(0));
        assert_eq!(profile.writable_mask(RegId(dfr0)), Some(0xf0f));
        assert_eq!(profile.writable_mask(RegId(sctlr)), None);
        assert!(!profile.has(RegId(0x6030_0000_0013_c00a)));

        // The file carries them, and reads back to the same profile.
        let json = profile.to_json();
        assert!(
            json.contains(
                r#""name":"ID_AA64DFR0_EL1","value":"0x10105106","writable_mask":"0xf0f""#
            ),
            "{json}"
        );
        let again = Profile::from_json(&json).map_err(|e| e.to_string());
        assert_eq!(again, Ok(profile.clone()));

        // And the rewrite uses them: a DebugVer difference is within the mask, a PMSVer one
        // (bits 32-35) is not; MIDR may not change at all; MPIDR may.
        let with = |id: u64, value: u64| -> Vec<(u64, u64)> {
            registers
                .iter()
                .map(|&(i, v)| if i == id { (i, value) } else { (i, v) })
                .collect()
        };
        let policy = Policy::default();
        let out = rewrite(0, &with(dfr0, 0x1010_5107), &profile, None, &policy);
        assert!(!out.report.is_refused());
        assert_eq!(
            out.report.id_mismatches[0].action,
            IdAction::WithinWritableMask
        );
        let out = rewrite(0, &with(dfr0, 0x1_1010_5106), &profile, None, &policy);
        assert!(matches!(
            out.report.refused[0].reason,
            RefusalReason::IdOutsideWritableMask { mask: 0xf0f, .. }
        ));
        assert!(
            rewrite(0, &with(midr, 0x410f_d0c1), &profile, None, &policy)
                .report
                .is_refused()
        );
        assert!(
            !rewrite(0, &with(mpidr, 0x8000_0100), &profile, None, &policy)
                .report
                .is_refused()
        );
        assert!(rewrite(
            0,
            &with(pfr0, 0x1100_0000_0011_1112),
            &profile,
            None,
            &policy
        )
        .report
        .is_refused());
    }
}
