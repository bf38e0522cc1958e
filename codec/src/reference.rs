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

/// The layout a received description must have.
#[derive(Debug, Clone)]
pub struct ReferenceDescription {
    devices: Vec<Device>,
    /// Field list of every vmstate (device or subsection) by vmsd name. Ordered, so that when
    /// several vmstates differ the error names the same one every time (a `HashMap`'s random order
    /// named a different one from run to run: found by the `decode_structured` fuzz target).
    vmsds: BTreeMap<String, Vec<Field>>,
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
        Ok(ReferenceDescription { devices, vmsds })
    }

    /// Number of devices the reference lists.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Does the received description (already parsed) have this layout?
    pub(crate) fn check(&self, received: Json<'_>) -> Result<(), LayoutMismatch> {
        let other = Self::from_json(received)?;
        if other.devices.len() != self.devices.len() {
            return Err(LayoutMismatch(format!(
                "the description lists {} devices, the reference {}",
                other.devices.len(),
                self.devices.len()
            )));
        }
        for (index, (got, want)) in other.devices.iter().zip(&self.devices).enumerate() {
            if got != want {
                return Err(LayoutMismatch(format!(
                    "device {index} is \"{}\" instance {} version {:?}, the reference has \"{}\" instance {} version {:?}",
                    got.name, got.instance, got.version, want.name, want.instance, want.version
                )));
            }
        }
        for (name, fields) in &other.vmsds {
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
    if depth > 16 {
        return Err(LayoutMismatch("subsections nested too deeply".into()));
    }
    let mut fields = Vec::new();
    for field in vmsd
        .get("fields")
        .and_then(Json::as_array)
        .unwrap_or_default()
    {
        let field_name = field.get("name").and_then(Json::as_str).unwrap_or("?");
        let bytes = if matches!(field_name, CPREG_INDEXES_FIELD | CPREG_VALUES_FIELD) {
            None
        } else {
            let size = field.get("size").and_then(Json::as_u64);
            let count = match field.get("array_len") {
                Some(n) => n.as_u64(),
                None => Some(1),
            };
            Some(
                size.zip(count)
                    .and_then(|(s, n)| s.checked_mul(n))
                    .ok_or_else(|| {
                        LayoutMismatch(format!(
                            "field \"{field_name}\" of \"{name}\" has no valid size"
                        ))
                    })?,
            )
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
