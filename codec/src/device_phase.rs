//! The held device-state phase: FULL sections, EOF and the description, walked with the
//! description (DESIGN.md, "Device state is delimited exactly, never by scanning").
//!
//! ```text
//! held bytes:  FULL s0 .. 7E s0 | FULL s1 .. 7E s1 | ... | 00 (EOF) | 06 | be32 len | JSON (len bytes)
//!              ^ walked with the description's per-field sizes   ^ must land exactly here
//! ```
//!
//! Non-iterable sections carry no length: their payload size is the sum of the sizes the
//! description lists: Σ fields (size × array_len) + Σ subsections (`05`, counted name, be32
//! version, then their own payload). The walk checks every section header against its description
//! entry, every subsection header, every footer, and that the sections end exactly at EOF.
//!
//! The ARM `cpu` section's cpreg arrays are located from the description's field list
//! (`cpreg_vmstate_array_len`, `cpreg_vmstate_indexes`, `cpreg_vmstate_values`), not from a fixed
//! offset. Replacing them re-encodes that section and patches the two `array_len` numbers in the
//! description text (and its be32 length). The walk also records each `cpu` section's top-level
//! subsections, so that one the destination cannot load can be removed: its bytes leave the
//! section and its object leaves the description's `subsections` array (whether that loses guest
//! state is decided outside the codec). Every other byte is re-emitted as received.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::description_cache::DescriptionCache;
use crate::error::{DecodeError, SectionRef};
use crate::json::{self, Json};
use crate::limits::Limits;
use crate::reader::{self, Reader};
use crate::reference::ReferenceDescription;
use crate::walk_plan::{
    field_size, nested_names, CpuFields, DevicePlan, PlanStep, WalkPlan, MAX_SUBSECTION_DEPTH,
};
use crate::wire::*;

/// One non-iterable device section inside the held phase.
#[derive(Debug, Clone)]
pub struct DeviceSection {
    pub section_id: u32,
    pub idstr: String,
    pub instance: u32,
    pub version: u32,
    /// Header + payload + footer, as received.
    pub wire_len: usize,
}

/// One vCPU's cpreg arrays: (id, value) in stream order.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuRegisters {
    pub instance: u32,
    pub section_version: u32,
    pub registers: Vec<(u64, u64)>,
}

/// One top-level subsection of a `cpu` section, as received (what the destination must be able
/// to load, or what migproxy may remove).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSubsection {
    pub instance: u32,
    /// `vmsd_name`, e.g. `cpu/wfxt-timer`.
    pub name: String,
    pub version: u32,
    /// Names of the subsections nested inside it (the destination must know them too).
    pub nested: Vec<String>,
    /// Its fields' bytes (after the subsection header), as received.
    pub payload: Bytes,
}

/// Where one top-level `cpu` subsection sits in the held bytes and in the description.
#[derive(Debug, Clone)]
struct SubsectionSlot {
    instance: u32,
    name: String,
    version: u32,
    nested: Vec<String>,
    /// From its `05` header byte to its end.
    wire: Range<usize>,
    payload: Range<usize>,
    /// Its object in the description's `subsections` array (held positions).
    json_item: Range<usize>,
    /// First item start to last item end of that array: rewritten as a whole on removal, so the
    /// commas between the kept items stay right.
    json_items: Range<usize>,
    removed: bool,
}

/// Where one `cpu` section keeps its cpreg arrays.
#[derive(Debug, Clone)]
struct CpuSlot {
    instance: u32,
    section_version: u32,
    /// Position of the be32 `cpreg_vmstate_array_len` in the held bytes.
    array_len_pos: usize,
    count: usize,
    /// Spans (in the held bytes) of the description's `array_len` numbers of the two arrays.
    json_spans: Vec<Range<usize>>,
    replacement: Option<Vec<(u64, u64)>>,
}

impl CpuSlot {
    fn arrays_end(&self) -> usize {
        // Checked when the slot was built: the arrays lie inside the held bytes.
        self.array_len_pos + 4 + 16 * self.count
    }

    /// Bytes a replacement with `registers` registers adds to the output, against the arrays and
    /// `array_len` numbers as received (`None`: not replaced, 0). What `edits` writes for it.
    fn growth(&self, registers: Option<usize>) -> i64 {
        let Some(registers) = registers else {
            return 0;
        };
        let size = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let arrays = size(16)
            .saturating_mul(size(registers))
            .saturating_add(4)
            .saturating_sub(size(self.arrays_end() - self.array_len_pos));
        let digits = size(decimal_digits(registers));
        self.json_spans.iter().fold(arrays, |growth, span| {
            growth.saturating_add(digits.saturating_sub(size(span.len())))
        })
    }
}

/// The whole device-state phase, verified against the description.
pub struct DeviceState {
    held: Bytes,
    /// Stream offset of the first held byte.
    base_offset: u64,
    sections: Vec<DeviceSection>,
    cpus: Vec<CpuSlot>,
    subsections: Vec<SubsectionSlot>,
    /// Position of the be32 description length (after EOF and QEMU_VM_VMDESCRIPTION).
    desc_len_pos: usize,
    /// Bytes the replaced cpreg arrays add to the output (negative: remove), kept as each is
    /// set: the budget check of one vCPU must not re-encode every vCPU before it (quadratic in
    /// vCPUs at the budgets: 512 x 4096 registers).
    cpregs_growth: i64,
    /// Whether any subsection was removed (then the exact output length is computed).
    subsections_removed: bool,
    /// The ending was confirmed by a reference description.
    confirmed: bool,
    /// The description was the listener's cached one (not parsed again).
    description_reused: bool,
    max_cpregs: usize,
    max_output: usize,
}

impl std::fmt::Debug for DeviceState {
    // Device payloads are guest state: show the layout only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceState")
            .field("base_offset", &self.base_offset)
            .field("len", &self.held.len())
            .field("sections", &self.sections.len())
            .field("cpus", &self.cpus.len())
            .finish()
    }
}

impl DeviceState {
    /// Every device section, in stream order (layout as received).
    pub fn sections(&self) -> &[DeviceSection] {
        &self.sections
    }

    /// Every `cpu` section's registers, in stream order (replacements included).
    pub fn cpus(&self) -> Vec<CpuRegisters> {
        self.cpus
            .iter()
            .map(|slot| CpuRegisters {
                instance: slot.instance,
                section_version: slot.section_version,
                registers: match &slot.replacement {
                    Some(regs) => regs.clone(),
                    None => self.original_registers(slot),
                },
            })
            .collect()
    }

    /// How many `cpu` sections have cpreg arrays.
    pub fn cpu_count(&self) -> usize {
        self.cpus.len()
    }

    /// The registers of the `index`th `cpu` section (stream order, replacement included) into
    /// `into` (cleared first; one buffer serves every vCPU): its instance, or `None` past the
    /// last one.
    pub fn read_cpu(&self, index: usize, into: &mut Vec<(u64, u64)>) -> Option<u32> {
        let slot = self.cpus.get(index)?;
        into.clear();
        match &slot.replacement {
            Some(regs) => into.extend_from_slice(regs),
            None => {
                let ids_pos = slot.array_len_pos + 4;
                let values_pos = ids_pos + 8 * slot.count;
                into.reserve(slot.count);
                // Both arrays are in the held bytes (checked when they were parsed): one bounds
                // check per array, not two per register.
                let arrays = self
                    .held
                    .get(ids_pos..values_pos)
                    .zip(self.held.get(values_pos..values_pos + 8 * slot.count));
                match arrays {
                    Some((ids, values)) => {
                        let (ids, _) = ids.as_chunks::<8>();
                        let (values, _) = values.as_chunks::<8>();
                        into.extend(ids.iter().zip(values).map(|(&id, &value)| {
                            (u64::from_be_bytes(id), u64::from_be_bytes(value))
                        }));
                    }
                    None => {
                        let mut ids = Reader::at(&self.held, ids_pos);
                        let mut values = Reader::at(&self.held, values_pos);
                        into.extend(
                            (0..slot.count).map_while(|_| Some((ids.be64()?, values.be64()?))),
                        );
                    }
                }
            }
        }
        Some(slot.instance)
    }

    /// Every top-level subsection of every `cpu` section, in stream order (removed ones left out).
    pub fn cpu_subsections(&self) -> Vec<CpuSubsection> {
        self.subsections
            .iter()
            .filter(|slot| !slot.removed)
            .map(|slot| CpuSubsection {
                instance: slot.instance,
                name: slot.name.clone(),
                version: slot.version,
                nested: slot.nested.clone(),
                payload: self.held.slice(slot.payload.clone()),
            })
            .collect()
    }

    /// Leave one top-level subsection of one vCPU's `cpu` section out of the encoded stream and
    /// out of the description. The caller decides that no guest state is lost by doing so.
    pub fn remove_cpu_subsection(&mut self, instance: u32, name: &str) -> Result<(), DecodeError> {
        let slot = self
            .subsections
            .iter_mut()
            .find(|slot| slot.instance == instance && slot.name == name && !slot.removed)
            .ok_or_else(|| DecodeError::CpuRegisters {
                instance,
                message: format!("no subsection {name:?} in this cpu section"),
            })?;
        slot.removed = true;
        self.subsections_removed = true;
        Ok(())
    }

    fn original_registers(&self, slot: &CpuSlot) -> Vec<(u64, u64)> {
        let ids_pos = slot.array_len_pos + 4;
        let values_pos = ids_pos + 8 * slot.count;
        let mut ids = Reader::at(&self.held, ids_pos);
        let mut values = Reader::at(&self.held, values_pos);
        (0..slot.count)
            .map_while(|_| Some((ids.be64()?, values.be64()?)))
            .collect()
    }

    /// Replace one vCPU's cpreg arrays; `regs` sorted strictly ascending by id.
    pub fn set_cpregs(&mut self, instance: u32, regs: &[(u64, u64)]) -> Result<(), DecodeError> {
        self.replace_cpregs(instance, regs.to_vec())
    }

    /// [`set_cpregs`](Self::set_cpregs) keeping `regs` itself (no copy).
    pub fn replace_cpregs(
        &mut self,
        instance: u32,
        regs: Vec<(u64, u64)>,
    ) -> Result<(), DecodeError> {
        let err = |message: String| DecodeError::CpuRegisters { instance, message };
        if let Some(pair) = regs.windows(2).find(|w| w[0].0 >= w[1].0) {
            return Err(err(format!(
                "register ids must be strictly ascending: 0x{:x} is followed by 0x{:x}",
                pair[0].0, pair[1].0
            )));
        }
        // QEMU reads the count as a positive int32 (VMSTATE_INT32_POSITIVE_LE).
        if i32::try_from(regs.len()).is_err() {
            return Err(err(format!(
                "{} registers do not fit an int32 count",
                regs.len()
            )));
        }
        if regs.len() > self.max_cpregs {
            return Err(err(format!(
                "{} registers exceed the limit of {} registers per vCPU",
                regs.len(),
                self.max_cpregs
            )));
        }
        let index = self
            .cpu_position(instance)
            .ok_or_else(|| err("no cpu section with cpreg arrays for this instance".into()))?;
        let Some(slot) = self.cpus.get_mut(index) else {
            return Err(err(
                "no cpu section with cpreg arrays for this instance".into()
            ));
        };
        if slot.json_spans.len() != 2 {
            return Err(err(
                "the description does not give the cpreg arrays' array_len; cannot patch it".into(),
            ));
        }
        let growth = self
            .cpregs_growth
            .saturating_sub(slot.growth(slot.replacement.as_ref().map(Vec::len)))
            .saturating_add(slot.growth(Some(regs.len())));
        let previous = slot.replacement.replace(regs);
        let output = if self.subsections_removed {
            // Rare (an idle subsection removed before the rewrite): the exact length.
            self.wire_len()
        } else {
            let held = i64::try_from(self.held.len()).unwrap_or(i64::MAX);
            usize::try_from(held.saturating_add(growth)).unwrap_or(usize::MAX)
        };
        if output > self.max_output {
            if let Some(slot) = self.cpus.get_mut(index) {
                slot.replacement = previous;
            }
            return Err(err(format!(
                "the rewritten device state would be {output} bytes, over the limit of {} bytes",
                self.max_output
            )));
        }
        self.cpregs_growth = growth;
        Ok(())
    }

    /// Where the `cpu` section of `instance` is in `cpus` (there is at most one: the walk refuses
    /// a second). QEMU numbers vCPUs 0, 1, ... in stream order, so position `instance` is looked
    /// at first; no per-vCPU map is built.
    fn cpu_position(&self, instance: u32) -> Option<usize> {
        let guess = usize::try_from(instance).ok()?;
        match self.cpus.get(guess) {
            Some(slot) if slot.instance == instance => Some(guess),
            _ => self.cpus.iter().position(|slot| slot.instance == instance),
        }
    }

    fn replaced(&self) -> impl Iterator<Item = (&CpuSlot, &Vec<(u64, u64)>)> {
        self.cpus
            .iter()
            .filter_map(|slot| slot.replacement.as_ref().map(|regs| (slot, regs)))
    }

    fn is_modified(&self) -> bool {
        self.replaced().next().is_some() || self.subsections.iter().any(|slot| slot.removed)
    }

    /// What changes in the held bytes, as (span, replacement) sorted by span and disjoint: the
    /// replaced cpreg arrays and removed subsections in the sections, their `array_len` numbers
    /// and `subsections` arrays in the description. Everything between is re-emitted as received.
    /// Replacements refer to what they are made of (written straight into the output by
    /// [`Replacement::write`], no buffer of their own), except a shortened `subsections` array.
    fn edits(&self) -> Vec<(Range<usize>, Replacement<'_>)> {
        let mut edits = Vec::new();
        for (slot, regs) in self.replaced() {
            edits.push((
                slot.array_len_pos..slot.arrays_end(),
                Replacement::Arrays(regs),
            ));
            for span in &slot.json_spans {
                edits.push((span.clone(), Replacement::Count(regs.len())));
            }
        }
        for items in self.removal_runs() {
            for item in items.iter().filter(|item| item.removed) {
                edits.push((item.wire.clone(), Replacement::Bytes(Vec::new())));
            }
            let separator = self.separator(items);
            let kept: Vec<&[u8]> = items
                .iter()
                .filter(|item| !item.removed)
                .map(|item| &self.held[item.json_item.clone()])
                .collect();
            edits.push((
                items[0].json_items.clone(),
                Replacement::Bytes(kept.join(separator)),
            ));
        }
        edits.sort_by_key(|(span, _)| span.start);
        edits
    }

    /// Bytes `encode` writes: counted from the edits' sizes without building them (it runs
    /// after every vCPU's `set_cpregs`, while both QEMUs are stopped).
    pub fn wire_len(&self) -> usize {
        if !self.is_modified() {
            return self.held.len();
        }
        let mut len = self.held.len();
        for (slot, regs) in self.replaced() {
            len = len - (slot.arrays_end() - slot.array_len_pos) + 4 + 16 * regs.len();
            for span in &slot.json_spans {
                len = len - span.len() + decimal_digits(regs.len());
            }
        }
        for items in self.removal_runs() {
            for item in items.iter().filter(|item| item.removed) {
                len -= item.wire.len();
            }
            let kept: Vec<&SubsectionSlot> = items.iter().filter(|item| !item.removed).collect();
            let joined = kept.iter().map(|item| item.json_item.len()).sum::<usize>()
                + self.separator(items).len() * kept.len().saturating_sub(1);
            len = len - items[0].json_items.len() + joined;
        }
        len
    }

    /// The subsection slots of each `cpu` section that has a removed one (stream order, so each
    /// section's subsections are one contiguous run).
    fn removal_runs(&self) -> impl Iterator<Item = &[SubsectionSlot]> {
        self.subsections
            .chunk_by(|a, b| a.json_items == b.json_items)
            .filter(|items| items.iter().any(|item| item.removed))
    }

    /// What separates the items of a description `subsections` array, as received.
    fn separator(&self, items: &[SubsectionSlot]) -> &[u8] {
        match items {
            [first, second, ..] => &self.held[first.json_item.end..second.json_item.start],
            _ => b", ".as_slice(),
        }
    }

    /// What [`encode`](Self::encode) writes, as one buffer: the received bytes themselves
    /// (no copy) when nothing was changed.
    pub fn to_bytes(&self) -> Bytes {
        if !self.is_modified() {
            return self.held.clone();
        }
        let mut out = BytesMut::with_capacity(self.wire_len());
        self.encode(&mut out);
        out.freeze()
    }

    /// The sections alone (up to EOF), with the replaced cpreg arrays and removed subsections:
    /// what a postcopy package carries (`package.rs`).
    pub(crate) fn sections_bytes(&self) -> Bytes {
        let eof_pos = self.desc_len_pos - 2;
        if !self.is_modified() {
            return self.held.slice(..eof_pos);
        }
        let mut out = BytesMut::with_capacity(self.wire_len());
        let mut cursor = 0;
        for (span, replacement) in self.edits().iter().filter(|(span, _)| span.end <= eof_pos) {
            out.extend_from_slice(&self.held[cursor..span.start]);
            replacement.write(&mut out);
            cursor = span.end;
        }
        out.extend_from_slice(&self.held[cursor..eof_pos]);
        out.freeze()
    }

    /// Sections + EOF + (patched) description.
    pub fn encode(&self, dst: &mut BytesMut) {
        if !self.is_modified() {
            dst.extend_from_slice(&self.held);
            return;
        }
        let edits = self.edits();
        let json_start = self.desc_len_pos + 4;
        let mut description_len = self.held.len() - json_start;
        for (span, replacement) in edits.iter().filter(|(span, _)| span.start >= json_start) {
            description_len = description_len - span.len() + replacement.len();
        }
        dst.reserve(self.wire_len());
        let mut cursor = 0;
        let mut length_written = false;
        for (span, replacement) in &edits {
            if !length_written && span.start >= json_start {
                // The description's be32 length sits between the sections and the text.
                dst.extend_from_slice(&self.held[cursor..self.desc_len_pos]);
                dst.put_u32(u32::try_from(description_len).unwrap_or(u32::MAX));
                cursor = json_start;
                length_written = true;
            }
            dst.extend_from_slice(&self.held[cursor..span.start]);
            replacement.write(dst);
            cursor = span.end;
        }
        if !length_written {
            dst.extend_from_slice(&self.held[cursor..self.desc_len_pos]);
            dst.put_u32(u32::try_from(description_len).unwrap_or(u32::MAX));
            cursor = json_start;
        }
        dst.extend_from_slice(&self.held[cursor..]);
    }
}

/// What one edit of the held bytes writes in place of its span.
enum Replacement<'a> {
    /// A vCPU's cpreg arrays: be32 count, the ids, the values.
    Arrays(&'a [(u64, u64)]),
    /// An `array_len` number of the description.
    Count(usize),
    Bytes(Vec<u8>),
}

impl Replacement<'_> {
    fn len(&self) -> usize {
        match self {
            Replacement::Arrays(regs) => 4 + 16 * regs.len(),
            Replacement::Count(n) => decimal_digits(*n),
            Replacement::Bytes(bytes) => bytes.len(),
        }
    }

    fn write(&self, dst: &mut BytesMut) {
        match self {
            Replacement::Arrays(regs) => {
                // Fits: checked in set_cpregs.
                dst.put_u32(u32::try_from(regs.len()).unwrap_or(u32::MAX));
                dst.reserve(16 * regs.len());
                put_be64s(dst, regs, |&(id, _)| id);
                put_be64s(dst, regs, |&(_, value)| value);
            }
            Replacement::Count(n) => {
                use std::fmt::Write;
                // Writing into a BytesMut cannot fail.
                let _ = write!(dst, "{n}");
            }
            Replacement::Bytes(bytes) => dst.extend_from_slice(bytes),
        }
    }
}

/// Append `number(reg)` of every register as big-endian u64s: encoded a block at a time on the
/// stack and appended with one copy per block, not a capacity check per number (nor a zeroed
/// buffer first).
fn put_be64s(dst: &mut BytesMut, regs: &[(u64, u64)], number: impl Fn(&(u64, u64)) -> u64) {
    const BLOCK: usize = 32;
    let mut block = [[0u8; 8]; BLOCK];
    for part in regs.chunks(BLOCK) {
        for (out, reg) in block.iter_mut().zip(part) {
            *out = number(reg).to_be_bytes();
        }
        dst.extend_from_slice(block[..part.len()].as_flattened());
    }
}

/// Length of `n` written in decimal (what an `array_len` number becomes).
fn decimal_digits(mut n: usize) -> usize {
    let mut digits = 1;
    while n >= 10 {
        n /= 10;
        digits += 1;
    }
    digits
}

/// The layout the walk found.
#[derive(Debug)]
pub(crate) struct Layout {
    sections: Vec<DeviceSection>,
    cpus: Vec<CpuSlot>,
    subsections: Vec<SubsectionSlot>,
    /// The description was the cache's (byte-identical to the last accepted one).
    pub(crate) description_reused: bool,
}

impl DeviceState {
    pub(crate) fn new(
        held: Bytes,
        base_offset: u64,
        desc_len_pos: usize,
        layout: Layout,
        confirmed: bool,
        limits: &Limits,
    ) -> Self {
        DeviceState {
            held,
            base_offset,
            sections: layout.sections,
            cpus: layout.cpus,
            subsections: layout.subsections,
            desc_len_pos,
            cpregs_growth: 0,
            subsections_removed: false,
            confirmed,
            description_reused: layout.description_reused,
            max_cpregs: limits.max_cpregs,
            max_output: limits.max_rewrite_output,
        }
    }

    /// The description JSON as received (before any `array_len` patch): what a reference
    /// description is captured from (a saved stream of a fresh VM of the source's configuration).
    pub fn description_json(&self) -> &[u8] {
        self.held.get(self.desc_len_pos + 4..).unwrap_or_default()
    }

    /// The ending of the phase was confirmed by a reference description
    /// (`StreamDecoder::set_reference_description`); otherwise it rests on the stream's own
    /// description alone (DESIGN.md, "How the end of the phase is recognised").
    pub fn is_confirmed(&self) -> bool {
        self.confirmed
    }

    /// The description was byte-for-byte the listener's cached one, so it was not parsed (nor
    /// checked against the reference) again (`description_cache.rs`).
    pub fn description_reused(&self) -> bool {
        self.description_reused
    }
}

/// Walk `held` (which ends with a complete description whose be32 length is at `desc_len_pos`).
/// With a cache, a description byte-for-byte equal to the cached one is not parsed (nor checked
/// against `reference`, if the cached one was) again, and the stream is walked with the plan
/// compiled from it (see `description_cache.rs` and `walk_plan.rs` for why that is the same
/// answer); a description whose walk succeeds replaces the cached one. The layout says whether
/// the cached description was reused.
pub(crate) fn walk(
    held: &[u8],
    base_offset: u64,
    desc_len_pos: usize,
    reference: Option<&ReferenceDescription>,
    cache: Option<&DescriptionCache>,
    limits: &Limits,
) -> Result<Layout, DecodeError> {
    let json_start = desc_len_pos + 4;
    let at = |pos: usize| base_offset + pos as u64;
    let json_text = &held[json_start..];
    let cached = cache.and_then(|cache| cache.lookup(json_text));
    if let Some(plan) = cached
        .as_deref()
        .filter(|entry| entry.checked_for(reference))
        .and_then(|entry| entry.plan())
    {
        let mut layout = walk_described(
            held,
            base_offset,
            desc_len_pos,
            Described::Plan(plan),
            limits,
        )?;
        layout.description_reused = true;
        return Ok(layout);
    }
    let (document, checked) = match cached
        .as_deref()
        .and_then(|entry| Some((entry.document(json_text)?, entry.checked_for(reference))))
    {
        Some(hit) => hit,
        None => (
            json::parse(json_text).map_err(|e| DecodeError::Description {
                offset: at(json_start + e.pos),
                message: format!("not valid json: {}", e.message),
            })?,
            false,
        ),
    };
    if let Some(reference) = reference.filter(|_| !checked) {
        reference
            .check(document.root())
            .map_err(|mismatch| DecodeError::Description {
                offset: at(json_start),
                message: format!(
                    "does not have the layout of the reference description: {mismatch}"
                ),
            })?;
    }
    let mut layout = walk_described(
        held,
        base_offset,
        desc_len_pos,
        Described::Lookup(document.root()),
        limits,
    )?;
    let reused = cached.is_some();
    layout.description_reused = reused;
    if let Some(cache) = cache.filter(|_| !(reused && checked)) {
        cache.store(json_text, document.into_shape(), reference);
    }
    Ok(layout)
}

/// What the walk reads the description from: the parsed JSON, looking every key up (a
/// description seen for the first time), or the plan compiled from it (`walk_plan.rs`).
#[derive(Clone, Copy)]
pub(crate) enum Described<'d> {
    Lookup(Json<'d>),
    Plan(&'d WalkPlan),
}

/// One device entry, from either source.
#[derive(Clone, Copy)]
enum DeviceEntry<'d> {
    Lookup(Json<'d>),
    Plan(&'d WalkPlan, &'d DevicePlan),
}

impl<'d> DeviceEntry<'d> {
    fn name_and_instance(self) -> Option<(&'d str, u64)> {
        match self {
            DeviceEntry::Lookup(device) => Some((
                device.get("name").and_then(Json::as_str)?,
                device.get("instance_id").and_then(Json::as_u64)?,
            )),
            DeviceEntry::Plan(_, device) => Some((&device.name, device.instance_id)),
        }
    }

    fn version(self) -> Option<u64> {
        match self {
            DeviceEntry::Lookup(device) => device.get("version").and_then(Json::as_u64),
            DeviceEntry::Plan(_, device) => device.version,
        }
    }

    fn cpu_fields(self) -> Option<CpuFields> {
        match self {
            DeviceEntry::Lookup(device) => CpuFields::from_description(device),
            DeviceEntry::Plan(_, device) => device.cpregs.clone(),
        }
    }
}

/// The walk proper: the device state in `held` against the description.
pub(crate) fn walk_described(
    held: &[u8],
    base_offset: u64,
    desc_len_pos: usize,
    desc: Described<'_>,
    limits: &Limits,
) -> Result<Layout, DecodeError> {
    let json_start = desc_len_pos + 4;
    let eof_pos = desc_len_pos - 2;
    let at = |pos: usize| base_offset + pos as u64;
    let desc_err = |message: String| DecodeError::Description {
        offset: at(json_start),
        message,
    };
    let devices: Vec<DeviceEntry<'_>> = match desc {
        Described::Lookup(root) => root
            .get("devices")
            .and_then(Json::as_array)
            .ok_or_else(|| desc_err("no \"devices\" array".into()))?
            .map(DeviceEntry::Lookup)
            .collect(),
        Described::Plan(plan) => plan
            .devices
            .iter()
            .map(|device| DeviceEntry::Plan(plan, device))
            .collect(),
    };

    let mut sections = Vec::with_capacity(devices.len());
    let mut cpus = Vec::new();
    let mut subsections = Vec::new();
    let mut pos = 0usize;
    let described = devices.len();
    for (index, device) in devices.into_iter().enumerate() {
        let Some((dev_name, dev_instance)) = device.name_and_instance() else {
            return Err(desc_err(format!(
                "device entry {index} lacks \"name\" or \"instance_id\""
            )));
        };
        // Header: 04, be32 id, counted idstr, be32 instance, be32 version.
        let mut r = Reader::at(&held[..eof_pos], pos);
        let record = r.u8().ok_or_else(|| DecodeError::UnexpectedInDevicePhase {
            offset: at(pos),
            found: format!(
                "eof, but the description still lists device \"{dev_name}\" instance {dev_instance}"
            ),
        })?;
        if record != QEMU_VM_SECTION_FULL {
            return Err(DecodeError::UnexpectedInDevicePhase {
                offset: at(pos),
                found: record_type_name(record),
            });
        }
        let truncated = || DecodeError::DeviceState {
            offset: at(pos),
            section: SectionRef {
                id: 0,
                idstr: Some(dev_name.to_string()),
            },
            message: "section header runs past eof".into(),
        };
        let section_id = r.be32().ok_or_else(truncated)?;
        let idstr = reader::name(r.counted().ok_or_else(truncated)?);
        let instance = r.be32().ok_or_else(truncated)?;
        let version = r.be32().ok_or_else(truncated)?;
        let section = SectionRef {
            id: section_id,
            idstr: Some(idstr.clone()),
        };
        if idstr != dev_name || u64::from(instance) != dev_instance {
            return Err(DecodeError::DeviceState {
                offset: at(pos),
                section,
                message: format!(
                    "description entry {index} is \"{dev_name}\" instance {dev_instance}, the stream has instance {instance}"
                ),
            });
        }
        // The description records the vmstate version the section was saved with.
        if let Some(described) = device.version() {
            if described != u64::from(version) {
                return Err(DecodeError::DeviceState {
                    offset: at(pos),
                    section,
                    message: format!(
                        "section version {version}, the description says version {described}"
                    ),
                });
            }
        }
        let payload_start = r.pos();
        let mut walker = Walker {
            held: &held[..eof_pos],
            base_offset,
            section: &section,
            top_subsections: Vec::new(),
        };
        let payload_end = match device {
            DeviceEntry::Lookup(device) => walker.vmsd(device, payload_start, 0)?,
            DeviceEntry::Plan(plan, device) => walker.plan(plan, device, payload_start)?,
        };
        let found = walker.top_subsections;
        let mut f = Reader::at(&held[..eof_pos], payload_end);
        match (f.u8(), f.be32()) {
            (Some(QEMU_VM_SECTION_FOOTER), Some(id)) if id == section_id => {}
            (tag, id) => {
                return Err(DecodeError::DeviceState {
                    offset: at(payload_end),
                    section,
                    message: format!(
                        "expected footer 7e {section_id:08x} after the described fields, found {}",
                        match (tag, id) {
                            (Some(t), Some(i)) => format!("{t:02x} {i:08x}"),
                            (Some(t), None) => format!("{t:02x} and eof"),
                            _ => "eof".into(),
                        }
                    ),
                })
            }
        }
        let end = f.pos();
        if idstr == IDSTR_CPU {
            let json_items = match (found.first(), found.last()) {
                (Some(first), Some(last)) => {
                    first.json_item.start + json_start..last.json_item.end + json_start
                }
                _ => 0..0,
            };
            subsections.extend(found.into_iter().map(|sub| SubsectionSlot {
                instance,
                name: sub.name,
                version: sub.version,
                nested: sub.nested,
                wire: sub.wire,
                payload: sub.payload,
                json_item: sub.json_item.start + json_start..sub.json_item.end + json_start,
                json_items: json_items.clone(),
                removed: false,
            }));
            let located = match device.cpu_fields() {
                Some(fields) => locate_cpregs(
                    held,
                    base_offset,
                    json_start,
                    CpuSection {
                        section: &section,
                        fields,
                        payload_start,
                        instance,
                        version,
                    },
                )?,
                None => None,
            };
            if let Some(slot) = located {
                if cpus.iter().any(|c: &CpuSlot| c.instance == slot.instance) {
                    // QEMU loads a section by (idstr, instance): a second one would leave one
                    // of the two unrewritten.
                    return Err(DecodeError::DeviceState {
                        offset: at(pos),
                        section,
                        message: format!("a second cpu section for instance {instance}"),
                    });
                }
                if cpus.len() >= limits.max_cpus {
                    return Err(DecodeError::DeviceState {
                        offset: at(pos),
                        section,
                        message: format!(
                            "more than {} vCPUs with cpreg arrays (limit max_cpus)",
                            limits.max_cpus
                        ),
                    });
                }
                if slot.count > limits.max_cpregs {
                    return Err(DecodeError::DeviceState {
                        offset: at(slot.array_len_pos),
                        section,
                        message: format!(
                            "{} cpregs exceed the limit of {} registers per vCPU (limit max_cpregs)",
                            slot.count, limits.max_cpregs
                        ),
                    });
                }
                cpus.push(slot);
            }
        }
        sections.push(DeviceSection {
            section_id,
            idstr,
            instance,
            version,
            wire_len: end - pos,
        });
        pos = end;
    }
    if pos != eof_pos {
        let found = held.get(pos).copied().unwrap_or(QEMU_VM_EOF);
        return Err(DecodeError::UnexpectedInDevicePhase {
            offset: at(pos),
            found: format!(
                "{} not listed in the description ({} devices described)",
                record_type_name(found),
                described
            ),
        });
    }
    Ok(Layout {
        sections,
        cpus,
        subsections,
        description_reused: false,
    })
}

/// A subsection directly inside a section, as the walk found it (JSON spans relative to the text).
struct FoundSubsection {
    name: String,
    version: u32,
    nested: Vec<String>,
    wire: Range<usize>,
    payload: Range<usize>,
    json_item: Range<usize>,
}

struct Walker<'a> {
    held: &'a [u8],
    base_offset: u64,
    section: &'a SectionRef,
    /// The section's own subsections (depth 0), in stream order.
    top_subsections: Vec<FoundSubsection>,
}

impl Walker<'_> {
    fn err(&self, pos: usize, message: String) -> DecodeError {
        DecodeError::DeviceState {
            offset: self.base_offset + pos as u64,
            section: self.section.clone(),
            message,
        }
    }

    /// The subsection header `name` (at `version`, when the description names one) at `pos`:
    /// its wire version and where its payload starts. Both walks, by plan and by lookup, read
    /// it here so they refuse the same bytes with the same message.
    fn subsection_header(
        &self,
        pos: usize,
        name: &str,
        version: Option<u64>,
    ) -> Result<(u32, usize), DecodeError> {
        let mut r = Reader::at(self.held, pos);
        match (r.u8(), r.counted(), r.be32()) {
            (Some(QEMU_VM_SUBSECTION), Some(wire_name), Some(wire_version))
                if wire_name == name.as_bytes()
                    && version.is_none_or(|v| v == u64::from(wire_version)) =>
            {
                Ok((wire_version, r.pos()))
            }
            _ => Err(self.err(
                pos,
                format!("expected subsection header for \"{name}\" here"),
            )),
        }
    }

    /// Walk one section's payload with its compiled steps from `pos`; returns the end. Checks
    /// what [`vmsd`](Self::vmsd) checks, in the same order, with the same errors.
    fn plan(
        &mut self,
        plan: &WalkPlan,
        device: &DevicePlan,
        pos: usize,
    ) -> Result<usize, DecodeError> {
        /// An open subsection: header position, payload start, version read, `tops` index.
        type Open = (usize, usize, u32, Option<usize>);
        let mut open: [Open; MAX_SUBSECTION_DEPTH + 1] =
            [(0, 0, 0, None); MAX_SUBSECTION_DEPTH + 1];
        let mut depth = 0usize;
        let mut pos = pos;
        for step in plan.steps(device) {
            match step {
                PlanStep::Fields { bytes, fields } => {
                    match pos
                        .checked_add(*bytes)
                        .filter(|end| *end <= self.held.len())
                    {
                        Some(end) => pos = end,
                        None => return Err(self.field_past_eof(plan.fields(fields), pos)),
                    }
                }
                PlanStep::Subsection { name, version, top } => {
                    let (wire_version, payload_start) =
                        self.subsection_header(pos, name, *version)?;
                    let slot = open
                        .get_mut(depth)
                        .ok_or_else(|| self.err(pos, "subsections nested too deeply".into()))?;
                    *slot = (pos, payload_start, wire_version, *top);
                    depth += 1;
                    pos = payload_start;
                }
                PlanStep::End => {
                    depth = depth.saturating_sub(1);
                    let (header_pos, payload_start, version, top) =
                        open.get(depth).copied().unwrap_or_default();
                    if let Some(top) = top.and_then(|index| plan.top(index)) {
                        self.top_subsections.push(FoundSubsection {
                            name: top.name.clone(),
                            version,
                            nested: top.nested.clone(),
                            wire: header_pos..pos,
                            payload: payload_start..pos,
                            json_item: top.json_item.clone(),
                        });
                    }
                }
            }
        }
        Ok(pos)
    }

    /// The error for a run of fields that runs past the end at `pos`: names the first field
    /// that does, as the field-by-field walk does.
    fn field_past_eof(&self, fields: &[(Box<str>, usize)], mut pos: usize) -> DecodeError {
        for (name, size) in fields {
            match pos.checked_add(*size).filter(|end| *end <= self.held.len()) {
                Some(end) => pos = end,
                None => {
                    return self.err(
                        pos,
                        format!("field {:?} ({size} bytes) runs past eof", &**name),
                    )
                }
            }
        }
        // Unreachable: the sizes sum to more than what is left.
        self.err(pos, "fields run past eof".into())
    }

    /// Walk one vmstate (fields, then subsections) described by `desc` from `pos`; returns the end.
    fn vmsd(&mut self, desc: Json<'_>, pos: usize, depth: usize) -> Result<usize, DecodeError> {
        if depth > MAX_SUBSECTION_DEPTH {
            return Err(self.err(pos, "subsections nested too deeply".into()));
        }
        let mut pos = pos;
        if let Some(fields) = desc.get("fields") {
            let fields = fields
                .as_array()
                .ok_or_else(|| self.err(pos, "description \"fields\" is not an array".into()))?;
            for field in fields {
                let size = field_size(field).ok_or_else(|| {
                    self.err(
                        pos,
                        format!(
                            "description field {:?} has no valid size",
                            field.get("name").and_then(Json::as_str).unwrap_or("?")
                        ),
                    )
                })?;
                pos = pos
                    .checked_add(size)
                    .filter(|end| *end <= self.held.len())
                    .ok_or_else(|| {
                        self.err(
                            pos,
                            format!(
                                "field {:?} ({size} bytes) runs past eof",
                                field.get("name").and_then(Json::as_str).unwrap_or("?")
                            ),
                        )
                    })?;
            }
        }
        if let Some(subs) = desc.get("subsections") {
            let subs = subs.as_array().ok_or_else(|| {
                self.err(pos, "description \"subsections\" is not an array".into())
            })?;
            for sub in subs {
                let name = sub
                    .get("vmsd_name")
                    .and_then(Json::as_str)
                    .ok_or_else(|| self.err(pos, "subsection without vmsd_name".into()))?;
                let version = sub.get("version").and_then(Json::as_u64);
                let (wire_version, payload_start) = self.subsection_header(pos, name, version)?;
                let header_pos = pos;
                pos = self.vmsd(sub, payload_start, depth + 1)?;
                if depth == 0 {
                    let mut nested = Vec::new();
                    nested_names(sub, &mut nested);
                    self.top_subsections.push(FoundSubsection {
                        name: name.to_owned(),
                        version: wire_version,
                        nested,
                        wire: header_pos..pos,
                        payload: payload_start..pos,
                        // Objects always carry their span.
                        json_item: sub.span().unwrap_or(0..0),
                    });
                }
            }
        }
        Ok(pos)
    }
}

/// One `cpu` section as the walk found it, and where its description puts the cpreg fields.
struct CpuSection<'a> {
    section: &'a SectionRef,
    fields: CpuFields,
    payload_start: usize,
    instance: u32,
    version: u32,
}

/// Find the cpreg arrays of one `cpu` section from its description fields.
fn locate_cpregs(
    held: &[u8],
    base_offset: u64,
    json_start: usize,
    cpu: CpuSection<'_>,
) -> Result<Option<CpuSlot>, DecodeError> {
    let CpuSection {
        section,
        fields,
        payload_start,
        instance,
        version,
    } = cpu;
    let err = |pos: usize, message: String| DecodeError::DeviceState {
        offset: base_offset + pos as u64,
        section: section.clone(),
        message,
    };
    // Offsets were summed from sizes the walk checked: they lie inside the held bytes.
    let at_offset = |offset: usize| payload_start.saturating_add(offset);
    let array_len_pos = fields
        .array_len
        .map(|(offset, size)| (at_offset(offset), size));
    let Some((array_len_pos, len_size)) = array_len_pos else {
        return Ok(None);
    };
    if len_size != 4 {
        return Err(err(
            array_len_pos,
            format!("{CPREG_ARRAY_LEN_FIELD} has size {len_size}, expected 4"),
        ));
    }
    let count = Reader::at(held, array_len_pos)
        .be32()
        .ok_or_else(|| err(array_len_pos, "cpreg count runs past eof".into()))?;
    let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
    if i32::try_from(count).is_err() {
        return Err(err(
            array_len_pos,
            format!("cpreg count {count} is not a positive int32"),
        ));
    }
    let mut json_spans = Vec::new();
    for (name, found, expected_pos) in [
        (CPREG_INDEXES_FIELD, fields.indexes, array_len_pos + 4),
        (
            CPREG_VALUES_FIELD,
            fields.values,
            array_len_pos + 4 + 8 * count_usize.min(held.len()),
        ),
    ] {
        match found {
            Some(field) => {
                let field_pos = at_offset(field.offset);
                let size = field.size;
                let described = field.array_len;
                if field_pos != expected_pos
                    || size != Some(8)
                    || described != Some(u64::from(count))
                {
                    return Err(err(
                        field_pos,
                        format!(
                            "{name}: expected {count} elements of 8 bytes right after the previous cpreg field, the description says size {size:?} array_len {described:?}"
                        ),
                    ));
                }
                if let Some(span) = field.array_len_span {
                    // Spans are relative to the JSON text; make them relative to `held`.
                    json_spans.push(span.start + json_start..span.end + json_start);
                }
            }
            None if count == 0 => {}
            None => {
                return Err(err(
                    array_len_pos,
                    format!("{count} cpregs but the description has no {name} field"),
                ))
            }
        }
    }
    Ok(Some(CpuSlot {
        instance,
        section_version: version,
        array_len_pos,
        count: count_usize,
        json_spans,
        replacement: None,
    }))
}
