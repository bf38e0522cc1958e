//! `KVM_ARM_GET_REG_WRITABLE_MASKS` (Linux 6.7+): which bits of each feature-ID register
//! userspace may change, read from a scratch VM for `profile capture --from-kvm`.
//!
//! The only `unsafe` code of the project, allowed here alone (the crate denies it, every other
//! crate forbids it): kvm-ioctls has no wrapper for this ioctl, so it is one raw `ioctl(2)`.
//! Compile-checked for aarch64; it has NOT run on real hardware.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

use kvm_bindings::{
    reg_mask_range, KVM_ARM_FEATURE_ID_RANGE, KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES,
};
use kvm_ioctls::VmFd;

use super::{KVM_ARM_FEATURE_ID_RANGE_SIZE, KVM_ARM_GET_REG_WRITABLE_MASKS, REG_MASK_RANGE_SIZE};
use crate::error::ConfigError;

// The ioctl number encodes the argument size: it must be kvm-bindings' struct, byte for byte.
const _: () = assert!(std::mem::size_of::<reg_mask_range>() == REG_MASK_RANGE_SIZE);

/// The feature-ID range's masks, indexed as [`super::feature_id_space_index`]; `None` when the
/// kernel does not offer them (before Linux 6.7, or without the feature-ID range).
pub fn read(vm: &VmFd) -> Result<Option<Vec<u64>>, ConfigError> {
    // KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES answers a bitmap of the ranges the ioctl accepts;
    // 0 (unknown capability) on kernels without the ioctl.
    let ranges = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES));
    if ranges <= 0 || ranges & (1 << KVM_ARM_FEATURE_ID_RANGE) == 0 {
        return Ok(None);
    }
    let mut masks = vec![0u64; KVM_ARM_FEATURE_ID_RANGE_SIZE];
    let mut range = reg_mask_range {
        // The kernel writes through this address: the array above, alive until the ioctl returns.
        addr: masks.as_mut_ptr() as u64,
        range: KVM_ARM_FEATURE_ID_RANGE,
        // Must be zero, or the kernel answers EINVAL.
        reserved: [0; 13],
    };
    // SAFETY: `vm` is an open KVM VM fd, and KVM_ARM_GET_REG_WRITABLE_MASKS is a VM ioctl taking a
    // `struct reg_mask_range *`, which `range` is (same layout, size checked above). For range 0
    // (KVM_ARM_FEATURE_ID_RANGE) the kernel writes exactly KVM_ARM_FEATURE_ID_RANGE_SIZE u64
    // values, 3*8*8 = 192, 1536 bytes, at `range.addr` (Documentation/virt/kvm/api.rst,
    // "KVM_ARM_GET_REG_WRITABLE_MASKS"; `kvm_vm_ioctl_get_reg_writable_masks()` clears that many
    // and stores each mask at its KVM_ARM_FEATURE_ID_RANGE_IDX() < 192). `masks` holds exactly 192
    // u64, is not moved or resized while the kernel writes, and `range` only borrows it for the
    // duration of the call; the kernel keeps neither pointer after returning.
    let ret = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_ARM_GET_REG_WRITABLE_MASKS,
            &mut range as *mut reg_mask_range,
        )
    };
    if ret < 0 {
        return Err(ConfigError::Invalid(format!(
            "--from-kvm: KVM_ARM_GET_REG_WRITABLE_MASKS: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(Some(masks))
}

#[cfg(test)]
mod tests {
    /// The project's own constants against kvm-bindings (generated from the kernel's uapi).
    #[test]
    fn constants_match_kvm_bindings() {
        assert_eq!(
            usize::try_from(kvm_bindings::KVM_ARM_FEATURE_ID_RANGE_SIZE).ok(),
            Some(super::KVM_ARM_FEATURE_ID_RANGE_SIZE)
        );
        assert_eq!(kvm_bindings::KVM_ARM_FEATURE_ID_RANGE, 0);
        assert_eq!(kvm_bindings::KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES, 230);
        assert_eq!(super::KVM_ARM_GET_REG_WRITABLE_MASKS, 0x8040_aeb6);
    }
}
