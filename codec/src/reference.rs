//! A reference description: the layout of the source's device state, known before the migration.
//!
//! Given one (captured from a fresh VM of the source's configuration: the description a saved
//! stream of a `-S` VM ends with), the decoder accepts an ending of the device phase only if the
//! received description has the same layout: the same devices in the same order (name, instance,
//! version), and for every vmstate it lists (devices and subsections, by vmsd name) the same
//! fields with the same sizes. The cpreg arrays are the one exception: their length is the
//! stream's own `cpreg_vmstate_array_len`, which the walk checks at its position.
//!
//! Why that makes the ending exact (DESIGN.md, "How the end of the phase is recognised"): with
//! every size equal to the source's, the walk visits exactly the positions QEMU wrote headers,
//! subsection headers and footers at, and reads the subsection names QEMU wrote there, so it can
//! only land on the real EOF; bytes the guest controls are only ever inside fields, which the walk
//! steps over. A description the guest forged inside its own state either differs in layout
//! (refused as a candidate, the phase goes on) or describes the real layout, in which case its
//! walk would have to reach past the guest's bytes to the real EOF.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::json::{self, Json};
use crate::wire::{CPREG_INDEXES_FIELD, CPREG_VALUES_FIELD};

/// One field: name and bytes (size × array_len); `None` for the cpreg arrays (length from the
/// stream).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    bytes: Option<u64>,
}

/// One device entry: which section, which vmstate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Device {
    name: String,
    instance: u64,
    version: Option<u64>,
    vmsd_name: String,
}

/// How deep subsections may nest.
const MAX_SUBSECTION_DEPTH: usize = 16;

/// The layout a received description must have. Shared, not copied, by every migration's decoder
/// (a clone is three reference counts).
#[derive(Debug, Clone)]
pub struct ReferenceDescription {
    devices: Arc<[Device]>,
    /// Field list of every vmstate (device or subsection) by vmsd name. Ordered, so that when
    /// several vmstates differ the error names the same one every time (a `HashMap`'s random order
    /// named a different one from run to run: found by the `decode_structured` fuzz target).
    vmsds: Arc<BTreeMap<String, Vec<Field>>>,
    /// The fields of every device's vmstate, in device order (what the in-place check compares a
    /// device with, without a lookup by name).
    device_fields: Arc<[Vec<Field>]>,
}

/// Why a description does not have the reference's layout (or is no description at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutMismatch(pub String);

impl std::fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ReferenceDescription {
    /// Parse a description JSON text (as QEMU writes it after `QEMU_VM_VMDESCRIPTION`).
    pub fn parse(text: &[u8]) -> Result<Self, LayoutMismatch> {
        let document = json::parse(text).map_err(|e| {
            LayoutMismatch(format!(
                "reference description: not valid json at byte {}: {}",
                e.pos, e.message
            ))
        })?;
        Self::from_json(document.root())
            .map_err(|e| LayoutMismatch(format!("reference description: {e}")))
    }

    pub(crate) fn from_json(json: Json<'_>) -> Result<Self, LayoutMismatch> {
        let entries = json
            .get("devices")
            .and_then(Json::as_array)
            .ok_or_else(|| LayoutMismatch("no \"devices\" array".into()))?;
        let mut devices = Vec::with_capacity(entries.len());
        let mut vmsds = BTreeMap::new();
        for (index, entry) in entries.enumerate() {
            let device = device_of(entry)
                .ok_or_else(|| LayoutMismatch(format!("device entry {index} is incomplete")))?;
            collect_vmsds(entry, &device.vmsd_name, &mut vmsds, 0)?;
            devices.push(device);
        }
        let device_fields = devices
            .iter()
            .map(|device| vmsds.get(&device.vmsd_name).cloned().unwrap_or_default())
            .collect();
        Ok(ReferenceDescription {
            devices: devices.into(),
            vmsds: Arc::new(vmsds),
            device_fields,
        })
    }

    /// Whether `other` is this reference (a clone of it), not merely an equal one: what a
    /// cached check result is tied to.
    pub(crate) fn is_same(&self, other: &ReferenceDescription) -> bool {
        Arc::ptr_eq(&self.devices, &other.devices)
            && Arc::ptr_eq(&self.vmsds, &other.vmsds)
            && Arc::ptr_eq(&self.device_fields, &other.device_fields)
    }

    /// Number of devices the reference lists.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Does the received description (already parsed) have this layout?
    ///
    /// This runs on every migration while both QEMUs are stopped, so the answer "yes" is found by
    /// comparing the received description in place against the layout read at start-up
    /// ([`Self::matches`]: no strings copied, no map built). Only a description that does not
    /// match is read again the slow way, which names the first mismatch exactly as before.
    pub(crate) fn check(&self, received: Json<'_>) -> Result<(), LayoutMismatch> {
        if self.matches(received) {
            // Debug builds and the fuzz targets check the fast answer against the slow one.
            debug_assert_eq!(self.first_mismatch(received), Ok(()));
            return Ok(());
        }
        self.first_mismatch(received)
    }

    /// In-place comparison: `true` only if [`Self::first_mismatch`] would find none (every
    /// condition it checks is checked here; any doubt answers `false` and leaves the naming to it).
    fn matches(&self, received: Json<'_>) -> bool {
        let Some(entries) = received.get("devices").and_then(Json::as_array) else {
            return false;
        };
        if entries.len() != self.devices.len() {
            return false;
        }
        entries
            .zip(self.devices.iter().zip(self.device_fields.iter()))
            .all(|(entry, (want, want_fields))| {
                let Some(name) = entry.get("name").and_then(Json::as_str) else {
                    return false;
                };
                let vmsd_name = entry
                    .get("vmsd_name")
                    .and_then(Json::as_str)
                    .unwrap_or(name);
                name == want.name
                    && vmsd_name == want.vmsd_name
                    && entry.get("instance_id").and_then(Json::as_u64) == Some(want.instance)
                    && entry.get("version").and_then(Json::as_u64) == want.version
                    && self.vmsd_matches(entry, want_fields, 0)
            })
    }

    /// Whether one received vmstate has the fields `want` (the reference's for its name), and each
    /// of its subsections the fields the reference has for that subsection's name.
    fn vmsd_matches(&self, vmsd: Json<'_>, want: &[Field], depth: usize) -> bool {
        if depth > MAX_SUBSECTION_DEPTH {
            return false;
        }
        let fields = vmsd
            .get("fields")
            .and_then(Json::as_array)
            .unwrap_or_default();
        if fields.len() != want.len()
            || !fields
                .zip(want)
                .all(|(field, want)| field_matches(field, want))
        {
            return false;
        }
        vmsd.get("subsections")
            .and_then(Json::as_array)
            .unwrap_or_default()
            .all(|sub| {
                let Some(name) = sub.get("vmsd_name").and_then(Json::as_str) else {
                    return false;
                };
                self.vmsds
                    .get(name)
                    .is_some_and(|want| self.vmsd_matches(sub, want, depth + 1))
            })
    }

    /// The slow check: the received layout collected like the reference's, then compared; names
    /// the first difference.
    fn first_mismatch(&self, received: Json<'_>) -> Result<(), LayoutMismatch> {
        let other = Self::from_json(received)?;
        if other.devices.len() != self.devices.len() {
            return Err(LayoutMismatch(format!(
                "the description lists {} devices, the reference {}",
                other.devices.len(),
                self.devices.len()
            )));
        }
        for (index, (got, want)) in other.devices.iter().zip(self.devices.iter()).enumerate() {
            if got != want {
                return Err(LayoutMismatch(format!(
                    "device {index} is \"{}\" instance {} version {:?}, the reference has \"{}\" instance {} version {:?}",
                    got.name, got.instance, got.version, want.name, want.instance, want.version
                )));
            }
        }
        for (name, fields) in other.vmsds.iter() {
            match self.vmsds.get(name) {
                Some(want) if want == fields => {}
                Some(_) => {
                    return Err(LayoutMismatch(format!(
                        "the fields of vmstate \"{name}\" differ from the reference"
                    )))
                }
                None => {
                    return Err(LayoutMismatch(format!(
                        "vmstate \"{name}\" is not in the reference description"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// Whether a received field is `want`: same name, same bytes (both cpreg arrays, or both sized).
fn field_matches(field: Json<'_>, want: &Field) -> bool {
    let name = field_name(field);
    if name != want.name {
        return false;
    }
    if is_cpreg_array(name) {
        want.bytes.is_none()
    } else {
        field_bytes(field).is_some_and(|bytes| want.bytes == Some(bytes))
    }
}

fn field_name<'t>(field: Json<'t>) -> &'t str {
    field.get("name").and_then(Json::as_str).unwrap_or("?")
}

/// The cpreg arrays' length is the stream's own, not part of the layout.
fn is_cpreg_array(field_name: &str) -> bool {
    matches!(field_name, CPREG_INDEXES_FIELD | CPREG_VALUES_FIELD)
}

/// size × array_len (array_len 1 when absent); `None` if either is not a u64 or it overflows.
fn field_bytes(field: Json<'_>) -> Option<u64> {
    let size = field.get("size").and_then(Json::as_u64)?;
    let count = match field.get("array_len") {
        Some(n) => n.as_u64()?,
        None => 1,
    };
    size.checked_mul(count)
}

fn device_of(entry: Json<'_>) -> Option<Device> {
    let name = entry.get("name")?.as_str()?.to_string();
    Some(Device {
        vmsd_name: entry
            .get("vmsd_name")
            .and_then(Json::as_str)
            .unwrap_or(&name)
            .to_string(),
        instance: entry.get("instance_id")?.as_u64()?,
        version: entry.get("version").and_then(Json::as_u64),
        name,
    })
}

fn collect_vmsds(
    vmsd: Json<'_>,
    name: &str,
    out: &mut BTreeMap<String, Vec<Field>>,
    depth: usize,
) -> Result<(), LayoutMismatch> {
    if depth > MAX_SUBSECTION_DEPTH {
        return Err(LayoutMismatch("subsections nested too deeply".into()));
    }
    let mut fields = Vec::new();
    for field in vmsd
        .get("fields")
        .and_then(Json::as_array)
        .unwrap_or_default()
    {
        let field_name = field_name(field);
        let bytes = if is_cpreg_array(field_name) {
            None
        } else {
            Some(field_bytes(field).ok_or_else(|| {
                LayoutMismatch(format!(
                    "field \"{field_name}\" of \"{name}\" has no valid size"
                ))
            })?)
        };
        fields.push(Field {
            name: field_name.to_string(),
            bytes,
        });
    }
    // Several instances of one device share their vmstate: the same layout each time.
    if let Some(seen) = out.get(name) {
        if *seen != fields {
            return Err(LayoutMismatch(format!(
                "vmstate \"{name}\" appears with two different field lists"
            )));
        }
    }
    out.insert(name.to_string(), fields);
    for sub in vmsd
        .get("subsections")
        .and_then(Json::as_array)
        .unwrap_or_default()
    {
        let sub_name = sub
            .get("vmsd_name")
            .and_then(Json::as_str)
            .ok_or_else(|| LayoutMismatch(format!("a subsection of \"{name}\" has no name")))?;
        collect_vmsds(sub, sub_name, out, depth + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = r#"{"devices": [{"name": "cpu", "instance_id": 0, "version": 22, "fields": [{"name": "a", "size": 4}], "subsections": [{"vmsd_name": "cpu/irq-line-state", "fields": [{"name": "b", "size": 4}]}]}]}"#;
    /// Both vmstates' fields differ from the reference.
    const BOTH_DIFFER: &str = r#"{"devices": [{"name": "cpu", "instance_id": 0, "version": 22, "fields": [{"name": "a", "size": 8}], "subsections": [{"vmsd_name": "cpu/irq-line-state", "fields": [{"name": "b", "size": 8}]}]}]}"#;

    /// A reference with two devices, one sharing its vmstate, subsections nested two deep.
    const LAYOUT: &str = concat!(
        r#"{"devices": [{"name": "cpu", "instance_id": 0, "version": 22, "fields": [{"name": "a", "size": 4}, {"name": "cpreg_vmstate_indexes", "size": 8, "array_len": 3}, {"name": "v", "size": 2, "array_len": 3}], "#,
        r#""subsections": [{"vmsd_name": "cpu/irq-line-state", "fields": [{"name": "b", "size": 4}], "subsections": [{"vmsd_name": "cpu/deep", "fields": []}]}, {"vmsd_name": "cpu/other", "fields": [{"name": "c", "size": 1}]}]}, "#,
        r#"{"name": "cpu", "instance_id": 1, "version": 22, "fields": [{"name": "a", "size": 4}, {"name": "cpreg_vmstate_indexes", "size": 8, "array_len": 5}, {"name": "v", "size": 2, "array_len": 3}]}, "#,
        r#"{"name": "gic", "instance_id": 0, "vmsd_name": "arm_gic", "fields": [{"name": "g", "size": 16}]}]}"#
    );

    /// The in-place check accepts exactly what the slow one accepts, and a refusal names the same
    /// mismatch as before (the slow check names it).
    #[test]
    fn the_in_place_check_agrees_with_the_slow_one() {
        let reference =
            ReferenceDescription::parse(LAYOUT.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let variants: Vec<(String, bool)> = vec![
            (LAYOUT.to_string(), true),
            // A subsection the source did not send this time: still the same layout.
            (LAYOUT.replace(r#", {"vmsd_name": "cpu/other", "fields": [{"name": "c", "size": 1}]}"#, ""), true),
            // The cpreg arrays' length is the stream's own.
            (LAYOUT.replace(r#""array_len": 5"#, r#""array_len": 7"#), true),
            (LAYOUT.replace(r#""size": 16"#, r#""size": 15"#), false),
            (LAYOUT.replace(r#""size": 2, "array_len": 3}], "subsections""#, r#""size": 2, "array_len": 4}], "subsections""#), false),
            (LAYOUT.replace(r#""cpu/deep""#, r#""cpu/deeper""#), false),
            (LAYOUT.replace(r#""vmsd_name": "cpu/deep", "#, ""), false),
            (LAYOUT.replace(r#""instance_id": 1"#, r#""instance_id": 2"#), false),
            (LAYOUT.replacen(r#""version": 22, "#, "", 1), false),
            (LAYOUT.replacen(r#""version": 22"#, r#""version": 23"#, 1), false),
            (LAYOUT.replacen(r#""version": 22"#, r#""version": "22""#, 1), false),
            (LAYOUT.replace(r#""vmsd_name": "arm_gic", "#, ""), false),
            (LAYOUT.replace(r#"{"name": "c", "size": 1}"#, r#"{"name": "c", "size": 1}, {"name": "d", "size": 1}"#), false),
            (LAYOUT.replace(r#"{"name": "g", "size": 16}"#, r#"{"name": "g", "size": 16, "array_len": "x"}"#), false),
            (LAYOUT.replace(r#"{"name": "g", "size": 16}"#, r#"{"size": 16}"#), false),
            (LAYOUT.replace(r#"{"name": "cpu", "instance_id": 1"#, r#"{"name": "cpu""#), false),
            (LAYOUT.replace(r#", {"name": "gic", "instance_id": 0, "vmsd_name": "arm_gic", "fields": [{"name": "g", "size": 16}]}"#, ""), false),
            // A device the reference does not have.
            (
                format!(
                    r#"{}, {{"name": "x", "instance_id": 0, "fields": []}}]}}"#,
                    LAYOUT.strip_suffix("]}").unwrap_or(LAYOUT)
                ),
                false,
            ),
            (r#"{"devices": {}}"#.to_string(), false),
        ];
        for (index, (text, accepted)) in variants.into_iter().enumerate() {
            // Every variant but the first must have changed the layout text.
            assert_eq!(index == 0, text == LAYOUT, "variant {index} did not apply");
            let document =
                json::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{}: {text}", e.message));
            let received = document.root();
            let slow = reference.first_mismatch(received);
            assert_eq!(slow.is_ok(), accepted, "{slow:?}: {text}");
            assert_eq!(reference.matches(received), accepted, "{text}");
            assert_eq!(reference.check(received), slow, "{text}");
        }
    }

    #[test]
    fn the_same_mismatch_is_named_every_time() {
        let errors: Vec<String> = (0..16)
            .map(|_| {
                let reference = ReferenceDescription::parse(REFERENCE.as_bytes())
                    .unwrap_or_else(|e| panic!("{e}"));
                let received =
                    json::parse(BOTH_DIFFER.as_bytes()).unwrap_or_else(|e| panic!("{}", e.message));
                match reference.check(received.root()) {
                    Err(mismatch) => mismatch.0,
                    Ok(()) => "accepted".into(),
                }
            })
            .collect();
        assert_eq!(
            errors[0],
            "the fields of vmstate \"cpu\" differ from the reference"
        );
        assert!(errors.iter().all(|e| *e == errors[0]), "{errors:?}");
    }
}
