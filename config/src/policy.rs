//! The rewrite policy: the operator's answers to "may this register go?", "fill the gaps?" and
//! "what if an identification register differs?" (the flags of `migproxy plan`, `rewrite` and
//! `run`; the rules in DESIGN.md, "Rewriting").

use crate::regid::RegId;

/// Registers the source has and the destination lacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnExtra {
    /// Drop only when the value is 0 or equals the source profile's default ("unused since
    /// reset"); otherwise refuse. Profile rules may tighten or widen this per register.
    #[default]
    DropUnused,
    /// Drop whatever the value (profile rules that forbid a drop still apply).
    Drop,
    /// Refuse any register the destination lacks (except those named by `--allow-drop`).
    Refuse,
}

/// Registers the destination has and the source lacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FillMissing {
    /// Fill with the destination default when the destination profile is TCG (TCG QEMU does not
    /// keep reset values for registers missing from the stream), leave out under KVM (the kernel
    /// keeps its own reset value; a captured value could be stale).
    #[default]
    Auto,
    Always,
    Never,
}

/// An identification register whose value differs between source and destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnIdMismatch {
    /// TCG destination: refuse (ID registers are constants there). KVM destination: refuse for
    /// bits outside the profile's writable masks when it carries them, warn otherwise.
    #[default]
    Auto,
    Refuse,
    Warn,
    /// Replace the source value with the destination's: changes what a running guest sees.
    UseDestination,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub on_extra: OnExtra,
    /// Registers that may be dropped whatever their value (`--allow-drop`).
    pub allow_drop: Vec<RegId>,
    pub fill_missing: FillMissing,
    pub on_id_mismatch: OnIdMismatch,
}
