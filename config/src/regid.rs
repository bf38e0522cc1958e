//! `RegId`: one entry of QEMU's cpreg list, a register index in KVM's `KVM_{GET,SET}_ONE_REG` format.
//!
//! QEMU puts the same 64-bit indexes on the wire under KVM and under TCG (TCG converts its own
//! cpreg keys with `cpreg_to_kvm_id()`, `target/arm/kvm-consts.h`):
//!
//! ```text
//!  63    56 55  52 51        28 27      16 15                                0
//! +--------+------+------------+----------+----------------------------------+
//! |  arch  | size |     0      |  coproc  |  encoding (depends on coproc)    |
//! +--------+------+------------+----------+----------------------------------+
//!  0x60 ARM64, 0x40 ARM (AArch32 views, TCG only)
//!           0x2 = 32 bit, 0x3 = 64 bit
//!
//! ARM64 system register (coproc 0x0013):  op0<<14 | op1<<11 | CRn<<7 | CRm<<3 | op2
//! AArch32 32-bit (coproc = cp number):    ns<<29 | CRn<<11 | CRm<<7 | opc1<<3 | opc2
//! AArch32 64-bit (coproc = cp number):    ns<<29 |             CRm<<7 | opc1<<3
//! ```
//!
//! The ARM64 constants below are spelled as `linux/arch/arm64/include/uapi/asm/kvm.h` spells them;
//! kvm-bindings only exposes them on aarch64 builds, so they are defined here and checked against
//! kvm-bindings by an aarch64-only test.

use std::fmt;
use std::str::FromStr;

use crate::error::ConfigError;
use crate::regnames;

// linux/include/uapi/linux/kvm.h
pub const KVM_REG_ARCH_MASK: u64 = 0xff00_0000_0000_0000;
pub const KVM_REG_ARM: u64 = 0x4000_0000_0000_0000;
pub const KVM_REG_ARM64: u64 = 0x6000_0000_0000_0000;
pub const KVM_REG_SIZE_SHIFT: u32 = 52;
pub const KVM_REG_SIZE_MASK: u64 = 0x00f0_0000_0000_0000;
pub const KVM_REG_SIZE_U32: u64 = 0x0020_0000_0000_0000;
pub const KVM_REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;

// linux/arch/arm64/include/uapi/asm/kvm.h
pub const KVM_REG_ARM_COPROC_MASK: u64 = 0x0000_0000_0fff_0000;
pub const KVM_REG_ARM_COPROC_SHIFT: u32 = 16;
pub const KVM_REG_ARM_CORE: u64 = 0x0010 << KVM_REG_ARM_COPROC_SHIFT;
pub const KVM_REG_ARM_DEMUX: u64 = 0x0011 << KVM_REG_ARM_COPROC_SHIFT;
pub const KVM_REG_ARM64_SYSREG: u64 = 0x0013 << KVM_REG_ARM_COPROC_SHIFT;
pub const KVM_REG_ARM_FW: u64 = 0x0014 << KVM_REG_ARM_COPROC_SHIFT;
pub const KVM_REG_ARM64_SVE: u64 = 0x0015 << KVM_REG_ARM_COPROC_SHIFT;
pub const KVM_REG_ARM_FW_FEAT_BMAP: u64 = 0x0016 << KVM_REG_ARM_COPROC_SHIFT;

pub const KVM_REG_ARM64_SYSREG_OP0_MASK: u64 = 0x0000_0000_0000_c000;
pub const KVM_REG_ARM64_SYSREG_OP0_SHIFT: u32 = 14;
pub const KVM_REG_ARM64_SYSREG_OP1_MASK: u64 = 0x0000_0000_0000_3800;
pub const KVM_REG_ARM64_SYSREG_OP1_SHIFT: u32 = 11;
pub const KVM_REG_ARM64_SYSREG_CRN_MASK: u64 = 0x0000_0000_0000_0780;
pub const KVM_REG_ARM64_SYSREG_CRN_SHIFT: u32 = 7;
pub const KVM_REG_ARM64_SYSREG_CRM_MASK: u64 = 0x0000_0000_0000_0078;
pub const KVM_REG_ARM64_SYSREG_CRM_SHIFT: u32 = 3;
pub const KVM_REG_ARM64_SYSREG_OP2_MASK: u64 = 0x0000_0000_0000_0007;
pub const KVM_REG_ARM64_SYSREG_OP2_SHIFT: u32 = 0;

/// `KVM_REG_ARM_FW_REG(r)`: firmware pseudo-registers (PSCI version, SMCCC workarounds).
pub const fn kvm_reg_arm_fw_reg(r: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | (r & 0xffff)
}
/// `KVM_REG_ARM_FW_FEAT_BMAP_REG(r)`: the hypercall service bitmaps (Linux 5.19+).
pub const fn kvm_reg_arm_fw_feat_bmap_reg(r: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP | (r & 0xffff)
}
pub const KVM_REG_ARM_PSCI_VERSION: u64 = kvm_reg_arm_fw_reg(0);
pub const KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1: u64 = kvm_reg_arm_fw_reg(1);
pub const KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2: u64 = kvm_reg_arm_fw_reg(2);
pub const KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3: u64 = kvm_reg_arm_fw_reg(3);
pub const KVM_REG_ARM_STD_BMAP: u64 = kvm_reg_arm_fw_feat_bmap_reg(0);
pub const KVM_REG_ARM_STD_HYP_BMAP: u64 = kvm_reg_arm_fw_feat_bmap_reg(1);
pub const KVM_REG_ARM_VENDOR_HYP_BMAP: u64 = kvm_reg_arm_fw_feat_bmap_reg(2);
pub const KVM_REG_ARM_VENDOR_HYP_BMAP_2: u64 = kvm_reg_arm_fw_feat_bmap_reg(3);

/// `KVM_REG_ARM_DEMUX_ID_CCSIDR`: the demultiplexed CCSIDR_EL1 values, one 32-bit pseudo-register
/// per `CSSELR_EL1` value (`KVM_REG_ARM_DEMUX_VAL_MASK` = the selector: level << 1 | InD).
pub const KVM_REG_ARM_DEMUX_ID_MASK: u64 = 0x0000_0000_0000_ff00;
pub const KVM_REG_ARM_DEMUX_ID_CCSIDR: u64 = 0;
pub const KVM_REG_ARM_DEMUX_VAL_MASK: u64 = 0x0000_0000_0000_00ff;
/// The first CCSIDR demux id; entry `n` is this `| n`.
pub const KVM_REG_ARM_CCSIDR_DEMUX_BASE: u64 =
    KVM_REG_ARM64 | KVM_REG_SIZE_U32 | KVM_REG_ARM_DEMUX | KVM_REG_ARM_DEMUX_ID_CCSIDR;
/// `CSSELR_MAX` of `arch/arm64/kvm/sys_regs.c`: 7 levels x (data/unified, instruction).
pub const CSSELR_MAX: u8 = 14;

// QEMU target/arm/cpregs.h: ENCODE_CP_REG() fields of the AArch32 views (CP_REG_NS_SHIFT = 29).
const CP_REG_NS_BIT: u64 = 1 << 29;
const AARCH32_CRN_SHIFT: u32 = 11;
const AARCH32_CRM_SHIFT: u32 = 7;
const AARCH32_OPC1_SHIFT: u32 = 3;

/// The size, architecture and coprocessor bits of an index: what QEMU and KVM classify by.
const CLASS_MASK: u64 = KVM_REG_ARCH_MASK | KVM_REG_SIZE_MASK | KVM_REG_ARM_COPROC_MASK;

/// One cpreg index (KVM format), as it travels in the `cpu` section's `cpreg_vmstate_indexes`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RegId(pub u64);

/// The decoded fields of an AArch32 (coprocessor) view, as QEMU's TCG encodes them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Aarch32Encoding {
    pub cp: u16,
    pub is64: bool,
    pub opc1: u8,
    pub crn: u8,
    pub crm: u8,
    pub opc2: u8,
    pub ns: bool,
}

impl RegId {
    /// The ARM64 system register `S<op0>_<op1>_C<crn>_C<crm>_<op2>`.
    pub const fn arm64_sysreg(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> RegId {
        RegId(
            KVM_REG_ARM64
                | KVM_REG_SIZE_U64
                | KVM_REG_ARM64_SYSREG
                | (((op0 as u64) << KVM_REG_ARM64_SYSREG_OP0_SHIFT)
                    & KVM_REG_ARM64_SYSREG_OP0_MASK)
                | (((op1 as u64) << KVM_REG_ARM64_SYSREG_OP1_SHIFT)
                    & KVM_REG_ARM64_SYSREG_OP1_MASK)
                | (((crn as u64) << KVM_REG_ARM64_SYSREG_CRN_SHIFT)
                    & KVM_REG_ARM64_SYSREG_CRN_MASK)
                | (((crm as u64) << KVM_REG_ARM64_SYSREG_CRM_SHIFT)
                    & KVM_REG_ARM64_SYSREG_CRM_MASK)
                | (((op2 as u64) << KVM_REG_ARM64_SYSREG_OP2_SHIFT)
                    & KVM_REG_ARM64_SYSREG_OP2_MASK),
        )
    }

    /// A 32-bit AArch32 coprocessor view as QEMU's TCG lists it (always the non-secure bank).
    pub const fn aarch32(cp: u8, opc1: u8, crn: u8, crm: u8, opc2: u8) -> RegId {
        RegId(
            KVM_REG_ARM
                | KVM_REG_SIZE_U32
                | CP_REG_NS_BIT
                | ((cp as u64) << KVM_REG_ARM_COPROC_SHIFT)
                | (((crn as u64) & 0xf) << AARCH32_CRN_SHIFT)
                | (((crm as u64) & 0xf) << AARCH32_CRM_SHIFT)
                | (((opc1 as u64) & 0xf) << AARCH32_OPC1_SHIFT)
                | ((opc2 as u64) & 0x7),
        )
    }

    /// A 64-bit AArch32 coprocessor view (`MRRC`), non-secure bank.
    pub const fn aarch32_64(cp: u8, opc1: u8, crm: u8) -> RegId {
        RegId(
            KVM_REG_ARM
                | KVM_REG_SIZE_U64
                | CP_REG_NS_BIT
                | ((cp as u64) << KVM_REG_ARM_COPROC_SHIFT)
                | (((crm as u64) & 0xf) << AARCH32_CRM_SHIFT)
                | (((opc1 as u64) & 0xf) << AARCH32_OPC1_SHIFT),
        )
    }

    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The coprocessor / register class field (bits 16-27): 0x0013 sysreg, 0x0014 firmware, ...
    pub const fn coproc(self) -> u64 {
        (self.0 & KVM_REG_ARM_COPROC_MASK) >> KVM_REG_ARM_COPROC_SHIFT
    }

    /// Register width in bytes, from the size field (`KVM_REG_SIZE()`); `None` beyond 2^15.
    pub const fn size_bytes(self) -> Option<u64> {
        let log2 = (self.0 & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT;
        if log2 > 15 {
            None
        } else {
            Some(1 << log2)
        }
    }

    pub const fn is_arm64(self) -> bool {
        self.0 & KVM_REG_ARCH_MASK == KVM_REG_ARM64
    }

    /// An AArch32 coprocessor view (`0x4020...`/`0x4030...`): only QEMU's TCG lists these.
    pub const fn is_aarch32(self) -> bool {
        self.0 & KVM_REG_ARCH_MASK == KVM_REG_ARM
    }

    /// A firmware pseudo-register (class 0x0014) or hypercall bitmap (0x0016): only KVM lists these.
    pub const fn is_firmware(self) -> bool {
        let class = self.0 & CLASS_MASK & !KVM_REG_SIZE_MASK;
        class == KVM_REG_ARM64 | KVM_REG_ARM_FW || class == KVM_REG_ARM64 | KVM_REG_ARM_FW_FEAT_BMAP
    }

    /// `(op0, op1, crn, crm, op2)` when this is a 64-bit ARM64 system register.
    pub const fn sysreg_fields(self) -> Option<(u8, u8, u8, u8, u8)> {
        if self.0 & !0xffff != KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG {
            return None;
        }
        let x = self.0;
        Some((
            ((x & KVM_REG_ARM64_SYSREG_OP0_MASK) >> KVM_REG_ARM64_SYSREG_OP0_SHIFT) as u8,
            ((x & KVM_REG_ARM64_SYSREG_OP1_MASK) >> KVM_REG_ARM64_SYSREG_OP1_SHIFT) as u8,
            ((x & KVM_REG_ARM64_SYSREG_CRN_MASK) >> KVM_REG_ARM64_SYSREG_CRN_SHIFT) as u8,
            ((x & KVM_REG_ARM64_SYSREG_CRM_MASK) >> KVM_REG_ARM64_SYSREG_CRM_SHIFT) as u8,
            ((x & KVM_REG_ARM64_SYSREG_OP2_MASK) >> KVM_REG_ARM64_SYSREG_OP2_SHIFT) as u8,
        ))
    }

    /// The decoded AArch32 view, when this is one (bits 28 and 30-51 must be clear).
    pub const fn aarch32_fields(self) -> Option<Aarch32Encoding> {
        let is64 = match self.0 & (KVM_REG_ARCH_MASK | KVM_REG_SIZE_MASK) {
            x if x == KVM_REG_ARM | KVM_REG_SIZE_U32 => false,
            x if x == KVM_REG_ARM | KVM_REG_SIZE_U64 => true,
            _ => return None,
        };
        let low = self.0 & 0x000f_ffff_ffff_ffff;
        if low & !(CP_REG_NS_BIT | KVM_REG_ARM_COPROC_MASK | 0x7fff) != 0 {
            return None;
        }
        let cp = ((low & KVM_REG_ARM_COPROC_MASK) >> KVM_REG_ARM_COPROC_SHIFT) as u16;
        let x = low & 0x7fff;
        Some(Aarch32Encoding {
            cp,
            is64,
            opc1: ((x >> AARCH32_OPC1_SHIFT) & 0xf) as u8,
            crn: if is64 {
                0
            } else {
                ((x >> AARCH32_CRN_SHIFT) & 0xf) as u8
            },
            crm: ((x >> AARCH32_CRM_SHIFT) & 0xf) as u8,
            opc2: if is64 { 0 } else { (x & 0x7) as u8 },
            ns: low & CP_REG_NS_BIT != 0,
        })
    }

    /// The `CSSELR_EL1` selector of a CCSIDR demux pseudo-register (level - 1) << 1 | InD, when
    /// this is one.
    pub const fn ccsidr_selector(self) -> Option<u8> {
        if self.0 & !KVM_REG_ARM_DEMUX_VAL_MASK != KVM_REG_ARM_CCSIDR_DEMUX_BASE {
            return None;
        }
        let sel = (self.0 & KVM_REG_ARM_DEMUX_VAL_MASK) as u8;
        if sel < CSSELR_MAX {
            Some(sel)
        } else {
            None
        }
    }

    /// The CCSIDR demux pseudo-register for a `CSSELR_EL1` selector.
    pub const fn ccsidr(selector: u8) -> RegId {
        RegId(KVM_REG_ARM_CCSIDR_DEMUX_BASE | selector as u64)
    }

    /// Identification registers (DESIGN.md, "Rewriting"): values a destination treats as properties of
    /// its CPU rather than as guest state, so a difference must be reported, never silently carried.
    ///
    /// AArch64: op0=3 with (op1=0, CRn=0) MIDR/MPIDR/REVIDR/ID_*, (op1=1, CRn=0) CCSIDR/CLIDR/AIDR,
    /// (op1=3, CRn=0) CTR_EL0/DCZID_EL0. AArch32 views: cp15 CRn=0 with opc1 0 or 1 (opc1=2 is the
    /// writable CSSELR, opc1=4 the writable VPIDR/VMPIDR).
    pub const fn is_identification(self) -> bool {
        if let Some((op0, op1, crn, _, _)) = self.sysreg_fields() {
            return op0 == 3 && crn == 0 && (op1 == 0 || op1 == 1 || op1 == 3);
        }
        if let Some(e) = self.aarch32_fields() {
            return e.cp == 15 && !e.is64 && e.crn == 0 && (e.opc1 == 0 || e.opc1 == 1);
        }
        false
    }

    /// The name without a hex fallback: architectural, else generic system-register or
    /// coprocessor form; `None` for indexes of no known shape.
    pub fn symbolic_name(self) -> Option<String> {
        if let Some(name) = regnames::reg_name(self.0) {
            return Some(name.to_owned());
        }
        if let Some((op0, op1, crn, crm, op2)) = self.sysreg_fields() {
            return Some(format!("S{op0}_{op1}_C{crn}_C{crm}_{op2}"));
        }
        if let Some(e) = self.aarch32_fields() {
            let bank = if e.ns { "" } else { " (secure)" };
            return Some(if e.is64 {
                format!("p{},{},c{}{}", e.cp, e.opc1, e.crm, bank)
            } else {
                format!(
                    "p{},{},c{},c{},{}{}",
                    e.cp, e.opc1, e.crn, e.crm, e.opc2, bank
                )
            });
        }
        None
    }
}

impl fmt::Display for RegId {
    /// `TCR2_EL1`, else `S3_0_C2_C0_3` / `p15,0,c0,c1,2`, else `0x...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.symbolic_name() {
            Some(name) => f.write_str(&name),
            None => write!(f, "{:#x}", self.0),
        }
    }
}

impl FromStr for RegId {
    type Err = ConfigError;

    /// Accepts a hex id (`0x603000000013c103`), a table name (`TCR2_EL1`, any case), the generic
    /// system-register form (`S3_0_C2_C0_3`) or the coprocessor form (`p15,0,c0,c1,2`).
    fn from_str(text: &str) -> Result<RegId, ConfigError> {
        let t = text.trim();
        let unknown = || ConfigError::UnknownRegister(text.to_owned());
        if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            return u64::from_str_radix(hex, 16)
                .map(RegId)
                .map_err(|_| unknown());
        }
        if let Some(id) = regnames::reg_by_name(t) {
            return Ok(RegId(id));
        }
        if let Some(id) = parse_generic_sysreg(t) {
            return Ok(id);
        }
        if let Some(id) = parse_coproc_form(t) {
            return Ok(id);
        }
        Err(unknown())
    }
}

/// `S3_0_C2_C0_3` (case-insensitive), as `mrs` accepts it.
fn parse_generic_sysreg(text: &str) -> Option<RegId> {
    let upper = text.to_ascii_uppercase();
    let rest = upper.strip_prefix('S')?;
    let mut parts = rest.split('_');
    let op0: u8 = parts.next()?.parse().ok()?;
    let op1: u8 = parts.next()?.parse().ok()?;
    let crn: u8 = parts.next()?.strip_prefix('C')?.parse().ok()?;
    let crm: u8 = parts.next()?.strip_prefix('C')?.parse().ok()?;
    let op2: u8 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || op0 > 3 || op1 > 7 || crn > 15 || crm > 15 || op2 > 7 {
        return None;
    }
    Some(RegId::arm64_sysreg(op0, op1, crn, crm, op2))
}

/// `p15,0,c0,c1,2` (32-bit) or `p15,0,c7` (64-bit), the form `Display` prints for AArch32 views.
fn parse_coproc_form(text: &str) -> Option<RegId> {
    let lower = text.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split(',').map(str::trim).collect();
    let cp: u8 = parts.first()?.strip_prefix('p')?.parse().ok()?;
    let opc1: u8 = parts.get(1)?.parse().ok()?;
    let creg = |i: usize| -> Option<u8> {
        let v: u8 = parts.get(i)?.strip_prefix('c')?.parse().ok()?;
        (v <= 15).then_some(v)
    };
    if cp > 15 || opc1 > 15 {
        return None;
    }
    match parts.len() {
        3 => Some(RegId::aarch32_64(cp, opc1, creg(2)?)),
        5 => {
            let opc2: u8 = parts.get(4)?.parse().ok()?;
            let id = RegId::aarch32(cp, opc1, creg(2)?, creg(3)?, opc2);
            (opc2 <= 7).then_some(id)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysreg_encoding_matches_the_documented_ids() {
        assert_eq!(RegId::arm64_sysreg(3, 0, 2, 0, 3).0, 0x6030_0000_0013_c103); // TCR2_EL1
        assert_eq!(RegId::arm64_sysreg(3, 0, 10, 2, 2).0, 0x6030_0000_0013_c512); // PIRE0_EL1
        assert_eq!(RegId::arm64_sysreg(3, 0, 10, 2, 3).0, 0x6030_0000_0013_c513); // PIR_EL1
        assert_eq!(RegId::arm64_sysreg(3, 0, 12, 0, 2).0, 0x6030_0000_0013_c602); // RMR_EL1
        assert_eq!(RegId::arm64_sysreg(3, 4, 1, 2, 2).0, 0x6030_0000_0013_e092); // HCRX_EL2
        assert_eq!(KVM_REG_ARM_VENDOR_HYP_BMAP_2, 0x6030_0000_0016_0003);
        assert_eq!(KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3, 0x6030_0000_0014_0003);
        assert_eq!(
            RegId(0x6030_0000_0013_c103).sysreg_fields(),
            Some((3, 0, 2, 0, 3))
        );
    }

    #[test]
    fn aarch32_views_decode_as_qemu_encodes_them() {
        // The AArch32 view of ID_DFR0 (an identification register) and QEMU's bogus DBGDTRTX.
        assert_eq!(RegId::aarch32(15, 0, 0, 1, 2).0, 0x4020_0000_200f_0082);
        assert_eq!(RegId::aarch32(14, 3, 0, 5, 0).0, 0x4020_0000_200e_0298);
        assert_eq!(RegId::aarch32_64(15, 0, 7).0, 0x4030_0000_200f_0380);
        let e = RegId(0x4020_0000_200f_0082).aarch32_fields();
        assert_eq!(
            e,
            Some(Aarch32Encoding {
                cp: 15,
                is64: false,
                opc1: 0,
                crn: 0,
                crm: 1,
                opc2: 2,
                ns: true
            })
        );
        assert!(RegId(0x4020_0000_200f_0082).is_aarch32());
        assert!(!RegId(0x4020_0000_200f_0082).is_arm64());
    }

    #[test]
    fn identification_classification() {
        let id = |s: &str| s.parse::<RegId>().map(RegId::is_identification).ok();
        for name in [
            "MIDR_EL1",
            "MPIDR_EL1",
            "ID_DFR0_EL1",
            "ID_AA64MMFR3_EL1",
            "CCSIDR_EL1",
            "CLIDR_EL1",
            "AIDR_EL1",
            "CTR_EL0",
            "DCZID_EL0",
        ] {
            assert_eq!(id(name), Some(true), "{name}");
        }
        for name in [
            "CSSELR_EL1",
            "SCTLR_EL1",
            "TCR2_EL1",
            "VPIDR_EL2",
            "RMR_EL1",
        ] {
            assert_eq!(id(name), Some(false), "{name}");
        }
        assert!(RegId(0x4020_0000_200f_0082).is_identification()); // ID_DFR0 AArch32 view
        assert!(RegId(0x4020_0000_200f_0009).is_identification()); // CCSIDR AArch32 view (opc1=1)
        assert!(!RegId(0x4020_0000_200f_0801).is_identification()); // ACTLR, CRn=1
        assert!(!RegId(0x4030_0000_200f_0380).is_identification()); // 64-bit view
        assert!(!RegId(KVM_REG_ARM_VENDOR_HYP_BMAP_2).is_identification());
    }

    #[test]
    fn display_and_parse_round_trip() {
        assert_eq!(RegId(0x6030_0000_0013_c103).to_string(), "TCR2_EL1");
        // An unnamed encoding prints in the generic form and parses back.
        let odd = RegId::arm64_sysreg(3, 0, 0, 6, 7);
        assert_eq!(odd.to_string(), "S3_0_C0_C6_7");
        assert_eq!("S3_0_C0_C6_7".parse::<RegId>().ok(), Some(odd));
        assert_eq!(
            "s3_0_c2_c0_3".parse::<RegId>().ok(),
            Some(RegId(0x6030_0000_0013_c103))
        );
        assert_eq!(
            "tcr2_el1".parse::<RegId>().ok(),
            Some(RegId(0x6030_0000_0013_c103))
        );
        assert_eq!(
            "0x6030000000160003".parse::<RegId>().ok(),
            Some(RegId(KVM_REG_ARM_VENDOR_HYP_BMAP_2))
        );
        let cp = RegId::aarch32(15, 0, 7, 4, 0);
        assert_eq!(cp.to_string().parse::<RegId>().ok(), Some(cp));
        let cp64 = RegId::aarch32_64(15, 3, 15);
        assert_eq!(cp64.to_string().parse::<RegId>().ok(), Some(cp64));
        assert_eq!(RegId(0x1234).to_string(), "0x1234");
        assert!("NOT_A_REGISTER".parse::<RegId>().is_err());
        assert!("0xzz".parse::<RegId>().is_err());
    }

    #[test]
    fn ccsidr_demux_entries_are_named_by_cache() {
        // The ids the kernels list (`0x6020000000110000`..`0x602000000011000d`).
        assert_eq!(RegId(0x6020_0000_0011_0000).to_string(), "CCSIDR[L1 data]");
        assert_eq!(
            RegId(0x6020_0000_0011_0001).to_string(),
            "CCSIDR[L1 instruction]"
        );
        assert_eq!(RegId(0x6020_0000_0011_0002).to_string(), "CCSIDR[L2 data]");
        assert_eq!(
            RegId(0x6020_0000_0011_000d).to_string(),
            "CCSIDR[L7 instruction]"
        );
        for sel in 0..CSSELR_MAX {
            let id = RegId::ccsidr(sel);
            assert_eq!(id.ccsidr_selector(), Some(sel));
            assert_eq!(id.to_string().parse::<RegId>().ok(), Some(id));
        }
        assert_eq!(
            "ccsidr[l2 data]".parse::<RegId>().ok(),
            Some(RegId(0x6020_0000_0011_0002))
        );
        // Selector 14 and beyond is no cache: no name, and the names do not parse.
        assert_eq!(RegId(0x6020_0000_0011_000e).ccsidr_selector(), None);
        assert_eq!(
            RegId(0x6020_0000_0011_000e).to_string(),
            "0x602000000011000e"
        );
        assert!("CCSIDR[L8 data]".parse::<RegId>().is_err());
        assert!("CCSIDR[L0 data]".parse::<RegId>().is_err());
        assert!(!RegId(0x6020_0000_0011_0000).is_identification());
    }

    #[test]
    fn accelerator_hints() {
        assert!(RegId(KVM_REG_ARM_PSCI_VERSION).is_firmware());
        assert!(RegId(KVM_REG_ARM_VENDOR_HYP_BMAP_2).is_firmware());
        assert!(!RegId(0x6030_0000_0013_c103).is_firmware());
        assert_eq!(RegId(0x6030_0000_0013_c103).coproc(), 0x13);
        assert_eq!(RegId(0x6020_0000_0011_0000).size_bytes(), Some(4));
        assert_eq!(RegId(0x6030_0000_0013_c103).size_bytes(), Some(8));
    }

    /// The locally defined constants must agree with the kernel's, as kvm-bindings publishes them.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn constants_match_kvm_bindings() {
        use kvm_bindings as kb;
        assert_eq!(KVM_REG_ARM64, kb::KVM_REG_ARM64);
        assert_eq!(KVM_REG_SIZE_U32, kb::KVM_REG_SIZE_U32);
        assert_eq!(KVM_REG_SIZE_U64, kb::KVM_REG_SIZE_U64);
        assert_eq!(
            KVM_REG_ARM_COPROC_MASK,
            u64::from(kb::KVM_REG_ARM_COPROC_MASK)
        );
        assert_eq!(KVM_REG_ARM_CORE, u64::from(kb::KVM_REG_ARM_CORE));
        assert_eq!(KVM_REG_ARM_DEMUX, u64::from(kb::KVM_REG_ARM_DEMUX));
        assert_eq!(KVM_REG_ARM64_SYSREG, u64::from(kb::KVM_REG_ARM64_SYSREG));
        assert_eq!(KVM_REG_ARM_FW, u64::from(kb::KVM_REG_ARM_FW));
        assert_eq!(KVM_REG_ARM64_SVE, u64::from(kb::KVM_REG_ARM64_SVE));
        assert_eq!(
            KVM_REG_ARM_FW_FEAT_BMAP,
            u64::from(kb::KVM_REG_ARM_FW_FEAT_BMAP)
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_OP0_MASK,
            u64::from(kb::KVM_REG_ARM64_SYSREG_OP0_MASK)
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_OP1_MASK,
            u64::from(kb::KVM_REG_ARM64_SYSREG_OP1_MASK)
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_CRN_MASK,
            u64::from(kb::KVM_REG_ARM64_SYSREG_CRN_MASK)
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_CRM_MASK,
            u64::from(kb::KVM_REG_ARM64_SYSREG_CRM_MASK)
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_OP2_MASK,
            u64::from(kb::KVM_REG_ARM64_SYSREG_OP2_MASK)
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_OP0_SHIFT,
            kb::KVM_REG_ARM64_SYSREG_OP0_SHIFT
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_OP1_SHIFT,
            kb::KVM_REG_ARM64_SYSREG_OP1_SHIFT
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_CRN_SHIFT,
            kb::KVM_REG_ARM64_SYSREG_CRN_SHIFT
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_CRM_SHIFT,
            kb::KVM_REG_ARM64_SYSREG_CRM_SHIFT
        );
        assert_eq!(
            KVM_REG_ARM64_SYSREG_OP2_SHIFT,
            kb::KVM_REG_ARM64_SYSREG_OP2_SHIFT
        );
        // The firmware ids are C macros (KVM_REG_ARM_FW_REG(r)) bindgen does not export: check
        // their parts.
        let fw = kb::KVM_REG_ARM64 | kb::KVM_REG_SIZE_U64 | u64::from(kb::KVM_REG_ARM_FW);
        let bmap =
            kb::KVM_REG_ARM64 | kb::KVM_REG_SIZE_U64 | u64::from(kb::KVM_REG_ARM_FW_FEAT_BMAP);
        assert_eq!(KVM_REG_ARM_PSCI_VERSION, fw);
        assert_eq!(KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1, fw | 1);
        assert_eq!(KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2, fw | 2);
        assert_eq!(KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3, fw | 3);
        assert_eq!(KVM_REG_ARM_STD_BMAP, bmap);
        assert_eq!(KVM_REG_ARM_VENDOR_HYP_BMAP_2, bmap | 3);
        assert_eq!(KVM_REG_ARCH_MASK, kb::KVM_REG_ARCH_MASK as u64);
        assert_eq!(KVM_REG_ARM, kb::KVM_REG_ARM);
        assert_eq!(KVM_REG_SIZE_MASK, kb::KVM_REG_SIZE_MASK);
        assert_eq!(KVM_REG_SIZE_SHIFT, kb::KVM_REG_SIZE_SHIFT);
        assert_eq!(KVM_REG_ARM_COPROC_SHIFT, kb::KVM_REG_ARM_COPROC_SHIFT);
    }
}
