// `deny`, not the workspace's `forbid`: kvm/writable_masks.rs (aarch64 only) allows it for the one
// KVM ioctl kvm-ioctls does not wrap; `forbid` here would make that allow an error. See Cargo.toml.
#![deny(unsafe_code)]
//! Destination register profiles, rewrite policies and the pure cpreg rewrite.
//!
//! - [`RegId`]: a KVM-format ARM register index with names (`regid`, `regnames`);
//! - [`Profile`]: what one destination's vCPUs hold after reset (`profile`);
//! - [`Policy`] and [`rewrite`]: the rewrite rules (DESIGN.md, "Rewriting") as one pure function
//!   (`policy`, `rewrite`);
//! - [`subsections`]: which `cpu` subsections each QEMU build loads, removal and refusal;
//! - [`kvm`]: the filter QEMU applies to `KVM_GET_REG_LIST`, and the aarch64-only capture.

pub mod digest;
mod error;
pub mod file;
pub mod kvm;
mod policy;
mod profile;
pub mod regid;
mod regnames;
mod rewrite;
pub mod subsections;

pub use error::ConfigError;
pub use policy::{FillMissing, OnExtra, OnIdMismatch, Policy};
pub use profile::{
    Accel, DropRule, DropRuleKind, Profile, ProfileRegister, ValueCondition, PROFILE_FORMAT_VERSION,
};
pub use regid::RegId;
pub use regnames::reg_name;
pub use rewrite::{
    destination_kernel_note, rewrite, DropReason, Dropped, Filled, IdAction, IdMismatch, KvmDrop,
    KvmRefusal, Refusal, RefusalDigest, RefusalReason, Rewrite, RewritePlan, RewriteReport,
};
pub use subsections::{check_subsections, SourceSubsection, SubsectionReport};
