//! What a rewriting proxy does with a postcopy-capable migration (DESIGN.md, "Postcopy";
//! docs/postcopy.md).
//!
//! `POSTCOPY_ADVISE` comes at the start of every migration with the `postcopy-ram` capability,
//! whether or not the operator ever switches, so it does not end a migration by itself. What it
//! decides is whether a refusal after a switch could still be undone:
//!
//! - a source QEMU >= 10.2 with a return path waits in `postcopy-device` for the destination to
//!   confirm the package (`PING 0x42`) and resumes its guest when the connection closes first, so
//!   a package that cannot go through is refused at the package;
//! - an older source (7.2, 10.0, or a version the source profile does not state) ends in
//!   `postcopy-paused` with its guest stopped and no way back once the switch has begun: by
//!   default the migration is refused at ADVISE, while the source still runs the guest, and
//!   `--unrecoverable-postcopy allow` lets it go on, saying so in the log and the summary, after
//!   refusing there what the profiles alone would refuse in the package.
//!
//! The package is rewritten with the source's reference description (`source_reference.rs`),
//! walked by the codec (`PackageDeviceState`).

use std::fmt;

use migproxy_config::Profile;

use crate::migration::profile_source::RewriteSetup;

pub use crate::cli::UnrecoverablePostcopy;

/// The first QEMU release whose source takes its guest back after a failed postcopy switch
/// (the `postcopy-device` state).
const RECOVERING_SOURCE: (u64, u64) = (10, 2);

/// `PING 0x42` (QEMU_VM_PING_PACKAGED_LOADED) then `RUN`: how a package of a source that waits
/// for the destination's confirmation ends (`08 0002 0004 00000042`, `08 0005 0000`).
const PACKAGE_END_WITH_LOADED_PING: [u8; 14] = [
    0x08, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x42, 0x08, 0x00, 0x05, 0x00, 0x00,
];

/// Whether the source could take its guest back if the proxy closed after a switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchRecovery {
    /// QEMU >= 10.2 with a return path.
    SourceResumes,
    /// Why not: the source's version or the missing return path.
    GuestLost(String),
}

impl SwitchRecovery {
    /// Decided at ADVISE from the source profile's `qemu_version` and whether the source opened a
    /// return path (QEMU sends `OPEN_RETURN_PATH` before `POSTCOPY_ADVISE`).
    pub fn at_advise(source: Option<&Profile>, return_path: bool) -> SwitchRecovery {
        let Some(profile) = source else {
            return SwitchRecovery::GuestLost(
                "no source profile, so the source's QEMU version is unknown".into(),
            );
        };
        let Some(version) = profile.qemu_version.as_deref() else {
            return SwitchRecovery::GuestLost("the source profile has no qemu_version".into());
        };
        match major_minor(version) {
            Some(found) if found >= RECOVERING_SOURCE => {
                if return_path {
                    SwitchRecovery::SourceResumes
                } else {
                    SwitchRecovery::GuestLost(format!(
                        "source QEMU {version} without a return path"
                    ))
                }
            }
            Some(_) => SwitchRecovery::GuestLost(format!(
                "source QEMU {version} (older than {}.{} has no postcopy-device state)",
                RECOVERING_SOURCE.0, RECOVERING_SOURCE.1
            )),
            None => SwitchRecovery::GuestLost(format!(
                "the source profile's qemu_version {version:?} is not MAJOR.MINOR[.MICRO]"
            )),
        }
    }

    /// The summary's `postcopy` value.
    pub fn summary_word(&self) -> &'static str {
        match self {
            SwitchRecovery::SourceResumes => "recoverable",
            SwitchRecovery::GuestLost(_) => "unrecoverable",
        }
    }
}

impl fmt::Display for SwitchRecovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchRecovery::SourceResumes => f.write_str(
                "the source (QEMU >= 10.2 with a return path) resumes its guest if a switch is refused",
            ),
            SwitchRecovery::GuestLost(why) => write!(
                f,
                "a refusal after a switch to postcopy would leave the guest stopped at the source: {why}"
            ),
        }
    }
}

/// Refusals that depend only on the profiles: the source profile's registers (every vCPU it
/// lists) rewritten against the destination's now, at ADVISE, so that an older source learns of
/// them while it still owns the guest. What depends on guest values can still refuse later.
pub fn profile_refusal(setup: &RewriteSetup) -> Option<String> {
    let source = setup.source.as_deref()?;
    let vcpus = source
        .entries()
        .iter()
        .filter_map(|entry| entry.per_vcpu.as_ref().map(Vec::len))
        .max()
        .unwrap_or(1)
        .max(1);
    (0..vcpus).find_map(|vcpu| {
        let vcpu = u32::try_from(vcpu).ok()?;
        let registers = source.registers_for_vcpu(vcpu);
        let result =
            migproxy_config::rewrite(vcpu, &registers, &setup.dest, Some(source), &setup.policy);
        result
            .report
            .is_refused()
            .then(|| result.report.refusal_summary())
    })
}

/// Whether a package (the bytes after its 9-byte command header) ends the way a source that
/// waits for the destination's confirmation ends it.
pub fn package_waits_for_destination(blob: &[u8]) -> bool {
    blob.ends_with(&PACKAGE_END_WITH_LOADED_PING)
}

/// `MAJOR.MINOR` of a version such as `10.0.7` or `11.1.0`.
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use migproxy_config::Accel;

    use super::*;

    fn profile(version: Option<&str>) -> Profile {
        let registers = vec![(0x6030_0000_0013_c080, 0x30d0_0980)];
        let mut profile = Profile::from_vcpus(Accel::Tcg, &[(0, registers)])
            .unwrap_or_else(|e| panic!("profile: {e}"));
        profile.qemu_version = version.map(str::to_owned);
        profile
    }

    #[test]
    fn only_a_source_of_10_2_or_later_with_a_return_path_resumes() {
        for (version, return_path, resumes) in [
            (Some("11.1.0"), true, true),
            (Some("10.2.0"), true, true),
            (Some("12.0"), true, true),
            (Some("11.1.0"), false, false),
            (Some("10.1.3"), true, false),
            (Some("10.0.7"), true, false),
            (Some("7.2.19"), true, false),
            (Some("ten"), true, false),
            (None, true, false),
        ] {
            let decided = SwitchRecovery::at_advise(Some(&profile(version)), return_path);
            assert_eq!(
                decided == SwitchRecovery::SourceResumes,
                resumes,
                "{version:?} return path {return_path}: {decided}"
            );
        }
    }

    #[test]
    fn without_a_source_profile_the_source_counts_as_older() {
        let decided = SwitchRecovery::at_advise(None, true);
        assert_eq!(decided.summary_word(), "unrecoverable");
        assert!(
            decided.to_string().contains("no source profile"),
            "{decided}"
        );
    }

    #[test]
    fn the_reason_names_the_version() {
        let decided = SwitchRecovery::at_advise(Some(&profile(Some("10.0.7"))), true);
        assert!(decided.to_string().contains("10.0.7"), "{decided}");
    }

    #[test]
    fn a_package_ending_in_ping_0x42_then_run_waits_for_the_destination() {
        let mut blob = vec![0x08, 0x00, 0x04, 0x00, 0x00];
        blob.extend_from_slice(&[0x08, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x03]);
        assert!(!package_waits_for_destination(&blob));
        blob.extend_from_slice(&PACKAGE_END_WITH_LOADED_PING);
        assert!(package_waits_for_destination(&blob));
        assert!(!package_waits_for_destination(&[]));
    }
}
