//! `profile capture --from-kvm` on aarch64 hosts: one scratch VM with one vCPU configured like
//! QEMU's `-cpu host` default, its `KVM_GET_REG_LIST` filtered as QEMU filters it, and every
//! register read with `KVM_GET_ONE_REG`.
//!
//! Compile-checked in CI (`cargo check -p migproxy-config --target aarch64-unknown-linux-gnu`) and
//! run for real inside the KVM lab's emulated hosts (kernels 6.1, 6.12, 7.3; see
//! `integration-tests/tests/kvm_lab.rs`), not on physical aarch64 hardware. Limits, said plainly:
//! - the vCPU gets the features QEMU enables by default for `-cpu host` when KVM offers them
//!   (PSCI 0.2, PMUv3, SVE at the default vector length, pointer authentication); a destination
//!   started with other `-cpu` properties needs a `--from-qmp` capture instead;
//! - one vCPU is captured (`vcpus: 1`), so per-vCPU registers (MPIDR_EL1) are known for vCPU 0
//!   only; the rewrite then does not compare them for other vCPUs and says so;
//! - the writable ID-register masks (`KVM_ARM_GET_REG_WRITABLE_MASKS`, see `writable_masks`) are
//!   recorded when the kernel offers them (Linux 6.7+); without them ID-register mismatches warn
//!   (DESIGN.md, "Rewriting"), with them they refuse for bits outside the masks.

use kvm_bindings::RegList;
use kvm_bindings::{
    kvm_vcpu_init, KVM_ARM_VCPU_PMU_V3, KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VCPU_PTRAUTH_ADDRESS,
    KVM_ARM_VCPU_PTRAUTH_GENERIC, KVM_ARM_VCPU_SVE,
};
use kvm_ioctls::{Cap, Kvm};

use super::{cpreg_list_from_kvm, record_writable_masks, writable_masks};
use crate::error::ConfigError;
use crate::profile::{Accel, Profile};

/// The most indices a kvm-bindings `RegList` holds (its `ARM64_REGS_MAX`); the kernels of the
/// KVM lab list about 320-340 (cpreg list plus core registers) without SVE.
const MAX_REGS: usize = 500;

fn kvm_err(what: &str, e: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid(format!("--from-kvm: {what}: {e}"))
}

pub fn capture() -> Result<Profile, ConfigError> {
    let kvm = Kvm::new().map_err(|e| kvm_err("open /dev/kvm", e))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| kvm_err("create a scratch vm", e))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| kvm_err("create a scratch vcpu", e))?;
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)
        .map_err(|e| kvm_err("KVM_ARM_PREFERRED_TARGET", e))?;
    let mut feature = |bit: u32| {
        if let Some(word) = init
            .features
            .get_mut(usize::try_from(bit / 32).unwrap_or(0))
        {
            *word |= 1 << (bit % 32);
        }
    };
    // The features QEMU's kvm_arm_vcpu_init() asks for with `-cpu host` defaults.
    feature(KVM_ARM_VCPU_PSCI_0_2);
    if vm.check_extension(Cap::ArmPmuV3) {
        feature(KVM_ARM_VCPU_PMU_V3);
    }
    let sve = vm.check_extension(Cap::ArmSve);
    if sve {
        feature(KVM_ARM_VCPU_SVE);
    }
    if vm.check_extension(Cap::ArmPtrAuthAddress) && vm.check_extension(Cap::ArmPtrAuthGeneric) {
        feature(KVM_ARM_VCPU_PTRAUTH_ADDRESS);
        feature(KVM_ARM_VCPU_PTRAUTH_GENERIC);
    }
    vcpu.vcpu_init(&init)
        .map_err(|e| kvm_err("KVM_ARM_VCPU_INIT", e))?;
    if sve {
        // SVE registers appear in the list (and ID_AA64ZFR0_EL1 gets its value) only once the
        // vector lengths are finalized, as QEMU does before building its list.
        let what = i32::try_from(KVM_ARM_VCPU_SVE).unwrap_or(4);
        vcpu.vcpu_finalize(&what)
            .map_err(|e| kvm_err("KVM_ARM_VCPU_FINALIZE(SVE)", e))?;
    }

    let raw = reg_list(&vcpu)?;
    let mut registers = Vec::new();
    for id in cpreg_list_from_kvm(&raw) {
        let mut value = [0u8; 8];
        let size = vcpu
            .get_one_reg(id.0, &mut value)
            .map_err(|e| kvm_err(&format!("KVM_GET_ONE_REG {id}"), e))?;
        // 32-bit registers are zero-extended, as QEMU stores them in its 64-bit list.
        let v = match size {
            4 => u64::from(u32::from_le_bytes([value[0], value[1], value[2], value[3]])),
            _ => u64::from_le_bytes(value),
        };
        registers.push((id.0, v));
    }
    let mut profile = Profile::from_vcpus(Accel::Kvm, &[(0, registers)])?;
    let masks = match writable_masks::read(&vm)? {
        Some(masks) => format!(
            "writable masks for {} id registers",
            record_writable_masks(&mut profile, &masks)
        ),
        None => "no writable masks (KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES absent)".to_owned(),
    };
    profile.captured_from = Some(format!(
        "kvm (KVM_GET_REG_LIST of a scratch vcpu, target {}, features {:#x}; {masks})",
        init.target,
        init.features.first().copied().unwrap_or(0)
    ));
    Ok(profile)
}

/// `KVM_GET_REG_LIST`: first asked with room for none, which makes the kernel answer E2BIG and
/// write how many indices it has into the header, then asked again with exactly that room.
/// (kvm-bindings caps a `RegList` at 500 entries, so a fixed larger first guess fails before the
/// ioctl is even made; that is what the first run on a real kernel showed.)
fn reg_list(vcpu: &kvm_ioctls::VcpuFd) -> Result<Vec<u64>, ConfigError> {
    let mut probe = RegList::new(0).map_err(|e| kvm_err("allocate the reg list", e))?;
    match vcpu.get_reg_list(&mut probe) {
        Ok(()) => return Ok(Vec::new()),
        Err(e) if e.errno() == libc_e2big() => {}
        Err(e) => return Err(kvm_err("KVM_GET_REG_LIST (size)", e)),
    }
    let needed = usize::try_from(probe.as_fam_struct_ref().n)
        .map_err(|e| kvm_err("KVM_GET_REG_LIST size", e))?;
    if needed > MAX_REGS {
        return Err(kvm_err(
            "KVM_GET_REG_LIST",
            format!("the kernel lists {needed} registers, more than the {MAX_REGS} kvm-bindings can hold"),
        ));
    }
    let mut list = RegList::new(needed).map_err(|e| kvm_err("allocate the reg list", e))?;
    vcpu.get_reg_list(&mut list)
        .map_err(|e| kvm_err("KVM_GET_REG_LIST", e))?;
    Ok(list.as_slice().to_vec())
}

/// E2BIG, without a libc dependency for one constant.
const fn libc_e2big() -> i32 {
    7
}
