//! Bounded reports of many vCPUs: what a stream with 512 vCPUs of 4096 registers each makes the
//! rewrite say must still fit in a few log lines and one error message.
//!
//! Three tools, shared by the daemon and the offline commands:
//!
//! - [`Grouped`]: identical per-vCPU outcomes (the same refused registers, the same warning, the
//!   same rewrite) are reported once with the list of vCPUs that had them; at most
//!   [`DESCRIBED_OUTCOMES`] distinct outcomes are kept, the vCPUs of any further ones are only
//!   counted. Each vCPU is compared with at most that many kept outcomes, so the work is linear
//!   in the size of the reports.
//! - [`VcpuList`]: vCPU numbers as ranges (`vcpu 0-511 (512 vcpus)`), at most [`LISTED_RANGES`] of them written.
//! - [`NameList`]: register names, each once, the first [`LISTED_NAMES`] written, the rest
//!   counted ("and K more").

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;

use crate::regid::RegId;

/// How many registers a summary or warning names before it says "and K more".
pub const NAMED_REGISTERS: usize = 8;

/// How many distinct per-vCPU outcomes one migration's report describes; vCPUs with further
/// outcomes are counted, not described.
pub const DESCRIBED_OUTCOMES: usize = 8;

/// How many register names a [`NameList`] (the migration summary's `dropped` and `filled`)
/// writes before it says "and K more": every name of a real migration (a few dozen at most), a
/// bounded line for a hostile one.
pub const LISTED_NAMES: usize = 64;

/// How many ranges of vCPU numbers a list writes before it says "and K more".
pub const LISTED_RANGES: usize = 8;

/// Outcomes of type `K`, each with the vCPUs that had it, in order of first appearance.
#[derive(Debug, Clone)]
pub struct Grouped<K> {
    groups: Vec<(K, VcpuList)>,
    /// vCPUs whose outcome was none of the kept ones, once the kept ones were full.
    undescribed: VcpuList,
}

impl<K> Default for Grouped<K> {
    fn default() -> Self {
        Grouped {
            groups: Vec::new(),
            undescribed: VcpuList::default(),
        }
    }
}

impl<K> Grouped<K> {
    /// Note that `vcpu` had `outcome`.
    pub fn add(&mut self, vcpu: u32, outcome: K)
    where
        K: PartialEq,
    {
        if !self.join(vcpu, &outcome) {
            self.start(vcpu, outcome);
        }
    }

    /// Note that `vcpu` had `outcome`; it is copied only when it starts a new group.
    pub fn add_borrowed<Q>(&mut self, vcpu: u32, outcome: &Q)
    where
        K: Borrow<Q>,
        Q: PartialEq + ToOwned<Owned = K> + ?Sized,
    {
        if !self.join(vcpu, outcome) {
            self.start(vcpu, outcome.to_owned());
        }
    }

    /// Add `vcpu` to the kept group of `outcome`, if there is one.
    fn join<Q>(&mut self, vcpu: u32, outcome: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        match self
            .groups
            .iter_mut()
            .find(|(kept, _)| kept.borrow() == outcome)
        {
            Some((_, vcpus)) => {
                vcpus.push(vcpu);
                true
            }
            None => false,
        }
    }

    /// A new group for `outcome`, or only a count once [`DESCRIBED_OUTCOMES`] are kept.
    fn start(&mut self, vcpu: u32, outcome: K) {
        if self.groups.len() < DESCRIBED_OUTCOMES {
            let mut vcpus = VcpuList::default();
            vcpus.push(vcpu);
            self.groups.push((outcome, vcpus));
        } else {
            self.undescribed.push(vcpu);
        }
    }

    /// The kept outcomes with their vCPUs, in order of first appearance.
    pub fn groups(&self) -> impl Iterator<Item = (&K, &VcpuList)> {
        self.groups.iter().map(|(outcome, vcpus)| (outcome, vcpus))
    }

    /// The vCPUs whose outcomes were not kept (there were already [`DESCRIBED_OUTCOMES`]).
    pub fn undescribed(&self) -> &VcpuList {
        &self.undescribed
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The lines describing every kept outcome (`describe` writes one), then one counting the
    /// vCPUs left out: at most [`DESCRIBED_OUTCOMES`] + 1 lines.
    pub fn lines(&self, describe: impl Fn(&K) -> String, left_out: &str) -> Vec<String> {
        let mut lines: Vec<String> = self
            .groups
            .iter()
            .map(|(outcome, vcpus)| format!("{vcpus}: {}", describe(outcome)))
            .collect();
        if !self.undescribed.is_empty() {
            lines.push(format!(
                "and {} more {left_out} ({})",
                self.undescribed.count(),
                self.undescribed
            ));
        }
        lines
    }
}

/// vCPU numbers, kept as ascending runs; out-of-order numbers start a new run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuList {
    /// The first [`LISTED_RANGES`] runs, inclusive.
    ranges: Vec<(u32, u32)>,
    count: u64,
}

impl VcpuList {
    pub fn push(&mut self, vcpu: u32) {
        self.count += 1;
        let listed = self.ranges.len();
        match self.ranges.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(vcpu) => *last = vcpu,
            _ if listed < LISTED_RANGES => self.ranges.push((vcpu, vcpu)),
            // Counted, not listed: the list says "and K more".
            _ => {}
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The first vCPU noted (0 when none was).
    pub fn first(&self) -> u32 {
        self.ranges.first().map_or(0, |(first, _)| *first)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn listed(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(first, last)| u64::from(last - first) + 1)
            .sum()
    }
}

impl fmt::Display for VcpuList {
    /// `vcpu 3`, `vcpu 0-511 (512 vcpus)`, `vcpu 0-3,5,9-12 and 40 more (49 vcpus)`: always
    /// "vcpu N" first, as the one-vCPU form, so "vcpu 0" finds the line that names vCPU 0 first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [(first, last)] = self.ranges[..] {
            if first == last && self.count == 1 {
                return write!(f, "vcpu {first}");
            }
        }
        f.write_str("vcpu ")?;
        for (n, (first, last)) in self.ranges.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        let unlisted = self.count.saturating_sub(self.listed());
        if unlisted > 0 {
            write!(f, " and {unlisted} more")?;
        }
        write!(f, " ({} vcpus)", self.count)
    }
}

/// Between two names of a [`NameList`]; no register name holds a space.
pub const NAME_SEPARATOR: &str = ", ";

/// Register names, each once; the first [`LISTED_NAMES`] are written, the rest counted.
#[derive(Debug, Clone, Default)]
pub struct NameList {
    seen: HashSet<u64>,
    named: Vec<RegId>,
}

impl NameList {
    /// Note `id`; a second note of the same id changes nothing.
    pub fn insert(&mut self, id: RegId) {
        if self.seen.insert(id.0) && self.named.len() < LISTED_NAMES {
            self.named.push(id);
        }
    }

    /// Note every register `other` noted (its named ones first, so they stay named).
    pub fn merge(&mut self, other: &NameList) {
        for &id in &other.named {
            self.insert(id);
        }
        for &id in &other.seen {
            self.insert(RegId(id));
        }
    }

    /// The names written, in order of first note.
    pub fn names(&self) -> Vec<String> {
        self.named.iter().map(RegId::to_string).collect()
    }

    /// How many distinct registers were noted.
    pub fn count(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl PartialEq for NameList {
    fn eq(&self, other: &NameList) -> bool {
        self.named == other.named && self.seen == other.seen
    }
}

impl Eq for NameList {}

impl fmt::Display for NameList {
    /// `A, B, C`, or `A, ..., Z and 4032 more`: a comma and a space between names, because a
    /// register's own name can hold commas (`p14,0,c0,c5,0`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(NAME_SEPARATOR))?;
        let more = self.count().saturating_sub(self.named.len());
        if more > 0 {
            write!(f, " and {more} more")?;
        }
        Ok(())
    }
}

/// `items` joined with `separator`, the first [`NAMED_REGISTERS`] written, then "and K more"
/// (followed by `what` unless it is empty) for the rest.
pub fn first_few<T>(
    items: &[T],
    describe: impl Fn(&T) -> String,
    separator: &str,
    what: &str,
) -> String {
    let mut text: Vec<String> = items.iter().take(NAMED_REGISTERS).map(describe).collect();
    let more = items.len().saturating_sub(NAMED_REGISTERS);
    if more > 0 && what.is_empty() {
        text.push(format!("and {more} more"));
    } else if more > 0 {
        text.push(format!("and {more} more {what}"));
    }
    text.join(separator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_lists_write_ranges_and_count_the_rest() {
        let mut all = VcpuList::default();
        (0..512).for_each(|v| all.push(v));
        assert_eq!(all.to_string(), "vcpu 0-511 (512 vcpus)");
        let mut one = VcpuList::default();
        one.push(3);
        assert_eq!(one.to_string(), "vcpu 3");
        let mut every_other = VcpuList::default();
        (0..512).step_by(2).for_each(|v| every_other.push(v));
        assert_eq!(
            every_other.to_string(),
            "vcpu 0,2,4,6,8,10,12,14 and 248 more (256 vcpus)"
        );
    }

    #[test]
    fn grouping_keeps_a_bounded_number_of_outcomes() {
        let mut grouped = Grouped::default();
        for vcpu in 0..512u32 {
            grouped.add(vcpu, vcpu % 2);
        }
        let lines = grouped.lines(|k| format!("outcome {k}"), "vCPUs");
        assert_eq!(
            lines,
            [
                "vcpu 0,2,4,6,8,10,12,14 and 248 more (256 vcpus): outcome 0",
                "vcpu 1,3,5,7,9,11,13,15 and 248 more (256 vcpus): outcome 1"
            ]
        );
        let mut distinct = Grouped::default();
        for vcpu in 0..512u32 {
            distinct.add(vcpu, vcpu);
        }
        let lines = distinct.lines(|k| format!("outcome {k}"), "vCPUs with other outcomes");
        assert_eq!(lines.len(), DESCRIBED_OUTCOMES + 1);
        assert_eq!(
            lines[DESCRIBED_OUTCOMES],
            "and 504 more vCPUs with other outcomes (vcpu 8-511 (504 vcpus))"
        );
    }

    #[test]
    fn name_lists_name_each_register_once_and_count_the_rest() {
        let mut names = NameList::default();
        for _ in 0..3 {
            for id in 0..4096u64 {
                names.insert(RegId(0x6030_0000_0013_0000 | id));
            }
        }
        assert_eq!(names.count(), 4096);
        assert_eq!(names.names().len(), LISTED_NAMES);
        let mut merged = NameList::default();
        merged.merge(&names);
        assert_eq!(merged, names);
        assert!(names.to_string().ends_with(" and 4032 more"), "{names}");
    }

    #[test]
    fn name_lists_keep_names_with_commas_apart() -> Result<(), crate::ConfigError> {
        let mut names = NameList::default();
        let coproc: RegId = "p14,0,c0,c5,0".parse()?;
        names.insert(coproc);
        names.insert("TCR2_EL1".parse()?);
        let text = names.to_string();
        let split: Vec<&str> = text.split(NAME_SEPARATOR).collect();
        assert_eq!(split, [coproc.to_string().as_str(), "TCR2_EL1"]);
        assert!(split[0].contains(','), "{text}");
        Ok(())
    }
}
