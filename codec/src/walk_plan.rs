//! A walk plan: what the walk of the device state reads, compiled once from an accepted
//! description and kept beside its parse in the description cache (`description_cache.rs`).
//!
//! The walk (`device_phase.rs`) asks the parsed description, for every field of every device,
//! for its `name`, `size` and `array_len` by key. A QEMU of one configuration sends the same
//! description on every migration, so those answers are the same every time: the plan is them,
//! in walk order, as a flat list of steps (runs of fields as one byte count, subsection headers,
//! subsection ends) per device, with where a `cpu` section's cpreg fields sit. A cache hit walks
//! the stream with the plan instead of the JSON.
//!
//! Same answer by construction: the plan holds exactly the values the lookup walk reads, and the
//! plan walk checks every byte the lookup walk checks, in the same order, with the same errors.
//! A run of fields is checked as one sum (sizes are non-negative, so the sum runs past the end
//! exactly when one of its fields does); only then are its fields visited one by one to name the
//! one that does. What the lookup walk reports about the description alone (a field without a
//! valid size, a subsection without a name, nesting too deep, a missing `devices` array ...) does
//! not depend on the stream: a description with such a defect gets no plan ([`WalkPlan::compile`]
//! returns `None`) and is walked by lookup, as before. `tests/walk_plan.rs` compares both walks
//! on every real capture and on damaged copies; the `description` fuzz target on arbitrary input.

use std::ops::Range;

use crate::json::Json;
use crate::wire::{CPREG_ARRAY_LEN_FIELD, CPREG_INDEXES_FIELD, CPREG_VALUES_FIELD, IDSTR_CPU};

/// Deepest subsection nesting the walk accepts (a section's own vmstate is depth 0).
pub(crate) const MAX_SUBSECTION_DEPTH: usize = 16;

/// The compiled walk of one description.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WalkPlan {
    pub(crate) devices: Vec<DevicePlan>,
    steps: Vec<PlanStep>,
    /// Every field (name for errors, bytes), in walk order: a [`PlanStep::Fields`] run indexes it.
    fields: Vec<(Box<str>, usize)>,
    /// Top-level subsections of `cpu` sections (what the walk records of them).
    tops: Vec<TopSubsection>,
}

/// One device entry of the description.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DevicePlan {
    pub(crate) name: Box<str>,
    pub(crate) instance_id: u64,
    /// The described section version, if the entry gives one as a number.
    pub(crate) version: Option<u64>,
    steps: Range<usize>,
    /// For a `cpu` device: where its cpreg fields sit.
    pub(crate) cpregs: Option<CpuFields>,
}

/// One thing the walk reads, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PlanStep {
    /// Consecutive fields: `bytes` in all; `fields` indexes [`WalkPlan::fields`].
    Fields {
        bytes: usize,
        fields: Range<usize>,
    },
    /// A subsection header (`05`, counted name, be32 version), then its own steps until the
    /// matching [`PlanStep::End`].
    Subsection {
        name: Box<str>,
        /// The described version, if given as a number (the header must carry it).
        version: Option<u64>,
        /// For a top-level subsection of a `cpu` section: its index in [`WalkPlan::tops`].
        top: Option<usize>,
    },
    End,
}

/// What the walk records of a top-level subsection of a `cpu` section, from the description.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TopSubsection {
    pub(crate) name: String,
    pub(crate) nested: Vec<String>,
    /// Its object's span in the description text.
    pub(crate) json_item: Range<usize>,
}

/// Where a `cpu` section's cpreg fields sit, as offsets from the start of its payload (the last
/// field of each name, as the lookup walk finds it).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct CpuFields {
    /// `cpreg_vmstate_array_len`: (offset, bytes).
    pub(crate) array_len: Option<(usize, usize)>,
    pub(crate) indexes: Option<ArrayField>,
    pub(crate) values: Option<ArrayField>,
}

/// One cpreg array field of the description.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArrayField {
    pub(crate) offset: usize,
    pub(crate) size: Option<u64>,
    pub(crate) array_len: Option<u64>,
    /// Span of the `array_len` number in the description text.
    pub(crate) array_len_span: Option<Range<usize>>,
}

impl CpuFields {
    /// Read from a `cpu` device's description (`None`: no `fields` array). Sizes are those the
    /// walk checked; an invalid one counts 0, as it never reaches here.
    pub(crate) fn from_description(device: Json<'_>) -> Option<CpuFields> {
        let fields = device.get("fields")?.as_array()?;
        let mut cpu = CpuFields::default();
        let mut offset = 0usize;
        for field in fields {
            let size = field_size(field).unwrap_or(0);
            match field.get("name").and_then(Json::as_str) {
                Some(CPREG_ARRAY_LEN_FIELD) => cpu.array_len = Some((offset, size)),
                Some(CPREG_INDEXES_FIELD) => cpu.indexes = Some(ArrayField::new(field, offset)),
                Some(CPREG_VALUES_FIELD) => cpu.values = Some(ArrayField::new(field, offset)),
                _ => {}
            }
            offset = offset.saturating_add(size);
        }
        Some(cpu)
    }
}

impl ArrayField {
    fn new(field: Json<'_>, offset: usize) -> Self {
        let array_len = field.get("array_len");
        ArrayField {
            offset,
            size: field.get("size").and_then(Json::as_u64),
            array_len: array_len.and_then(Json::as_u64),
            array_len_span: array_len.and_then(Json::span),
        }
    }
}

/// Bytes one description field occupies: size × array_len (compressed arrays) or size.
pub(crate) fn field_size(field: Json<'_>) -> Option<usize> {
    let size = usize::try_from(field.get("size")?.as_u64()?).ok()?;
    match field.get("array_len") {
        Some(n) => size.checked_mul(usize::try_from(n.as_u64()?).ok()?),
        None => Some(size),
    }
}

/// The `vmsd_name` of every subsection nested in `desc`, depth first.
pub(crate) fn nested_names(desc: Json<'_>, out: &mut Vec<String>) {
    for sub in desc
        .get("subsections")
        .and_then(Json::as_array)
        .unwrap_or_default()
    {
        if let Some(name) = sub.get("vmsd_name").and_then(Json::as_str) {
            out.push(name.to_owned());
        }
        nested_names(sub, out);
    }
}

impl WalkPlan {
    /// The plan of `desc`, or `None` if the lookup walk would report a defect of the
    /// description itself somewhere (see the module comment).
    pub(crate) fn compile(desc: Json<'_>) -> Option<WalkPlan> {
        let mut plan = WalkPlan {
            devices: Vec::new(),
            steps: Vec::new(),
            fields: Vec::new(),
            tops: Vec::new(),
        };
        for device in desc.get("devices")?.as_array()? {
            let name = device.get("name").and_then(Json::as_str)?;
            let instance_id = device.get("instance_id").and_then(Json::as_u64)?;
            let is_cpu = name == IDSTR_CPU;
            let first = plan.steps.len();
            plan.vmsd(device, 0, is_cpu)?;
            let cpregs = if is_cpu {
                CpuFields::from_description(device)
            } else {
                None
            };
            if cpregs
                .as_ref()
                .and_then(|cpu| cpu.array_len)
                .is_some_and(|(_, size)| size != 4)
            {
                // The lookup walk refuses a cpu section with this description whatever the
                // stream holds.
                return None;
            }
            plan.devices.push(DevicePlan {
                name: name.into(),
                instance_id,
                version: device.get("version").and_then(Json::as_u64),
                steps: first..plan.steps.len(),
                cpregs,
            });
        }
        Some(plan)
    }

    fn vmsd(&mut self, desc: Json<'_>, depth: usize, is_cpu: bool) -> Option<()> {
        if depth > MAX_SUBSECTION_DEPTH {
            return None;
        }
        if let Some(fields) = desc.get("fields") {
            let first = self.fields.len();
            let mut bytes = 0usize;
            for field in fields.as_array()? {
                let size = field_size(field)?;
                bytes = bytes.checked_add(size)?;
                let name = field.get("name").and_then(Json::as_str).unwrap_or("?");
                self.fields.push((name.into(), size));
            }
            if self.fields.len() > first {
                self.steps.push(PlanStep::Fields {
                    bytes,
                    fields: first..self.fields.len(),
                });
            }
        }
        if let Some(subs) = desc.get("subsections") {
            for sub in subs.as_array()? {
                let name = sub.get("vmsd_name").and_then(Json::as_str)?;
                let top = if depth == 0 && is_cpu {
                    let mut nested = Vec::new();
                    nested_names(sub, &mut nested);
                    self.tops.push(TopSubsection {
                        name: name.to_owned(),
                        nested,
                        json_item: sub.span()?,
                    });
                    Some(self.tops.len() - 1)
                } else {
                    None
                };
                self.steps.push(PlanStep::Subsection {
                    name: name.into(),
                    version: sub.get("version").and_then(Json::as_u64),
                    top,
                });
                self.vmsd(sub, depth + 1, is_cpu)?;
                self.steps.push(PlanStep::End);
            }
        }
        Some(())
    }

    /// The steps of one device.
    pub(crate) fn steps(&self, device: &DevicePlan) -> &[PlanStep] {
        self.steps.get(device.steps.clone()).unwrap_or_default()
    }

    /// The fields of one run: (name, bytes).
    pub(crate) fn fields(&self, run: &Range<usize>) -> &[(Box<str>, usize)] {
        self.fields.get(run.clone()).unwrap_or_default()
    }

    pub(crate) fn top(&self, index: usize) -> Option<&TopSubsection> {
        self.tops.get(index)
    }
}
