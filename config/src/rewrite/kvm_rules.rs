//! The KVM rules: what a destination *kernel* can take, decided from its code rather than from the
//! register list alone. Applied when the destination profile is a KVM one.
//!
//! Two questions, for the registers whose presence or value differs between Linux 6.1, 6.12 and
//! 7.3 (docs/profiles.md has the table with the kernel function behind every row):
//!
//! - the source has it, the destination lacks it ([`extra_register`]): is the guest state it
//!   holds recoverable on the destination (drop), or would it be lost (refuse)? Some answers
//!   depend on other registers of the same source vCPU: a feature register saying the guest can
//!   never touch the register, CNTP_CTL_EL0 saying the physical timer is idle, CLIDR_EL1 saying a
//!   cache does not exist;
//! - both have it, the values differ ([`firmware_value`], [`identification_value`]): will the
//!   destination kernel's `KVM_SET_ONE_REG` accept the source's value, and may it (a firmware
//!   version or cache geometry the guest has seen must not be lowered under it)?
//!
//! Pure: the same input gives the same answer in `plan`, `rewrite` and the daemon.

use std::collections::BTreeMap;
use std::fmt;

use crate::profile::{Accel, Profile};
use crate::regid::{
    RegId, CSSELR_MAX, KVM_REG_ARM_FW_FEAT_BMAP, KVM_REG_ARM_PSCI_VERSION,
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1, KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2,
    KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3,
};

// The registers the rules name (architectural encodings, as in the cpreg list).
const ID_AA64PFR2_EL1: u64 = 0x6030_0000_0013_c022;
const ID_AA64MMFR3_EL1: u64 = 0x6030_0000_0013_c03b;
const MIDR_EL1: u64 = 0x6030_0000_0013_c000;
const REVIDR_EL1: u64 = 0x6030_0000_0013_c006;
const AIDR_EL1: u64 = 0x6030_0000_0013_c807;
const CLIDR_EL1: u64 = 0x6030_0000_0013_c801;
const CTR_EL0: u64 = 0x6030_0000_0013_d801;
const PMMIR_EL1: u64 = 0x6030_0000_0013_c4f6;
const CNTPCT_EL0: u64 = 0x6030_0000_0013_df01;
const CNTP_CTL_EL0: u64 = 0x6030_0000_0013_df11;
const CNTP_CVAL_EL0: u64 = 0x6030_0000_0013_df12;

/// `KVM_ARM_PSCI_0_1` = PSCI_VERSION(0, 1).
const PSCI_0_1: u64 = 1;

/// CNTP_CTL_EL0.ENABLE | IMASK: the bits the guest writes. ISTATUS (bit 2) is computed by the
/// timer from CVAL and the count, so `0x4` is the idle timer of a guest that never used it.
const CNTP_CTL_GUEST_BITS: u64 = 0b11;

/// Registers that exist only with a CPU feature: when the source's ID register says the feature
/// is absent, the guest's every access UNDEFs (the hardware does not implement the encoding, and
/// since 6.12 KVM also traps it to UNDEF from the guest's ID view: `kvm_calculate_traps`), so the
/// value - KVM's reset filler 0x1de7ec7edbadc0de for PIR/PIRE0 (`reset_unknown`) - is no guest
/// state. Linux 7.3 stops listing them in that case ("Hide TCR2_EL1/S1PIE registers from
/// userspace when disabled for guests"), 6.12 lists them anyway.
struct FeatureGated {
    id: u64,
    feature: &'static str,
    id_reg: u64,
    id_reg_name: &'static str,
    shift: u32,
}

const FEATURE_GATED: &[FeatureGated] = &[
    FeatureGated {
        id: 0x6030_0000_0013_c103, // TCR2_EL1
        feature: "FEAT_TCR2",
        id_reg: ID_AA64MMFR3_EL1,
        id_reg_name: "ID_AA64MMFR3_EL1.TCRX",
        shift: 0,
    },
    FeatureGated {
        id: 0x6030_0000_0013_c083, // SCTLR2_EL1
        feature: "FEAT_SCTLR2",
        id_reg: ID_AA64MMFR3_EL1,
        id_reg_name: "ID_AA64MMFR3_EL1.SCTLRX",
        shift: 4,
    },
    FeatureGated {
        id: 0x6030_0000_0013_c512, // PIRE0_EL1
        feature: "FEAT_S1PIE",
        id_reg: ID_AA64MMFR3_EL1,
        id_reg_name: "ID_AA64MMFR3_EL1.S1PIE",
        shift: 8,
    },
    FeatureGated {
        id: 0x6030_0000_0013_c513, // PIR_EL1
        feature: "FEAT_S1PIE",
        id_reg: ID_AA64MMFR3_EL1,
        id_reg_name: "ID_AA64MMFR3_EL1.S1PIE",
        shift: 8,
    },
    FeatureGated {
        id: 0x6030_0000_0013_c514, // POR_EL1
        feature: "FEAT_S1POE",
        id_reg: ID_AA64MMFR3_EL1,
        id_reg_name: "ID_AA64MMFR3_EL1.S1POE",
        shift: 16,
    },
    FeatureGated {
        id: 0x6030_0000_0013_da22, // FPMR
        feature: "FEAT_FPMR",
        id_reg: ID_AA64PFR2_EL1,
        id_reg_name: "ID_AA64PFR2_EL1.FPMR",
        shift: 32,
    },
];

/// Why the KVM rules drop a register the destination lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmDrop {
    /// The source CPU lacks the feature the register belongs to: the guest could never access it.
    FeatureAbsent {
        feature: &'static str,
        id_field: &'static str,
    },
    /// CNTP_CTL_EL0 with ENABLE and IMASK clear: the destination's reset state is the same.
    PhysicalTimerDisabled,
    /// CNTP_CVAL_EL0 = 0, its reset value: no deadline was ever programmed.
    PhysicalTimerUnprogrammed,
    /// CNTPCT_EL0 while the physical timer is disabled: a kernel without it keeps no physical
    /// counter offset; the guest's physical count follows the destination host's.
    PhysicalCounterUnused,
    /// PMMIR_EL1 = 0: what a kernel that does not list it shows the guest (read-as-zero).
    ReadAsZeroOnDestination,
    /// A hypercall-service bitmap of 0: the guest was offered none of its services.
    NoServicesOffered,
    /// A CCSIDR entry for a cache the source's CLIDR_EL1 does not describe.
    CacheNotInClidr,
}

/// Why the KVM rules refuse: guest state would be lost, or the destination kernel rejects the
/// value and changing it would deceive the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmRefusal {
    /// The physical timer is in use (CNTP_CTL_EL0 ENABLE or IMASK set).
    PhysicalTimerInUse { ctl: u64 },
    /// CNTP_CVAL_EL0 holds a deadline the guest programmed.
    PhysicalTimerProgrammed,
    /// PMMIR_EL1 nonzero: the destination shows the guest 0 instead.
    NonzeroReadAsZeroOnDestination,
    /// A nonzero hypercall-service bitmap the destination kernel does not have.
    ServicesOffered,
    /// A CCSIDR entry for a cache the source's CLIDR_EL1 describes.
    CacheInClidr,
    /// A firmware version or workaround level above the destination's.
    FirmwareAboveDestination { dest: u64 },
    /// PSCI 0.1 on one side, 0.2 or later on the other.
    PsciInterfaceDiffers { dest: u64 },
    /// Hypercall-service bits the destination kernel does not implement.
    FirmwareServicesUnsupported { dest: u64 },
    /// Linux before 6.3 accepts only its own host's value (cache geometry, ID registers).
    InvariantOnDestination { dest: u64 },
    /// MIDR_EL1, REVIDR_EL1, AIDR_EL1: no kernel QEMU 10.0 drives takes another value.
    ImplementationIdInvariant { dest: u64 },
    /// A CLIDR_EL1 Linux 6.3+ rejects (RES0 bits, or no cleaning level on a host without IDC).
    ClidrRejected,
    /// A CCSIDR line size below the destination host's minimum (CTR_EL0).
    CacheLineBelowDestination { dest_min_log2: u8 },
}

/// The source vCPU's registers by id, for rules that depend on another register. QEMU's list is
/// sorted, so it is searched in place (built per vCPU at switchover, it must cost nothing); only
/// a malformed unsorted list is put into a map (the last value of a duplicated id wins).
pub(super) enum SourceRegs<'a> {
    Sorted(&'a [(u64, u64)]),
    Unsorted(BTreeMap<u64, u64>),
}

impl<'a> SourceRegs<'a> {
    pub(super) fn new(source: &'a [(u64, u64)], sorted: bool) -> SourceRegs<'a> {
        if sorted {
            SourceRegs::Sorted(source)
        } else {
            SourceRegs::Unsorted(source.iter().copied().collect())
        }
    }

    fn get(&self, id: u64) -> Option<u64> {
        match self {
            SourceRegs::Sorted(source) => source
                .binary_search_by_key(&id, |&(reg, _)| reg)
                .ok()
                .and_then(|i| source.get(i))
                .map(|&(_, value)| value),
            SourceRegs::Unsorted(map) => map.get(&id).copied(),
        }
    }
}

/// The rule for a register the source has and the destination (a KVM one) lacks; `None` when the
/// table has no opinion and the policy's general rules decide.
pub(super) fn extra_register(
    id: RegId,
    value: u64,
    source: &SourceRegs<'_>,
) -> Option<Result<KvmDrop, KvmRefusal>> {
    if let Some(gated) = FEATURE_GATED.iter().find(|g| g.id == id.0) {
        let id_value = source.get(gated.id_reg)?;
        // Only "absent" (0) decides; a present feature leaves it to the value rules.
        return ((id_value >> gated.shift) & 0xf == 0).then_some(Ok(KvmDrop::FeatureAbsent {
            feature: gated.feature,
            id_field: gated.id_reg_name,
        }));
    }
    if let Some(selector) = id.ccsidr_selector() {
        let clidr = source.get(CLIDR_EL1)?;
        return Some(if cache_in_clidr(clidr, selector) {
            Err(KvmRefusal::CacheInClidr)
        } else {
            Ok(KvmDrop::CacheNotInClidr)
        });
    }
    if id.0 & !0xffff
        == crate::regid::KVM_REG_ARM64 | crate::regid::KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP
    {
        return Some(if value == 0 {
            Ok(KvmDrop::NoServicesOffered)
        } else {
            Err(KvmRefusal::ServicesOffered)
        });
    }
    let timer_ctl = source.get(CNTP_CTL_EL0).unwrap_or(0);
    let timer_idle = timer_ctl & CNTP_CTL_GUEST_BITS == 0;
    match id.0 {
        PMMIR_EL1 => Some(if value == 0 {
            Ok(KvmDrop::ReadAsZeroOnDestination)
        } else {
            Err(KvmRefusal::NonzeroReadAsZeroOnDestination)
        }),
        CNTP_CTL_EL0 => Some(if timer_idle {
            Ok(KvmDrop::PhysicalTimerDisabled)
        } else {
            Err(KvmRefusal::PhysicalTimerInUse { ctl: timer_ctl })
        }),
        CNTP_CVAL_EL0 => Some(match (value, timer_idle) {
            (0, _) => Ok(KvmDrop::PhysicalTimerUnprogrammed),
            (_, true) => Err(KvmRefusal::PhysicalTimerProgrammed),
            (_, false) => Err(KvmRefusal::PhysicalTimerInUse { ctl: timer_ctl }),
        }),
        CNTPCT_EL0 => Some(if timer_idle {
            Ok(KvmDrop::PhysicalCounterUnused)
        } else {
            Err(KvmRefusal::PhysicalTimerInUse { ctl: timer_ctl })
        }),
        _ => None,
    }
}

/// Does CLIDR_EL1 describe the cache a CSSELR selector names? Ctype<n> (3 bits per level):
/// 1 instruction only, 2 data only, 3 separate, 4 unified.
fn cache_in_clidr(clidr: u64, selector: u8) -> bool {
    let level = u32::from(selector >> 1);
    let ctype = (clidr >> (3 * level)) & 0x7;
    if selector & 1 == 1 {
        matches!(ctype, 1 | 3)
    } else {
        matches!(ctype, 2..=4)
    }
}

/// A firmware pseudo-register both sides have, values differing: `Ok` when the destination
/// kernel takes the source's value (`hypercalls.c`, `kvm_arm_set_fw_reg`), else why not. Not the
/// operator's to override: the destination rejects the value, or taking the destination's would
/// change the firmware interface a running guest has negotiated.
pub(super) fn firmware_value(id: RegId, source: u64, dest: u64) -> Result<(), KvmRefusal> {
    let above = Err(KvmRefusal::FirmwareAboveDestination { dest });
    match id.0 {
        // The kernel takes any version it implements (0.2 .. its latest); a fresh destination
        // reports its latest. PSCI_VERSION(major, minor) = major << 16 | minor orders correctly.
        KVM_REG_ARM_PSCI_VERSION if source > dest => above,
        // 0.1 (the pre-SMCCC interface) and 0.2+ are different vCPU features: neither loads
        // into the other (`wants_02`).
        KVM_REG_ARM_PSCI_VERSION if (source <= PSCI_0_1) != (dest <= PSCI_0_1) => {
            Err(KvmRefusal::PsciInterfaceDiffers { dest })
        }
        KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1 | KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3
            if source & 0xf > dest & 0xf || source & !0xf != 0 =>
        {
            above
        }
        // WORKAROUND_2: NOT_AVAIL (0) and UNKNOWN (1) load as NOT_AVAIL, AVAIL (2) and
        // NOT_REQUIRED (3) as NOT_REQUIRED; the kernel's own level must be at least that.
        KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2 => {
            let wanted = if source & 0xf >= 2 { 3 } else { 0 };
            let own = if dest & 0xf >= 2 { 3 } else { 0 };
            if wanted > own {
                above
            } else {
                Ok(())
            }
        }
        // The service bitmaps: a subset of what the destination offers (a fresh destination
        // offers everything it implements): `kvm_arm_set_fw_reg_bmap`.
        _ if id.0 & !0xffff
            == crate::regid::KVM_REG_ARM64
                | crate::regid::KVM_REG_SIZE_U64
                | KVM_REG_ARM_FW_FEAT_BMAP
            && source & !dest != 0 =>
        {
            Err(KvmRefusal::FirmwareServicesUnsupported { dest })
        }
        _ => Ok(()),
    }
}

/// An identification register or CCSIDR entry both sides have, values differing, policy `auto`:
/// `Some(Ok)` the destination kernel takes it, `Some(Err)` it does not, `None` no rule here (the
/// writable masks decide).
pub(super) fn identification_value(
    id: RegId,
    source: u64,
    dest_value: u64,
    dest: &Profile,
) -> Option<Result<(), KvmRefusal>> {
    if dest.accel != Accel::Kvm {
        return None;
    }
    let invariant = Err(KvmRefusal::InvariantOnDestination { dest: dest_value });
    if caches_invariant(dest) {
        return Some(invariant);
    }
    if matches!(id.0, MIDR_EL1 | REVIDR_EL1 | AIDR_EL1) && !dest.has_writable_masks() {
        return Some(Err(KvmRefusal::ImplementationIdInvariant {
            dest: dest_value,
        }));
    }
    if id.0 == CLIDR_EL1 && listed_ccsidr(dest) == usize::from(CSSELR_MAX) {
        return Some(clidr_value(source, dest));
    }
    let selector = id.ccsidr_selector()?;
    // Linux 6.3+ (`set_ccsidr`): any geometry whose line size is at least the host's minimum.
    let Some(ctr) = dest.value_for(0, RegId(CTR_EL0)) else {
        return Some(Ok(()));
    };
    let min_words_log2 = if selector & 1 == 1 {
        ctr & 0xf
    } else {
        (ctr >> 16) & 0xf
    };
    let dest_min_log2 = u8::try_from(min_words_log2 + 2).unwrap_or(u8::MAX);
    let line_log2 = (source & 0x7) + 4;
    if line_log2 < u64::from(dest_min_log2) {
        Some(Err(KvmRefusal::CacheLineBelowDestination { dest_min_log2 }))
    } else {
        Some(Ok(()))
    }
}

/// Linux 6.3+ `set_clidr`: any CLIDR_EL1 without RES0 bits (63:47), except one that implies
/// CTR_EL0.IDC (no level to clean to: LoC = 0, or LoUU = LoUIS = 0) when the host lacks IDC.
fn clidr_value(source: u64, dest: &Profile) -> Result<(), KvmRefusal> {
    let res0 = !((1u64 << 47) - 1);
    let loc = (source >> 24) & 0x7;
    let louis = (source >> 21) & 0x7;
    let louu = (source >> 27) & 0x7;
    let implies_idc = loc == 0 || (louis == 0 && louu == 0);
    let host_idc = dest
        .value_for(0, RegId(CTR_EL0))
        .is_some_and(|ctr| ctr & (1 << 28) != 0);
    if source & res0 != 0 || (implies_idc && !host_idc) {
        Err(KvmRefusal::ClidrRejected)
    } else {
        Ok(())
    }
}

fn listed_ccsidr(dest: &Profile) -> usize {
    dest.present()
        .filter(|r| r.id.ccsidr_selector().is_some())
        .count()
}

/// A KVM destination whose kernel predates Linux 6.3, told by its register list: it lists a CCSIDR
/// entry only for each cache its host really has (6.3 and later list all [`CSSELR_MAX`], with a
/// fabricated geometry). Such a kernel treats CLIDR_EL1, the CCSIDR entries and (apart from a
/// few fields) the ID registers as invariant: `set_invariant_sys_reg`, `demux_c15_set`,
/// `set_id_reg` return -EINVAL for any value but its host's. It also predates the writable masks.
pub(super) fn caches_invariant(dest: &Profile) -> bool {
    if dest.accel != Accel::Kvm || dest.has_writable_masks() {
        return false;
    }
    let listed = listed_ccsidr(dest);
    listed > 0 && listed < usize::from(CSSELR_MAX)
}

/// What the KVM rules conclude about the destination kernel from its profile, for `plan`.
pub fn destination_kernel_note(dest: &Profile) -> Option<String> {
    if dest.accel != Accel::Kvm {
        return None;
    }
    let listed = listed_ccsidr(dest);
    if caches_invariant(dest) {
        return Some(format!(
            "the destination profile lists {listed} of {CSSELR_MAX} CCSIDR entries: a kernel before Linux 6.3, which takes only its host's own cache geometry, CLIDR_EL1 and ID register values"
        ));
    }
    if listed == usize::from(CSSELR_MAX) && !dest.has_writable_masks() {
        return Some(
            "the destination profile has no writable masks (captured from a stream): ID register differences are reported, not checked; `profile capture --from-kvm` on the destination host records them".to_owned(),
        );
    }
    None
}

/// A value as the rules talk about it: PSCI versions as `major.minor`, the rest in hex.
pub(super) fn show_value(id: RegId, value: u64) -> String {
    if id.0 == KVM_REG_ARM_PSCI_VERSION {
        format!("{}.{} ({value:#x})", value >> 16, value & 0xffff)
    } else {
        format!("{value:#x}")
    }
}

impl fmt::Display for KvmDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmDrop::FeatureAbsent { feature, id_field } => write!(
                f,
                "the source CPU has no {feature} ({id_field} = 0): every guest access UNDEFs, the value is KVM's reset filler"
            ),
            KvmDrop::PhysicalTimerDisabled => f.write_str(
                "the physical timer is disabled (ENABLE and IMASK clear); the destination kernel resets it to the same",
            ),
            KvmDrop::PhysicalTimerUnprogrammed => f.write_str(
                "0, its reset value: the guest never programmed a physical-timer deadline",
            ),
            KvmDrop::PhysicalCounterUnused => f.write_str(
                "the physical timer is disabled; a kernel that does not list it has no physical counter offset (arch_timer.c), the guest's physical count follows the destination host's (the virtual counter is carried)",
            ),
            KvmDrop::ReadAsZeroOnDestination => f.write_str(
                "0, what a kernel that does not list it shows the guest (read-as-zero)",
            ),
            KvmDrop::NoServicesOffered => {
                f.write_str("0: the guest was offered none of its hypercall services")
            }
            KvmDrop::CacheNotInClidr => f.write_str(
                "the source's CLIDR_EL1 describes no such cache: the guest cannot have relied on it",
            ),
        }
    }
}

/// The refusal sentence for `id` = `value`.
pub(super) fn describe_refusal(id: RegId, value: u64, reason: KvmRefusal) -> String {
    let v = show_value(id, value);
    match reason {
        KvmRefusal::PhysicalTimerInUse { ctl } => format!(
            "{id} = {v}: the guest's physical timer is in use (CNTP_CTL_EL0 = {ctl:#x}, ENABLE or IMASK set) and the destination kernel does not list the physical timer (before Linux 6.4 guest.c copy_timer_indices lists only the virtual one), so the destination QEMU cannot restore it: the timer would be lost"
        ),
        KvmRefusal::PhysicalTimerProgrammed => format!(
            "{id} = {v}: the guest programmed a physical-timer deadline the destination kernel cannot restore (it does not list the physical timer)"
        ),
        KvmRefusal::NonzeroReadAsZeroOnDestination => format!(
            "{id} = {v}: the destination kernel does not list it and shows the guest 0 (read-as-zero): the PMU the guest has seen would change"
        ),
        KvmRefusal::ServicesOffered => format!(
            "{id} = {v}: the guest was offered hypercall services the destination kernel does not have"
        ),
        KvmRefusal::CacheInClidr => format!(
            "{id} = {v}: the source's CLIDR_EL1 describes this cache and the destination kernel does not list it"
        ),
        KvmRefusal::FirmwareAboveDestination { dest } => format!(
            "{id} {v}: the destination kernel offers at most {} and rejects anything higher (hypercalls.c kvm_arm_set_fw_reg); lowering it would change the firmware interface under the running guest",
            show_value(id, dest)
        ),
        KvmRefusal::PsciInterfaceDiffers { dest } => format!(
            "{id} {v}: the destination's vCPUs use PSCI {}; 0.1 and 0.2+ are different vCPU features and the kernel rejects the other one (hypercalls.c kvm_arm_set_fw_reg)",
            show_value(id, dest)
        ),
        KvmRefusal::FirmwareServicesUnsupported { dest } => format!(
            "{id} = {v}: bits {:#x} name hypercall services the destination kernel does not offer ({dest:#x}); it rejects them (hypercalls.c kvm_arm_set_fw_reg_bmap)",
            value & !dest
        ),
        KvmRefusal::InvariantOnDestination { dest } => format!(
            "{id}: source {v}, destination {dest:#x}; the destination kernel (before Linux 6.3: it lists only its host's real caches) takes only its own host's cache geometry and ID register values (sys_regs.c set_invariant_sys_reg, demux_c15_set, set_id_reg), and sending its value would change the CPU the running guest has seen"
        ),
        KvmRefusal::ImplementationIdInvariant { dest } => format!(
            "{id}: source {v}, destination {dest:#x}; KVM takes no other value for MIDR_EL1, REVIDR_EL1 or AIDR_EL1 unless the VMM enables KVM_CAP_ARM_WRITABLE_IMP_ID_REGS (QEMU 10.0 does not)"
        ),
        KvmRefusal::ClidrRejected => format!(
            "{id} = {v}: the destination kernel rejects it: RES0 bits set, or it describes no level to clean to while the destination host's CTR_EL0 lacks IDC (sys_regs.c set_clidr)"
        ),
        KvmRefusal::CacheLineBelowDestination { dest_min_log2 } => format!(
            "{id} = {v}: its line size, {} bytes, is below the destination host's minimum {} bytes (CTR_EL0); the kernel rejects it (sys_regs.c set_ccsidr)",
            1u64 << ((value & 0x7) + 4),
            1u64 << dest_min_log2.min(63)
        ),
    }
}
