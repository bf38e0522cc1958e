//! A destination register profile: which cpreg indexes one destination's vCPUs have, their values
//! right after reset, what the profile was captured from, and optional per-register rules.
//!
//! The file format (JSON, `format_version` 1) is documented in `docs/profiles.md`. Parsing goes
//! through a raw serde layer (`deny_unknown_fields`, strings for every 64-bit number so that no
//! JSON reader rounds them) and then a validation step whose errors name the field
//! (`registers[12].value: ...`), because profiles are edited by hand.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::regid::RegId;

/// The profile format this build reads and writes.
pub const PROFILE_FORMAT_VERSION: u32 = 1;

/// What executes the destination's vCPUs; it decides the fill and ID-mismatch defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    /// What a register list says about its accelerator: AArch32 views (`0x4020...`/`0x4030...`)
    /// are listed only by QEMU's TCG, firmware pseudo-registers (classes 0x0014, 0x0016) only by
    /// KVM. `None` when the list carries neither hint.
    pub fn detect<'a>(ids: impl IntoIterator<Item = &'a u64>) -> Option<Accel> {
        let mut tcg = false;
        let mut kvm = false;
        for &id in ids {
            tcg |= RegId(id).is_aarch32();
            kvm |= RegId(id).is_firmware();
        }
        match (tcg, kvm) {
            (true, false) => Some(Accel::Tcg),
            (false, true) => Some(Accel::Kvm),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `(value & mask) == equals`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueCondition {
    pub mask: u64,
    pub equals: u64,
}

impl ValueCondition {
    pub fn holds(&self, value: u64) -> bool {
        value & self.mask == self.equals
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropRuleKind {
    /// The register may be dropped (when the condition, if any, holds; otherwise refuse).
    Allow,
    /// The register may never be dropped by the default policy.
    Forbid,
}

/// What may happen when this register is in a source stream and not on the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropRule {
    pub kind: DropRuleKind,
    pub when: Option<ValueCondition>,
}

/// One register entry of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileRegister {
    pub id: RegId,
    /// The reset value (vCPU 0's, or every vCPU's when `per_vcpu` is absent). `None` marks an
    /// entry for a register the destination does not have, present only to carry a rule.
    pub value: Option<u64>,
    /// One value per vCPU, for registers that differ between vCPUs (MPIDR_EL1 under KVM).
    pub per_vcpu: Option<Vec<u64>>,
    /// Bits userspace may change (`KVM_ARM_GET_REG_WRITABLE_MASKS`), for KVM ID registers.
    pub writable_mask: Option<u64>,
    pub rule: Option<DropRule>,
}

impl ProfileRegister {
    pub fn is_present(&self) -> bool {
        self.value.is_some()
    }

    /// This vCPU's value; `None` if absent, or if the values differ per vCPU and this vCPU was not
    /// captured (its value is unknown, not vCPU 0's).
    pub fn value_for(&self, vcpu: u32) -> Option<u64> {
        match &self.per_vcpu {
            Some(values) => usize::try_from(vcpu)
                .ok()
                .and_then(|i| values.get(i))
                .copied(),
            None => self.value,
        }
    }
}

/// What one destination's vCPUs look like after reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub accel: Accel,
    /// QEMU version, when known (`qmp` captures record it).
    pub qemu_version: Option<String>,
    /// Machine type from the stream's configuration record (`virt-7.2`).
    pub machine: Option<String>,
    /// CPU model, when known (only hand-written or given on capture).
    pub cpu_model: Option<String>,
    /// `version_id` of the `cpu` sections (22 for QEMU 7.2 to 10.0).
    pub cpu_section_version: Option<u32>,
    /// Number of vCPUs the profile was captured from.
    pub vcpus: u32,
    /// Free text: how the profile was made (`stream`, `qmp`, `kvm`, or a note).
    pub captured_from: Option<String>,
    /// Sorted strictly ascending by id.
    registers: Vec<ProfileRegister>,
}

impl Profile {
    /// Build a profile from the cpreg lists of a fresh VM, one `(instance, registers)` per vCPU.
    /// Every vCPU must list the same indexes (QEMU builds one list per CPU model).
    pub fn from_vcpus(
        accel: Accel,
        vcpus: &[(u32, Vec<(u64, u64)>)],
    ) -> Result<Profile, ConfigError> {
        let origin = "captured registers";
        let field_err = |field: String, message: String| ConfigError::Field {
            origin: origin.to_owned(),
            field,
            message,
        };
        let (first_instance, first) = vcpus
            .first()
            .ok_or_else(|| field_err("vcpus".into(), "no cpu section to capture".into()))?;
        let count = u32::try_from(vcpus.len())
            .map_err(|_| field_err("vcpus".into(), "too many vcpus".into()))?;
        let mut lists: Vec<(u32, Vec<(u64, u64)>)> = Vec::with_capacity(vcpus.len());
        for (instance, regs) in vcpus {
            let mut sorted = regs.clone();
            sorted.sort_unstable_by_key(|&(id, _)| id);
            if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(field_err(
                    format!("vcpu {instance}"),
                    format!("register {} listed twice", RegId(w[0].0)),
                ));
            }
            lists.push((*instance, sorted));
        }
        let first_sorted = lists.first().map(|(_, l)| l.clone()).unwrap_or_default();
        for (instance, other) in lists.iter().skip(1) {
            if other.len() != first_sorted.len()
                || other.iter().zip(&first_sorted).any(|(a, b)| a.0 != b.0)
            {
                return Err(field_err(
                    format!("vcpu {instance}"),
                    format!(
                        "lists other registers than vcpu {first_instance} ({} against {})",
                        other.len(),
                        first_sorted.len()
                    ),
                ));
            }
        }
        let _ = first;
        let registers = first_sorted
            .iter()
            .enumerate()
            .map(|(index, &(id, value))| {
                let values: Vec<u64> = lists
                    .iter()
                    .filter_map(|(_, l)| l.get(index).map(|&(_, v)| v))
                    .collect();
                let differ = values.iter().any(|&v| v != value);
                ProfileRegister {
                    id: RegId(id),
                    value: Some(value),
                    per_vcpu: differ.then_some(values),
                    writable_mask: None,
                    rule: None,
                }
            })
            .collect();
        Ok(Profile {
            accel,
            qemu_version: None,
            machine: None,
            cpu_model: None,
            cpu_section_version: None,
            vcpus: count,
            captured_from: None,
            registers,
        })
    }

    pub fn load(path: &Path) -> Result<Profile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn from_json(text: &str) -> Result<Profile, ConfigError> {
        Self::parse(text, "profile")
    }

    fn parse(text: &str, origin: &str) -> Result<Profile, ConfigError> {
        let raw: RawProfile = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            origin: origin.to_owned(),
            source,
        })?;
        raw.validate(origin)
    }

    /// The registers, sorted by id, including rule-only entries for absent registers.
    pub fn entries(&self) -> &[ProfileRegister] {
        &self.registers
    }

    pub fn entry(&self, id: RegId) -> Option<&ProfileRegister> {
        self.registers
            .binary_search_by_key(&id, |r| r.id)
            .ok()
            .and_then(|i| self.registers.get(i))
    }

    /// Whether the destination has this register.
    pub fn has(&self, id: RegId) -> bool {
        self.entry(id).is_some_and(ProfileRegister::is_present)
    }

    /// The registers the destination has, sorted by id.
    pub fn present(&self) -> impl Iterator<Item = &ProfileRegister> {
        self.registers.iter().filter(|r| r.is_present())
    }

    /// This vCPU's reset value of a present register (see [`ProfileRegister::value_for`]).
    pub fn value_for(&self, vcpu: u32, id: RegId) -> Option<u64> {
        self.entry(id).and_then(|r| r.value_for(vcpu))
    }

    pub fn rule(&self, id: RegId) -> Option<DropRule> {
        self.entry(id).and_then(|r| r.rule)
    }

    pub fn writable_mask(&self, id: RegId) -> Option<u64> {
        self.entry(id).and_then(|r| r.writable_mask)
    }

    /// Whether the profile carries any writable masks (a `--from-kvm` capture on Linux 6.7+).
    pub fn has_writable_masks(&self) -> bool {
        self.registers.iter().any(|r| r.writable_mask.is_some())
    }

    /// One vCPU's register list, as a stream from a fresh VM would carry it: for `plan` with a
    /// profile as the source. Per-vCPU registers beyond the captured vCPUs take vCPU 0's value.
    pub fn registers_for_vcpu(&self, vcpu: u32) -> Vec<(u64, u64)> {
        self.present()
            .filter_map(|r| Some((r.id.0, r.value_for(vcpu).or(r.value)?)))
            .collect()
    }

    /// Set the writable mask of a present register (used by the KVM capture).
    pub fn set_writable_mask(&mut self, id: RegId, mask: u64) {
        if let Ok(i) = self.registers.binary_search_by_key(&id, |r| r.id) {
            if let Some(r) = self.registers.get_mut(i) {
                r.writable_mask = Some(mask);
            }
        }
    }

    /// The profile as JSON: header fields, then one register per line (diff-friendly).
    pub fn to_json(&self) -> String {
        let mut out = String::from("{\n");
        let mut field = |name: &str, value: serde_json::Value| {
            let _ = writeln!(out, "  {}: {},", json_string(name), value);
        };
        field("format_version", PROFILE_FORMAT_VERSION.into());
        field("accel", self.accel.as_str().into());
        if let Some(v) = &self.qemu_version {
            field("qemu_version", v.as_str().into());
        }
        if let Some(v) = &self.machine {
            field("machine", v.as_str().into());
        }
        if let Some(v) = &self.cpu_model {
            field("cpu_model", v.as_str().into());
        }
        if let Some(v) = self.cpu_section_version {
            field("cpu_section_version", v.into());
        }
        field("vcpus", self.vcpus.into());
        if let Some(v) = &self.captured_from {
            field("captured_from", v.as_str().into());
        }
        out.push_str("  \"registers\": [\n");
        let count = self.registers.len();
        for (i, reg) in self.registers.iter().enumerate() {
            let raw = RawRegister::from(reg);
            let line = serde_json::to_string(&raw).unwrap_or_default();
            let comma = if i + 1 < count { "," } else { "" };
            let _ = writeln!(out, "    {line}{comma}");
        }
        out.push_str("  ]\n}\n");
        out
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// A hex number: `0x` prefix optional, at most 64 bits.
fn parse_hex(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a hex number"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| format!("{text:?} is not a 64-bit hex number"))
}

// ---- The raw serde layer: exactly what the file may contain. ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    format_version: u32,
    accel: Accel,
    #[serde(default)]
    qemu_version: Option<String>,
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    cpu_model: Option<String>,
    #[serde(default)]
    cpu_section_version: Option<u32>,
    vcpus: u32,
    #[serde(default)]
    captured_from: Option<String>,
    registers: Vec<RawRegister>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegister {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per_vcpu: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    absent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writable_mask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rule: Option<RawRule>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    drop: RawDropKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    when: Option<RawCondition>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawDropKind {
    Allow,
    Forbid,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mask: Option<String>,
    equals: String,
}

impl From<&ProfileRegister> for RawRegister {
    fn from(r: &ProfileRegister) -> RawRegister {
        RawRegister {
            id: Some(hex(r.id.0)),
            name: crate::regnames::reg_name(r.id.0).map(str::to_owned),
            value: r.value.map(hex),
            per_vcpu: r
                .per_vcpu
                .as_ref()
                .map(|v| v.iter().copied().map(hex).collect()),
            absent: r.value.is_none(),
            writable_mask: r.writable_mask.map(hex),
            rule: r.rule.map(|rule| RawRule {
                drop: match rule.kind {
                    DropRuleKind::Allow => RawDropKind::Allow,
                    DropRuleKind::Forbid => RawDropKind::Forbid,
                },
                when: rule.when.map(|c| RawCondition {
                    mask: (c.mask != u64::MAX).then(|| hex(c.mask)),
                    equals: hex(c.equals),
                }),
            }),
        }
    }
}

impl RawProfile {
    fn validate(self, origin: &str) -> Result<Profile, ConfigError> {
        let err = |field: String, message: String| ConfigError::Field {
            origin: origin.to_owned(),
            field,
            message,
        };
        if self.format_version != PROFILE_FORMAT_VERSION {
            return Err(err(
                "format_version".into(),
                format!(
                    "unsupported version {}, this migproxy reads version {PROFILE_FORMAT_VERSION}",
                    self.format_version
                ),
            ));
        }
        if self.vcpus == 0 {
            return Err(err("vcpus".into(), "must be at least 1".into()));
        }
        let vcpus =
            usize::try_from(self.vcpus).map_err(|_| err("vcpus".into(), "too large".into()))?;
        let mut registers: Vec<(usize, ProfileRegister)> = Vec::with_capacity(self.registers.len());
        for (i, raw) in self.registers.into_iter().enumerate() {
            let at = |sub: &str| format!("registers[{i}]{sub}");
            let by_id = raw
                .id
                .as_deref()
                .map(|t| {
                    t.parse::<RegId>()
                        .map_err(|e| err(at(".id"), e.to_string()))
                })
                .transpose()?;
            let by_name = raw.name.as_deref().map(|t| t.parse::<RegId>());
            let id = match (by_id, by_name) {
                (Some(id), Some(Ok(named))) if id != named => {
                    return Err(err(
                        at(".name"),
                        format!(
                            "{:?} is {named} ({:#x}), but id is {id} ({:#x})",
                            raw.name.unwrap_or_default(),
                            named.0,
                            id.0
                        ),
                    ))
                }
                // An unknown name next to an id: a name from a newer table; the id decides.
                (Some(id), _) => id,
                (None, Some(Ok(named))) => named,
                (None, Some(Err(e))) => return Err(err(at(".name"), e.to_string())),
                (None, None) => return Err(err(at(""), "needs an \"id\" or a \"name\"".into())),
            };
            let value =
                match (raw.absent, raw.value.as_deref()) {
                    (true, Some(_)) => {
                        return Err(err(at(".value"), "an absent register has no value".into()))
                    }
                    (true, None) => None,
                    (false, Some(v)) => Some(parse_hex(v).map_err(|m| err(at(".value"), m))?),
                    (false, None) => return Err(err(
                        at(".value"),
                        "missing (give the reset value, or \"absent\": true for a rule-only entry)"
                            .into(),
                    )),
                };
            let per_vcpu = match raw.per_vcpu {
                None => None,
                Some(_) if value.is_none() => {
                    return Err(err(
                        at(".per_vcpu"),
                        "an absent register has no values".into(),
                    ))
                }
                Some(list) => {
                    if list.len() != vcpus {
                        return Err(err(
                            at(".per_vcpu"),
                            format!("has {} values for {} vcpus", list.len(), vcpus),
                        ));
                    }
                    let mut values = Vec::with_capacity(list.len());
                    for (k, v) in list.iter().enumerate() {
                        values.push(
                            parse_hex(v).map_err(|m| err(at(&format!(".per_vcpu[{k}]")), m))?,
                        );
                    }
                    Some(values)
                }
            };
            let writable_mask = raw
                .writable_mask
                .as_deref()
                .map(|m| parse_hex(m).map_err(|e| err(at(".writable_mask"), e)))
                .transpose()?;
            let rule = match raw.rule {
                None => None,
                Some(rule) => {
                    let when = match rule.when {
                        None => None,
                        Some(c) => {
                            let mask = match c.mask.as_deref() {
                                Some(m) => {
                                    parse_hex(m).map_err(|e| err(at(".rule.when.mask"), e))?
                                }
                                None => u64::MAX,
                            };
                            let equals = parse_hex(&c.equals)
                                .map_err(|e| err(at(".rule.when.equals"), e))?;
                            if equals & !mask != 0 {
                                return Err(err(
                                    at(".rule.when.equals"),
                                    format!("{equals:#x} has bits outside mask {mask:#x}: the condition can never hold"),
                                ));
                            }
                            Some(ValueCondition { mask, equals })
                        }
                    };
                    let kind = match rule.drop {
                        RawDropKind::Allow => DropRuleKind::Allow,
                        RawDropKind::Forbid => DropRuleKind::Forbid,
                    };
                    if kind == DropRuleKind::Forbid && when.is_some() {
                        return Err(err(
                            at(".rule.when"),
                            "a condition only applies to \"drop\": \"allow\"".into(),
                        ));
                    }
                    Some(DropRule { kind, when })
                }
            };
            registers.push((
                i,
                ProfileRegister {
                    id,
                    value,
                    per_vcpu,
                    writable_mask,
                    rule,
                },
            ));
        }
        registers.sort_by_key(|(_, r)| r.id);
        if let Some(w) = registers.windows(2).find(|w| w[0].1.id == w[1].1.id) {
            return Err(err(
                format!("registers[{}]", w[1].0),
                format!("{} is already listed as registers[{}]", w[1].1.id, w[0].0),
            ));
        }
        Ok(Profile {
            accel: self.accel,
            qemu_version: self.qemu_version,
            machine: self.machine,
            cpu_model: self.cpu_model,
            cpu_section_version: self.cpu_section_version,
            vcpus: self.vcpus,
            captured_from: self.captured_from,
            registers: registers.into_iter().map(|(_, r)| r).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> String {
        match Profile::from_json(text) {
            Ok(_) => String::from("<no error>"),
            Err(e) => e.to_string(),
        }
    }

    const HEAD: &str = r#""format_version": 1, "accel": "tcg", "machine": "virt-7.2", "cpu_section_version": 22, "vcpus": 2"#;

    #[test]
    fn hand_written_profile_by_name_and_id() {
        let text = format!(
            r#"{{{HEAD}, "registers": [
                {{"name": "RMR_EL1", "value": "0x1"}},
                {{"id": "TCR2_EL1", "value": "0"}},
                {{"id": "0x603000000013c005", "name": "MPIDR_EL1", "value": "0x80000000", "per_vcpu": ["0x80000000", "0x80000001"]}},
                {{"id": "S3_0_C0_C6_7", "value": "0x0"}},
                {{"name": "KVM_REG_ARM_VENDOR_HYP_BMAP_2", "absent": true, "rule": {{"drop": "allow", "when": {{"equals": "0x0"}}}}}}
            ]}}"#
        );
        let p = match Profile::from_json(&text) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(p.machine.as_deref(), Some("virt-7.2"));
        assert!(p.has(RegId(0x6030_0000_0013_c602)));
        assert!(!p.has(RegId(0x6030_0000_0016_0003)));
        assert!(p.rule(RegId(0x6030_0000_0016_0003)).is_some());
        assert_eq!(
            p.value_for(1, RegId(0x6030_0000_0013_c005)),
            Some(0x8000_0001)
        );
        assert_eq!(p.value_for(2, RegId(0x6030_0000_0013_c005)), None);
        // Sorted, round-trips through its own JSON.
        let ids: Vec<u64> = p.entries().iter().map(|r| r.id.0).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let again = Profile::from_json(&p.to_json()).map_err(|e| e.to_string());
        assert_eq!(again, Ok(p.clone()));
        assert!(p
            .to_json()
            .contains(r#"{"id":"0x603000000013c602","name":"RMR_EL1","value":"0x1"}"#));
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases = [
            (
                r#"{"format_version": 2, "accel": "tcg", "vcpus": 1, "registers": []}"#,
                "format_version: unsupported version 2",
            ),
            (
                r#"{"format_version": 1, "accel": "tcx", "vcpus": 1, "registers": []}"#,
                "unknown variant `tcx`",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [], "colour": 1}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 0, "registers": []}"#,
                "vcpus: must be at least 1",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [{"id": "0x1", "value": "0xzz"}]}"#,
                "registers[0].value: \"0xzz\" is not a 64-bit hex number",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [{"id": "0x1"}]}"#,
                "registers[0].value: missing",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [{"name": "NO_SUCH_REG", "value": "0"}]}"#,
                "registers[0].name: unknown register \"NO_SUCH_REG\"",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [{"id": "0x603000000013c103", "name": "PIR_EL1", "value": "0"}]}"#,
                "registers[0].name: \"PIR_EL1\" is PIR_EL1",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [{"name": "TCR2_EL1", "value": "0"}, {"id": "0x603000000013c103", "value": "1"}]}"#,
                "registers[1]: TCR2_EL1 is already listed as registers[0]",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 2, "registers": [{"id": "0x1", "value": "0", "per_vcpu": ["0"]}]}"#,
                "registers[0].per_vcpu: has 1 values for 2 vcpus",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [{"id": "0x1", "absent": true, "rule": {"drop": "allow", "when": {"mask": "0x1", "equals": "0x2"}}}]}"#,
                "registers[0].rule.when.equals",
            ),
            (
                r#"{"format_version": 1, "accel": "tcg", "vcpus": 1, "registers": [{"id": "0x1", "absent": true, "value": "0"}]}"#,
                "registers[0].value: an absent register has no value",
            ),
        ];
        for (text, expected) in cases {
            let e = err_of(text);
            assert!(e.contains(expected), "{e:?} should contain {expected:?}");
        }
    }

    #[test]
    fn from_vcpus_records_per_vcpu_differences() {
        let vcpus = vec![
            (
                0,
                vec![
                    (0x6030_0000_0013_c005, 0x8000_0000),
                    (0x6030_0000_0013_c080, 5),
                ],
            ),
            (
                1,
                vec![
                    (0x6030_0000_0013_c080, 5),
                    (0x6030_0000_0013_c005, 0x8000_0001),
                ],
            ),
        ];
        let p = Profile::from_vcpus(Accel::Kvm, &vcpus).map_err(|e| e.to_string());
        let p = match p {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(p.vcpus, 2);
        assert_eq!(
            p.entry(RegId(0x6030_0000_0013_c005))
                .and_then(|r| r.per_vcpu.clone()),
            Some(vec![0x8000_0000, 0x8000_0001])
        );
        assert_eq!(
            p.entry(RegId(0x6030_0000_0013_c080))
                .and_then(|r| r.per_vcpu.clone()),
            None
        );
        let bad = vec![(0, vec![(1, 0)]), (1, vec![(2, 0)])];
        assert!(Profile::from_vcpus(Accel::Tcg, &bad).is_err());
    }

    #[test]
    fn accel_detection() {
        assert_eq!(
            Accel::detect(&[0x4020_0000_200f_0082, 0x6030_0000_0013_c080]),
            Some(Accel::Tcg)
        );
        assert_eq!(
            Accel::detect(&[0x6030_0000_0014_0000, 0x6030_0000_0013_c080]),
            Some(Accel::Kvm)
        );
        assert_eq!(Accel::detect(&[0x6030_0000_0013_c080]), None);
    }
}
