//! The readable per-vCPU report of `plan` and `rewrite`, bounded like the daemon's logs
//! (`migproxy_config::digest`): a stream of 512 vCPUs x 4096 registers must not print two
//! million lines by default.
//!
//! Each vCPU's block is the report's own text (`RewriteReport` and `SubsectionReport` display),
//! so the digest and `--all` say the same things in the same words:
//!
//! - `--all`: every block as it is, every register of every vCPU;
//! - by default: vCPUs whose blocks are identical (but for the vCPU number) share one block
//!   headed by their list (`vcpu 0-511 (512 vcpus): ...`), at most
//!   [`DESCRIBED_OUTCOMES`](migproxy_config::digest::DESCRIBED_OUTCOMES) distinct blocks are
//!   written and the vCPUs of the others counted; inside a block each kind of line (REFUSE, drop,
//!   fill, value, warning, subsection) is written for the first
//!   [`NAMED_REGISTERS`] registers, then counted. Refusal lines keep their exact wording.

use migproxy_config::digest::{first_few, Grouped, NAMED_REGISTERS};
use migproxy_config::{RewriteReport, SubsectionReport};

/// The line `RewriteReport` writes for registers left to the destination's reset value: one
/// line naming all of them, shortened here to the first few.
const LEFT_MISSING: &str = "  absent from the source, left to the destination's reset value: ";

/// Collects the vCPU blocks of one report, complete or digested.
pub struct VcpuReport {
    all: bool,
    /// `--all`: every block, in vCPU order.
    blocks: Vec<String>,
    /// Digest: blocks without their vCPU numbers, grouped.
    grouped: Grouped<String>,
}

impl VcpuReport {
    /// `all`: keep every line of every vCPU (`--all`); otherwise the digest.
    pub fn new(all: bool) -> VcpuReport {
        VcpuReport {
            all,
            blocks: Vec::new(),
            grouped: Grouped::default(),
        }
    }

    /// Note one vCPU: its rewrite (when its registers were rewritten) and its subsections (when
    /// any is removed or refused).
    pub fn add(
        &mut self,
        vcpu: u32,
        registers: Option<&RewriteReport>,
        subsections: Option<&SubsectionReport>,
    ) {
        let mut block = String::new();
        for text in registers
            .map(ToString::to_string)
            .into_iter()
            .chain(subsections.map(ToString::to_string))
        {
            if !block.is_empty() {
                block.push('\n');
            }
            block.push_str(&text);
        }
        if block.is_empty() {
            return;
        }
        if self.all {
            self.blocks.push(block);
        } else {
            self.grouped.add(vcpu, without_vcpu(&block, vcpu));
        }
    }

    /// The report's lines: with `--all` every block; otherwise at most
    /// [`DESCRIBED_OUTCOMES`](migproxy_config::digest::DESCRIBED_OUTCOMES) bounded blocks and one
    /// line counting the vCPUs of the rest.
    pub fn lines(&self) -> Vec<String> {
        if self.all {
            return self.blocks.clone();
        }
        let mut lines = self.grouped.lines(
            |block| bounded(block),
            "vCPUs with other outcomes (--all lists every vCPU)",
        );
        if self
            .grouped
            .groups()
            .any(|(block, _)| bounded(block).len() < block.len())
        {
            lines.push("(register lists shortened; --all lists every register)".into());
        }
        lines
    }
}

/// The block with its `vcpu N: ` heads removed: the first line's is where the group's vCPU list
/// goes, a later one (the subsections' head) is indented under it.
fn without_vcpu(block: &str, vcpu: u32) -> String {
    let head = format!("vcpu {vcpu}: ");
    let mut out = String::with_capacity(block.len());
    for (n, line) in block.lines().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        match line.strip_prefix(&head) {
            Some(rest) if n == 0 => out.push_str(rest),
            Some(rest) => {
                out.push_str("  ");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
    }
    out
}

/// What kind of detail line this is: lines of one kind are written for the first
/// [`NAMED_REGISTERS`] registers, the rest counted. `None`: a line always written.
fn kind_of(line: &str) -> Option<&'static str> {
    const KINDS: [(&str, &str); 7] = [
        ("  REFUSE subsection ", "refused subsections"),
        ("  remove subsection ", "removed subsections"),
        ("  REFUSE ", "refused registers"),
        ("  drop ", "dropped registers"),
        ("  fill ", "filled registers"),
        ("  value ", "differing values"),
        ("  warning: ", "warnings"),
    ];
    KINDS
        .iter()
        .find(|(prefix, _)| line.starts_with(prefix))
        .map(|(_, kind)| *kind)
}

/// The block with each kind of detail line cut to the first [`NAMED_REGISTERS`], followed by
/// one line counting the rest of that kind.
fn bounded(block: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    // (kind, lines of it seen) of the run being written.
    let mut run: Option<(&str, usize)> = None;
    let close = |run: Option<(&str, usize)>, out: &mut Vec<String>| {
        if let Some((kind, seen)) = run {
            if seen > NAMED_REGISTERS {
                out.push(format!("  ... and {} more {kind}", seen - NAMED_REGISTERS));
            }
        }
    };
    for line in block.lines() {
        let kind = kind_of(line);
        match (run, kind) {
            (Some((current, seen)), Some(kind)) if current == kind => {
                run = Some((kind, seen + 1));
                if seen < NAMED_REGISTERS {
                    out.push(line.to_owned());
                }
                continue;
            }
            _ => {}
        }
        close(run.take(), &mut out);
        if let Some(kind) = kind {
            run = Some((kind, 1));
            out.push(line.to_owned());
        } else if let Some(names) = line.strip_prefix(LEFT_MISSING) {
            let names: Vec<&str> = names.split(", ").collect();
            out.push(format!(
                "{LEFT_MISSING}{}",
                first_few(&names, |name| (*name).to_owned(), ", ", "")
            ));
        } else {
            out.push(line.to_owned());
        }
    }
    close(run, &mut out);
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_vcpus_share_one_block_and_long_runs_are_counted() {
        let mut report = VcpuReport::new(false);
        for vcpu in 0..512u32 {
            let mut block = format!("vcpu {vcpu}: 100 -> 0 registers: 100 dropped");
            for n in 0..100 {
                block.push_str(&format!("\n  drop   R{n} = 0x0: zero, unused since reset"));
            }
            block.push_str(&format!("\nvcpu {vcpu}: subsections: 1 removed, 0 refused"));
            block.push_str("\n  remove subsection cpu/x: idle");
            report.grouped.add(vcpu, without_vcpu(&block, vcpu));
        }
        let lines = report.lines();
        let text = lines.join("\n");
        assert!(
            text.starts_with("vcpu 0-511 (512 vcpus): 100 -> 0 registers: 100 dropped\n"),
            "{text}"
        );
        assert_eq!(text.matches("  drop ").count(), NAMED_REGISTERS, "{text}");
        assert!(
            text.contains("\n  ... and 92 more dropped registers\n"),
            "{text}"
        );
        assert!(
            text.contains("\n  subsections: 1 removed, 0 refused\n  remove subsection cpu/x: idle")
        );
        assert!(text.ends_with("--all lists every register)"), "{text}");
    }

    #[test]
    fn the_left_missing_line_names_the_first_few() {
        let names: Vec<String> = (0..20).map(|n| format!("R{n}")).collect();
        let block = format!("head\n{LEFT_MISSING}{}", names.join(", "));
        assert_eq!(
            bounded(&block),
            format!("head\n{LEFT_MISSING}R0, R1, R2, R3, R4, R5, R6, R7, and 12 more")
        );
    }
}
