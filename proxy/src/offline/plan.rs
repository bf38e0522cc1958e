//! `migproxy plan`: before any migration, what the rewrite would drop, fill and refuse per vCPU,
//! by register name and value. Exit 3 when the migration would be refused.
//!
//! The source is a saved stream (decoded whole, its `cpu` sections taken) or a profile (each of
//! its vCPUs as a fresh VM would send it). The decision is the same pure function the proxy runs
//! (`migproxy_config::rewrite`), so the plan is what the proxy will do.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;

use migproxy_codec::CpuSubsection;
use migproxy_config::{
    destination_kernel_note, rewrite, subsections as subsection_summaries, Profile, RefusalDigest,
    RefusalReason, RewriteReport, SubsectionReport,
};
use serde_json::json;

use crate::cli::policy::policy_from_args;
use crate::cli::PlanArgs;
use crate::error::{ProxyError, Refusal};
use crate::offline::input::{load_profiles, Input};
use crate::offline::report::VcpuReport;
use crate::subsection_rules;

pub fn main(args: &PlanArgs) -> Result<(), ProxyError> {
    let policy = policy_from_args(&args.policy)?;
    let (dest, source_profile) = load_profiles(&args.dest_profile, args.source_profile.as_deref())?;
    let source = load_source(&args.source)?;

    let mut notes = Vec::new();
    if let (Some(src), Some(dst)) = (&source.machine, &dest.machine) {
        if src != dst {
            notes.push(format!(
                "the source machine type is {src}, the destination profile's {dst}: a migration \
                 needs the same machine type on both sides"
            ));
        }
    }
    notes.extend(destination_kernel_note(&dest));
    if source.vcpus.len() > usize::try_from(dest.vcpus).unwrap_or(usize::MAX) {
        notes.push(format!(
            "the source has {} vcpus, the destination profile was captured with {}",
            source.vcpus.len(),
            dest.vcpus
        ));
    }
    let reports: Vec<RewriteReport> = source
        .vcpus
        .iter()
        .map(|(vcpu, regs)| rewrite(*vcpu, regs, &dest, source_profile.as_ref(), &policy).report)
        .collect();
    let refused: Vec<&RewriteReport> = reports.iter().filter(|r| r.is_refused()).collect();
    let subsection_reports = subsection_rules::decide(&source.subsections, &dest);
    let refused_subsections: Vec<&SubsectionReport> = subsection_reports
        .iter()
        .filter(|r| r.is_refused())
        .collect();

    let mut text = String::new();
    if args.json {
        let _ = writeln!(
            text,
            "{}",
            plan_json(&source.kind, &dest, &reports, &subsection_reports, &notes)
        );
    } else {
        let _ = writeln!(
            text,
            "plan: {} ({}) -> destination profile {} ({}, {})",
            args.source.display(),
            source.kind,
            args.dest_profile.display(),
            dest.accel,
            dest.machine.as_deref().unwrap_or("machine unknown")
        );
        for note in &notes {
            let _ = writeln!(text, "note: {note}");
        }
        // Each vCPU's subsections right under its registers.
        for line in vcpu_lines(&reports, &subsection_reports, args.all) {
            let _ = writeln!(text, "{line}");
        }
        let verdict = if refused.is_empty() && refused_subsections.is_empty() {
            "the migration can go through migproxy"
        } else {
            "REFUSED"
        };
        let _ = writeln!(text, "verdict: {verdict}");
        let unproven = refused.iter().flat_map(|r| &r.refused).any(|x| {
            matches!(
                x.reason,
                RefusalReason::InUse {
                    source_default: None
                }
            )
        });
        if unproven && source_profile.is_none() {
            let _ = writeln!(
                text,
                "hint: --source-profile (a fresh VM of the source's configuration) shows which \
                 nonzero values are reset defaults; --allow-drop REG drops a register regardless"
            );
        }
    }
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        // A reader that stopped early (`| head`) is not our failure.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(ProxyError::io("write standard output", e))
        }
        _ => {}
    }
    if !refused.is_empty() {
        let mut digest = RefusalDigest::default();
        refused.iter().for_each(|r| digest.add(r));
        Err(ProxyError::Refused(Refusal::Registers(digest.summaries())))
    } else if !refused_subsections.is_empty() {
        Err(ProxyError::Refused(Refusal::Subsections(
            subsection_summaries::refusal_summaries(refused_subsections.iter().copied()),
        )))
    } else {
        Ok(())
    }
}

/// The readable per-vCPU lines: a digest, or every register with `--all`.
pub(crate) fn vcpu_lines(
    reports: &[RewriteReport],
    subsection_reports: &[SubsectionReport],
    all: bool,
) -> Vec<String> {
    let subsections: HashMap<u32, &SubsectionReport> =
        subsection_reports.iter().map(|s| (s.vcpu, s)).collect();
    let mut lines = VcpuReport::new(all);
    for report in reports {
        lines.add(
            report.vcpu,
            Some(report),
            subsections.get(&report.vcpu).copied(),
        );
    }
    lines.lines()
}

struct Source {
    kind: String,
    machine: Option<String>,
    vcpus: Vec<(u32, Vec<(u64, u64)>)>,
    /// The `cpu` subsections of a stream (a profile has none: a fresh VM sends only what it
    /// needs, which says nothing about a running guest).
    subsections: Vec<CpuSubsection>,
}

/// A stream starts with QEMU's file magic `QEVM`; anything else is read as a profile.
fn load_source(path: &Path) -> Result<Source, ProxyError> {
    let mut head = [0u8; 4];
    let is_stream = path != Path::new("-")
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .map(|()| &head == b"QEVM")
            .unwrap_or(false);
    if is_stream || path == Path::new("-") {
        let stream = Input::open(path)?.read_cpus()?;
        return Ok(Source {
            kind: "stream".into(),
            machine: stream.info.machine.clone(),
            vcpus: stream
                .cpus
                .into_iter()
                .map(|c| (c.instance, c.registers))
                .collect(),
            subsections: stream.subsections,
        });
    }
    let profile = Profile::load(path)?;
    Ok(Source {
        kind: "profile".into(),
        machine: profile.machine.clone(),
        vcpus: (0..profile.vcpus)
            .map(|v| (v, profile.registers_for_vcpu(v)))
            .collect(),
        subsections: Vec::new(),
    })
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn plan_json(
    kind: &str,
    dest: &Profile,
    reports: &[RewriteReport],
    subsection_reports: &[SubsectionReport],
    notes: &[String],
) -> serde_json::Value {
    let subsections_of: HashMap<u32, &SubsectionReport> =
        subsection_reports.iter().map(|s| (s.vcpu, s)).collect();
    let vcpus: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let subsections = subsections_of.get(&r.vcpu).copied();
            json!({
                "vcpu": r.vcpu,
                "refused": r.is_refused() || subsections.is_some_and(SubsectionReport::is_refused),
                "removed_subsections": subsections.map(|s| s.removed.iter().map(|x| json!({
                    "name": x.name, "reason": x.reason})).collect::<Vec<_>>()).unwrap_or_default(),
                "refused_subsections": subsections.map(|s| s.refused.iter().map(|x| json!({
                    "name": x.name, "reason": x.reason})).collect::<Vec<_>>()).unwrap_or_default(),
                "unchanged": r.is_unchanged(),
                "source_registers": r.source_len,
                "output_registers": r.output_len,
                "dropped": r.dropped.iter().map(|d| json!({
                    "id": hex(d.id.0), "name": d.id.to_string(), "value": hex(d.value),
                    "reason": d.reason.to_string()})).collect::<Vec<_>>(),
                "filled": r.filled.iter().map(|f| json!({
                    "id": hex(f.id.0), "name": f.id.to_string(), "value": hex(f.value)}))
                    .collect::<Vec<_>>(),
                "refused_registers": r.refused.iter().map(|x| json!({
                    "id": hex(x.id.0), "name": x.id.to_string(), "value": hex(x.value),
                    "reason": format!("{:?}", x.reason), "why": x.describe()}))
                    .collect::<Vec<_>>(),
                "id_mismatches": r.id_mismatches.iter().map(|m| json!({
                    "id": hex(m.id.0), "name": m.id.to_string(), "source": hex(m.source),
                    "destination": hex(m.dest), "action": format!("{:?}", m.action)}))
                    .collect::<Vec<_>>(),
                "left_missing": r.left_missing.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
                // The rewrite's warnings do not name the vCPU (the daemon groups them); a
                // reader of one warning string still needs to know which vCPU it is about.
                "warnings": r.warnings.iter().map(|w| format!("vcpu {}: {w}", r.vcpu))
                    .collect::<Vec<_>>(),
                "summary": if r.is_refused() { Some(r.refusal_summary()) } else { None },
            })
        })
        .collect();
    json!({
        "source_kind": kind,
        "destination": { "accel": dest.accel.as_str(), "machine": dest.machine, "vcpus": dest.vcpus },
        "refused": reports.iter().any(RewriteReport::is_refused)
            || subsection_reports.iter().any(SubsectionReport::is_refused),
        "notes": notes,
        "vcpus": vcpus,
    })
}
