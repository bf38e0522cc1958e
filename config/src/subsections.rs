//! Which subsections of the `cpu` section a destination QEMU build can load, and what to do with
//! one it cannot: remove it when no guest state is lost, otherwise refuse naming it.
//!
//! A fresh VM's stream cannot tell: QEMU sends a subsection only when its `needed` function says
//! so, so a never-started destination shows a subset of what it could load. The lists therefore
//! come from each build's own vmstate definitions (`vmstate_arm_cpu` and its `.subsections` in
//! QEMU's `target/arm/machine.c`, checked against the names compiled into the Debian binaries),
//! keyed by the destination profile's `qemu_version`. How to add a version is in
//! `docs/profiles.md` ("Subsections").
//!
//! One subsection has a removal rule: `cpu/wfxt-timer` (one `VMSTATE_TIMER_PTR`, the FEAT_WFxT
//! timer's expiry in ns, or -1 when the timer is not pending). QEMU 11.1 sends it for every TCG CPU;
//! 10.0 creates that timer only for CPUs with FEAT_WFxT and loads the subsection into a NULL
//! timer otherwise (an assertion in `vmstate_load_state`), 7.2 does not know it. A timer that is
//! not armed carries no state: the destination's own timer is idle after reset too, so removing
//! the subsection loses nothing. An armed timer would be lost: refused.

use std::fmt;

use crate::digest::{self, Grouped};
use crate::profile::{Accel, Profile};
use crate::regid::RegId;

/// The FEAT_WFxT timer's subsection.
pub const WFXT_TIMER: &str = "cpu/wfxt-timer";
/// What QEMU's `timer_put` writes for a timer that is not pending (`timer_expire_time_ns` = -1).
const TIMER_NOT_PENDING: u64 = u64::MAX;
/// ID_AA64ISAR2_EL1, whose WFxT field (bits 3:0) is 2 when FEAT_WFxT is implemented.
const ID_AA64ISAR2_EL1: RegId = RegId(0x6030_0000_0013_c032);

/// When a build can load `cpu/wfxt-timer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WfxtTimer {
    /// The build does not know the subsection.
    Unknown,
    /// Only into a CPU that implements FEAT_WFxT (the timer exists only there).
    WithFeatWfxt,
    /// Into every TCG CPU (the timer always exists).
    Always,
}

/// One QEMU release series' `cpu` vmstate.
#[derive(Debug)]
pub struct CpuVmstate {
    /// `major.minor` as `query-version` reports it.
    pub series: &'static str,
    /// Every subsection name (top level and nested) the build defines, `cpu/wfxt-timer` excepted.
    pub subsections: &'static [&'static str],
    pub wfxt_timer: WfxtTimer,
}

const M_PROFILE: [&str; 9] = [
    "cpu/m",
    "cpu/m/faultmask-primask",
    "cpu/m/csselr",
    "cpu/m/scr",
    "cpu/m/other-sp",
    "cpu/m/v8m",
    "cpu/m/fp",
    "cpu/m/mve",
    "cpu/m-security",
];

/// The builds migproxy knows, oldest first.
pub const CPU_VMSTATES: &[CpuVmstate] = &[
    CpuVmstate {
        series: "7.2",
        subsections: &[
            "cpu/vfp",
            "cpu/iwmmxt",
            "cpu/sve",
            "cpu/sme",
            "cpu/serror",
            "cpu/irq-line-state",
            M_PROFILE[0],
            M_PROFILE[1],
            M_PROFILE[2],
            M_PROFILE[3],
            M_PROFILE[4],
            M_PROFILE[5],
            M_PROFILE[6],
            M_PROFILE[7],
            M_PROFILE[8],
            "cpu/thumb2ee",
            "cpu/pmsav7",
            "cpu/pmsav7-rnr",
            "cpu/pmsav8",
        ],
        wfxt_timer: WfxtTimer::Unknown,
    },
    CpuVmstate {
        series: "10.0",
        subsections: &[
            "cpu/vfp",
            "cpu/vfp/fpcr_fpsr",
            "cpu/iwmmxt",
            "cpu/sve",
            "cpu/sme",
            "cpu/serror",
            "cpu/irq-line-state",
            M_PROFILE[0],
            M_PROFILE[1],
            M_PROFILE[2],
            M_PROFILE[3],
            M_PROFILE[4],
            M_PROFILE[5],
            M_PROFILE[6],
            M_PROFILE[7],
            M_PROFILE[8],
            "cpu/thumb2ee",
            "cpu/pmsav7",
            "cpu/pmsav7-rnr",
            "cpu/pmsav8",
            "cpu/pmsav8/pmsav8r",
        ],
        wfxt_timer: WfxtTimer::WithFeatWfxt,
    },
    CpuVmstate {
        series: "11.1",
        subsections: &[
            "cpu/vfp",
            "cpu/vfp/fpcr_fpsr",
            "cpu/sve",
            "cpu/sme",
            "cpu/zt0",
            "cpu/fpmr",
            "cpu/serror",
            "cpu/irq-line-state",
            "cpu/event",
            "cpu/pstate64",
            "cpu/syndrome64",
            M_PROFILE[0],
            M_PROFILE[1],
            M_PROFILE[2],
            M_PROFILE[3],
            M_PROFILE[4],
            M_PROFILE[5],
            M_PROFILE[6],
            M_PROFILE[7],
            M_PROFILE[8],
            "cpu/thumb2ee",
            "cpu/pmsav7",
            "cpu/pmsav7-rnr",
            "cpu/pmsav8",
            "cpu/pmsav8/pmsav8r",
        ],
        wfxt_timer: WfxtTimer::Always,
    },
];

/// The table entry for a `qemu_version` such as `11.1.3` (`None`: not a known series).
pub fn cpu_vmstate_for(qemu_version: &str) -> Option<&'static CpuVmstate> {
    let mut parts = qemu_version.trim().split('.');
    let series = format!("{}.{}", parts.next()?, parts.next()?);
    CPU_VMSTATES.iter().find(|v| v.series == series)
}

/// What the destination can load, as decided from its profile.
#[derive(Debug, Clone, Copy)]
enum Destination {
    Known(&'static CpuVmstate),
    /// No `qemu_version`, or a series not in the table: only what every known build loads passes.
    Unknown,
}

impl Destination {
    fn of(dest: &Profile) -> Destination {
        dest.qemu_version
            .as_deref()
            .and_then(cpu_vmstate_for)
            .map_or(Destination::Unknown, Destination::Known)
    }

    fn knows(self, name: &str) -> bool {
        match self {
            Destination::Known(v) => v.subsections.contains(&name),
            Destination::Unknown => CPU_VMSTATES.iter().all(|v| v.subsections.contains(&name)),
        }
    }

    fn describe(self, dest: &Profile) -> String {
        match (self, dest.qemu_version.as_deref()) {
            (Destination::Known(v), _) => format!("QEMU {}", v.series),
            (Destination::Unknown, Some(version)) => format!(
                "QEMU {version} (a series migproxy has no subsection list for: only subsections \
                 every known build loads pass)"
            ),
            (Destination::Unknown, None) => "a destination whose profile has no qemu_version \
                 (only subsections every known build loads pass)"
                .to_owned(),
        }
    }
}

/// One top-level `cpu` subsection of the source stream.
#[derive(Debug, Clone, Copy)]
pub struct SourceSubsection<'a> {
    pub name: &'a str,
    /// Subsections nested in it.
    pub nested: &'a [String],
    /// Its fields' bytes as received.
    pub payload: &'a [u8],
}

/// A subsection taken out of the stream, and why that loses nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedSubsection {
    pub name: String,
    pub reason: String,
}

/// A subsection the destination cannot load and migproxy cannot remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedSubsection {
    pub name: String,
    pub reason: String,
}

/// What happens to one vCPU's subsections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubsectionReport {
    pub vcpu: u32,
    pub removed: Vec<RemovedSubsection>,
    pub refused: Vec<RefusedSubsection>,
}

impl SubsectionReport {
    pub fn is_refused(&self) -> bool {
        !self.refused.is_empty()
    }

    /// One line naming every refused subsection of this vCPU.
    pub fn refusal_summary(&self) -> String {
        let names: Vec<String> = self
            .refused
            .iter()
            .map(|r| format!("{} ({})", r.name, r.reason))
            .collect();
        format!(
            "vcpu {}: the destination cannot load subsection {}",
            self.vcpu,
            names.join(", ")
        )
    }
}

/// The refusals of many vCPUs' subsections in a bounded number of lines: vCPUs refused for the
/// same subsections share one (see [`crate::digest`]).
pub fn refusal_summaries<'a>(
    reports: impl IntoIterator<Item = &'a SubsectionReport>,
) -> Vec<String> {
    let mut grouped: Grouped<Vec<RefusedSubsection>> = Grouped::default();
    for report in reports.into_iter().filter(|r| r.is_refused()) {
        grouped.add_borrowed(report.vcpu, report.refused.as_slice());
    }
    grouped.lines(
        |refused| {
            format!(
                "the destination cannot load subsection {}",
                digest::first_few(refused, |r| format!("{} ({})", r.name, r.reason), ", ", "")
            )
        },
        "vCPUs refused for other subsections",
    )
}

impl fmt::Display for SubsectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vcpu {}: subsections: {} removed, {} refused",
            self.vcpu,
            self.removed.len(),
            self.refused.len()
        )?;
        for r in &self.refused {
            write!(f, "\n  REFUSE subsection {}: {}", r.name, r.reason)?;
        }
        for r in &self.removed {
            write!(f, "\n  remove subsection {}: {}", r.name, r.reason)?;
        }
        Ok(())
    }
}

/// Decide, for one vCPU, which of its `cpu` subsections the destination described by `dest`
/// cannot load, and whether each can be removed without losing guest state.
pub fn check_subsections(
    vcpu: u32,
    subsections: &[SourceSubsection<'_>],
    dest: &Profile,
) -> SubsectionReport {
    let destination = Destination::of(dest);
    let mut report = SubsectionReport {
        vcpu,
        ..SubsectionReport::default()
    };
    for sub in subsections {
        if sub.name == WFXT_TIMER {
            wfxt_timer(vcpu, sub, dest, destination, &mut report);
            continue;
        }
        let unknown: Vec<&str> = std::iter::once(sub.name)
            .chain(sub.nested.iter().map(String::as_str))
            .filter(|name| !destination.knows(name))
            .collect();
        if !unknown.is_empty() {
            report.refused.push(RefusedSubsection {
                name: sub.name.to_owned(),
                reason: format!(
                    "{} does not know {}; removing it would lose guest state",
                    destination.describe(dest),
                    unknown.join(", ")
                ),
            });
        }
    }
    report
}

fn wfxt_timer(
    vcpu: u32,
    sub: &SourceSubsection<'_>,
    dest: &Profile,
    destination: Destination,
    report: &mut SubsectionReport,
) {
    let loadable = match destination {
        // QEMU creates the timer only for TCG vCPUs; under KVM the pointer stays NULL.
        _ if dest.accel == Accel::Kvm => false,
        Destination::Known(v) => match v.wfxt_timer {
            WfxtTimer::Always => true,
            WfxtTimer::WithFeatWfxt => has_feat_wfxt(dest, vcpu),
            WfxtTimer::Unknown => false,
        },
        // A build whose CPU model advertises FEAT_WFxT implements its timer (every known one
        // does), so a destination profile saying so loads it whatever its version.
        Destination::Unknown => has_feat_wfxt(dest, vcpu),
    };
    if loadable {
        return;
    }
    let why_not = match destination {
        _ if dest.accel == Accel::Kvm => {
            "QEMU creates no FEAT_WFxT timer for a KVM vCPU (it would load into a missing timer)"
                .to_owned()
        }
        Destination::Known(v) if v.wfxt_timer == WfxtTimer::WithFeatWfxt => format!(
            "QEMU {} creates this timer only for CPUs with FEAT_WFxT and the destination's \
             ID_AA64ISAR2_EL1 has none (it would load into a missing timer)",
            v.series
        ),
        _ => format!("{} does not know it", destination.describe(dest)),
    };
    let expiry = match <[u8; 8]>::try_from(sub.payload) {
        Ok(bytes) => u64::from_be_bytes(bytes),
        Err(_) => {
            report.refused.push(RefusedSubsection {
                name: sub.name.to_owned(),
                reason: format!(
                    "{why_not}, and its payload is {} bytes, not the 8-byte timer expiry",
                    sub.payload.len()
                ),
            });
            return;
        }
    };
    if expiry == TIMER_NOT_PENDING {
        report.removed.push(RemovedSubsection {
            name: sub.name.to_owned(),
            reason: format!("{why_not}; the timer is not armed, so nothing is lost"),
        });
    } else {
        report.refused.push(RefusedSubsection {
            name: sub.name.to_owned(),
            reason: format!(
                "{why_not}, and the timer is armed (expires at {expiry} ns): removing it would \
                 lose the guest's pending WFIT/WFET wake-up"
            ),
        });
    }
}

/// FEAT_WFxT: ID_AA64ISAR2_EL1.WFxT (bits 3:0) is 2. A profile without the register has none.
fn has_feat_wfxt(dest: &Profile, vcpu: u32) -> bool {
    dest.value_for(vcpu, ID_AA64ISAR2_EL1)
        .is_some_and(|isar2| isar2 & 0xf >= 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(version: Option<&str>, isar2: Option<u64>) -> Profile {
        let regs: Vec<(u64, u64)> = isar2.map(|v| (ID_AA64ISAR2_EL1.0, v)).into_iter().collect();
        let mut p = match Profile::from_vcpus(Accel::Tcg, &[(0, regs)]) {
            Ok(p) => p,
            Err(e) => panic!("test profile: {e}"),
        };
        p.qemu_version = version.map(str::to_owned);
        p
    }

    const IDLE: [u8; 8] = [0xff; 8];
    const ARMED: [u8; 8] = 1_234_567_890u64.to_be_bytes();

    fn wfxt(payload: &[u8]) -> SourceSubsection<'_> {
        SourceSubsection {
            name: WFXT_TIMER,
            nested: &[],
            payload,
        }
    }

    #[test]
    fn versions_resolve_by_series() {
        assert_eq!(cpu_vmstate_for("11.1.3").map(|v| v.series), Some("11.1"));
        assert_eq!(cpu_vmstate_for("7.2.22").map(|v| v.series), Some("7.2"));
        assert_eq!(cpu_vmstate_for("10.0.2").map(|v| v.series), Some("10.0"));
        assert!(cpu_vmstate_for("10.1.0").is_none());
        assert!(cpu_vmstate_for("garbage").is_none());
    }

    #[test]
    fn idle_wfxt_timer_is_removed_where_it_cannot_load() {
        for dest in [
            profile(Some("7.2.22"), None),
            profile(Some("10.0.2"), Some(0x0)),
            profile(None, None),
            profile(Some("10.1.0"), Some(0x0)),
        ] {
            let report = check_subsections(1, &[wfxt(&IDLE)], &dest);
            assert!(!report.is_refused(), "{report}");
            assert_eq!(report.removed.len(), 1, "{report}");
            assert_eq!(report.removed[0].name, WFXT_TIMER);
        }
        let mut kvm = profile(Some("11.1.3"), Some(0x2));
        kvm.accel = Accel::Kvm;
        let report = check_subsections(0, &[wfxt(&IDLE)], &kvm);
        assert_eq!(report.removed.len(), 1, "{report}");
    }

    #[test]
    fn wfxt_timer_is_kept_where_it_loads() {
        for dest in [
            profile(Some("11.1.3"), None),
            profile(Some("10.0.2"), Some(0x12)),
            profile(None, Some(0x2)),
            profile(Some("10.1.0"), Some(0x2)),
        ] {
            let report = check_subsections(0, &[wfxt(&ARMED)], &dest);
            assert_eq!(report, SubsectionReport::default(), "{report}");
        }
    }

    #[test]
    fn armed_or_malformed_wfxt_timer_is_refused_by_name() {
        let dest = profile(Some("10.0.2"), Some(0x1));
        let report = check_subsections(0, &[wfxt(&ARMED)], &dest);
        assert!(report.is_refused());
        let summary = report.refusal_summary();
        assert!(summary.contains("cpu/wfxt-timer"), "{summary}");
        assert!(
            summary.contains("armed (expires at 1234567890 ns)"),
            "{summary}"
        );
        let report = check_subsections(0, &[wfxt(&IDLE[..4])], &dest);
        assert!(report.refusal_summary().contains("4 bytes"), "{report}");
    }

    #[test]
    fn the_same_refusal_on_every_vcpu_is_summarised_once() {
        let dest = profile(Some("10.0.2"), Some(0x1));
        let reports: Vec<SubsectionReport> = (0..512)
            .map(|vcpu| check_subsections(vcpu, &[wfxt(&ARMED)], &dest))
            .collect();
        let lines = refusal_summaries(&reports);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(
                "vcpu 0-511 (512 vcpus): the destination cannot load subsection cpu/wfxt-timer"
            ),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn unknown_subsections_are_refused_by_name() {
        let nested = vec!["cpu/vfp/fpcr_fpsr".to_owned()];
        let subs = [
            SourceSubsection {
                name: "cpu/fpmr",
                nested: &[],
                payload: &[0; 8],
            },
            SourceSubsection {
                name: "cpu/vfp",
                nested: &nested,
                payload: &[0; 4],
            },
            SourceSubsection {
                name: "cpu/irq-line-state",
                nested: &[],
                payload: &[0; 4],
            },
        ];
        let to_10 = check_subsections(0, &subs, &profile(Some("10.0.2"), None));
        assert_eq!(
            to_10
                .refused
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["cpu/fpmr"]
        );
        let to_72 = check_subsections(0, &subs, &profile(Some("7.2.22"), None));
        assert_eq!(
            to_72
                .refused
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["cpu/fpmr", "cpu/vfp"]
        );
        assert!(to_72.refused[1].reason.contains("cpu/vfp/fpcr_fpsr"));
        let to_111 = check_subsections(0, &subs, &profile(Some("11.1.3"), None));
        assert!(!to_111.is_refused(), "{to_111}");
    }
}
