//! What a stream at the codec's budgets (512 vCPUs of 4096 registers each) makes the rewrite
//! say: a bounded number of lines of bounded length, not one per register or per vCPU.

use super::*;
use crate::digest::{DESCRIBED_OUTCOMES, NAMED_REGISTERS};

/// The codec's default budgets (`max_cpus`, `max_cpregs`).
const VCPUS: u32 = 512;
const REGISTERS: u64 = 4096;

/// Longest line any summary or warning below may be: the named registers' sentences plus the
/// vCPU list and counts.
const LONGEST_LINE: usize = 2048;

/// Ids of AArch64 system registers, distinct and ascending.
fn ids() -> impl Iterator<Item = u64> {
    (0..REGISTERS).map(|n| 0x6030_0000_0013_0000 | n)
}

fn tcg_profile(registers: &[String]) -> Profile {
    let text = format!(
        r#"{{"format_version": 1, "accel": "tcg", "vcpus": 2, "registers": [{}]}}"#,
        registers.join(",")
    );
    match Profile::from_json(&text) {
        Ok(p) => p,
        Err(e) => panic!("test profile: {e}"),
    }
}

fn assert_bounded(lines: &[String]) {
    assert!(
        lines.len() <= DESCRIBED_OUTCOMES + 1,
        "{} lines",
        lines.len()
    );
    for line in lines {
        assert!(line.len() <= LONGEST_LINE, "{} bytes: {line}", line.len());
    }
}

#[test]
fn refusing_every_register_of_every_vcpu_fits_in_one_bounded_line() {
    // The destination has none of the source's registers, all nonzero: each is refused.
    let dest = tcg_profile(&[r#"{"id": "0x603000000013c080", "value": "0x1"}"#.to_owned()]);
    let source: Vec<(u64, u64)> = ids().map(|id| (id, 0x42)).collect();
    let out = rewrite(0, &source, &dest, None, &Policy::default());
    assert_eq!(out.report.refused.len(), 4096);
    let summary = out.report.refusal_summary();
    assert!(summary.len() <= LONGEST_LINE, "{}", summary.len());
    assert!(
        summary.ends_with("and 4088 more refused registers"),
        "{summary}"
    );
    // The other vCPUs' reports are the same but for their number (rewriting each again would
    // only test the rewrite's speed in a debug build).
    let mut digest = RefusalDigest::default();
    for vcpu in 0..VCPUS {
        digest.add(&RewriteReport {
            vcpu,
            ..out.report.clone()
        });
    }
    let lines = digest.summaries();
    assert_bounded(&lines);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("vcpu 0-511 (512 vcpus): "),
        "{}",
        lines[0]
    );
    assert_eq!(lines[0].matches(" = 0x42 ").count(), NAMED_REGISTERS);
}

#[test]
fn distinct_refusals_of_many_vcpus_are_described_up_to_the_cap_and_counted() {
    let dest = tcg_profile(&[r#"{"id": "0x603000000013c080", "value": "0x1"}"#.to_owned()]);
    let source: Vec<(u64, u64)> = ids().map(|id| (id, 1)).collect();
    let out = rewrite(0, &source, &dest, None, &Policy::default());
    let mut digest = RefusalDigest::default();
    for vcpu in 0..VCPUS {
        // Every vCPU holds other values: no two refusals are alike.
        let mut report = RewriteReport {
            vcpu,
            ..out.report.clone()
        };
        for refusal in &mut report.refused {
            refusal.value = u64::from(vcpu) + 1;
        }
        digest.add(&report);
    }
    let lines = digest.summaries();
    assert_bounded(&lines);
    assert_eq!(lines.len(), DESCRIBED_OUTCOMES + 1);
    assert_eq!(
        lines[DESCRIBED_OUTCOMES],
        "and 504 more vCPUs refused for other registers (vcpu 8-511 (504 vcpus))"
    );
}

#[test]
fn filling_every_register_of_every_vcpu_warns_once_per_vcpu_in_one_bounded_line() {
    // Per-vCPU values captured with 2 vCPUs; the source sends none: vCPUs 2.. take vCPU 0's.
    let registers: Vec<String> = ids()
        .map(|id| format!(r#"{{"id": "{id:#x}", "value": "0x1", "per_vcpu": ["0x1", "0x2"]}}"#))
        .collect();
    let dest = tcg_profile(&registers);
    let mut warnings: Grouped<String> = Grouped::default();
    // vCPUs 0 and 1 have values, 2 has none, and every later vCPU is like 2.
    let reports: Vec<RewriteReport> = (0..3)
        .map(|vcpu| rewrite(vcpu, &[], &dest, None, &Policy::default()).report)
        .collect();
    for vcpu in 0..VCPUS {
        let report = reports
            .get(usize::try_from(vcpu).unwrap_or(usize::MAX))
            .or(reports.last())
            .map(|r| RewriteReport { vcpu, ..r.clone() })
            .unwrap_or_default();
        assert_eq!(report.filled.len(), 4096);
        let expected = usize::from(vcpu >= 2);
        assert_eq!(report.warnings.len(), expected, "{:?}", report.warnings);
        for warning in &report.warnings {
            assert!(warning.len() <= LONGEST_LINE, "{}", warning.len());
            assert!(warning.contains("of 4096 registers"), "{warning}");
            warnings.add_borrowed(vcpu, warning.as_str());
        }
    }
    let lines = warnings.lines(String::clone, "vCPUs with other warnings");
    assert_bounded(&lines);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("vcpu 2-511 (510 vcpus): "),
        "{}",
        lines[0]
    );
}

#[test]
fn identification_registers_without_a_value_for_the_vcpu_warn_once() {
    // MIDR_EL1 and ID registers with per-vCPU values for 2 vCPUs, compared on vCPU 7.
    let id_registers: Vec<u64> = (0..8).map(|n| 0x6030_0000_0013_c008 + n).collect();
    let registers: Vec<String> = id_registers
        .iter()
        .map(|id| format!(r#"{{"id": "{id:#x}", "value": "0x1", "per_vcpu": ["0x1", "0x1"]}}"#))
        .collect();
    let dest = tcg_profile(&registers);
    let source: Vec<(u64, u64)> = id_registers.iter().map(|&id| (id, 0x1)).collect();
    let out = rewrite(7, &source, &dest, None, &Policy::default());
    assert_eq!(out.report.uncompared.len(), 8);
    assert_eq!(out.report.warnings.len(), 1, "{:?}", out.report.warnings);
    assert!(
        out.report.warnings[0].contains("8 identification registers not compared"),
        "{}",
        out.report.warnings[0]
    );
}
