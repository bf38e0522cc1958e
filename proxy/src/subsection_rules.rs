//! The `cpu` subsections of a held device-state phase against the destination: decide per vCPU
//! (`migproxy_config::check_subsections`, pure), then remove what may go. Shared by the daemon,
//! `rewrite` and `plan`, so all three do the same.

use migproxy_codec::{CpuSubsection, DeviceState};
use migproxy_config::{check_subsections, Profile, SourceSubsection, SubsectionReport};

use crate::error::ProxyError;

/// One report per vCPU that has a subsection to remove or refuse, in instance order.
pub fn decide(subsections: &[CpuSubsection], dest: &Profile) -> Vec<SubsectionReport> {
    let mut instances: Vec<u32> = subsections.iter().map(|s| s.instance).collect();
    instances.dedup();
    instances
        .into_iter()
        .map(|instance| {
            let of_vcpu: Vec<SourceSubsection<'_>> = subsections
                .iter()
                .filter(|s| s.instance == instance)
                .map(|s| SourceSubsection {
                    name: &s.name,
                    nested: &s.nested,
                    payload: &s.payload,
                })
                .collect();
            check_subsections(instance, &of_vcpu, dest)
        })
        .filter(|report| !report.removed.is_empty() || report.is_refused())
        .collect()
}

/// Refuse (naming every subsection) or remove what the reports allow, before a byte of this
/// device state reaches the destination.
pub fn apply(state: &mut DeviceState, dest: &Profile) -> Result<Vec<SubsectionReport>, ProxyError> {
    let reports = decide(&state.cpu_subsections(), dest);
    let refused: Vec<String> = reports
        .iter()
        .filter(|r| r.is_refused())
        .map(SubsectionReport::refusal_summary)
        .collect();
    if !refused.is_empty() {
        return Err(ProxyError::Refused(refused.join(" | ")));
    }
    for report in &reports {
        for removed in &report.removed {
            state
                .remove_cpu_subsection(report.vcpu, &removed.name)
                .map_err(ProxyError::Decode)?;
        }
    }
    Ok(reports)
}
