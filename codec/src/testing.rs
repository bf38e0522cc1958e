//! A builder for synthetic migration streams, shaped like QEMU 7.2/10.0 `virt` streams (header,
//! configuration, RAM iterable sections, device sections with a `cpu` section, EOF and a matching
//! description). Used by property tests, the fuzz target's seeds and the benchmark.
//!
//! Only available with the `testing` feature.

use bytes::{BufMut, BytesMut};

use crate::device_phase::{walk_described, Described};
use crate::json;
use crate::limits::Limits;
use crate::walk_plan::WalkPlan;
use crate::wire::*;

/// Walk a held device phase twice, looking every description key up and with the walk plan
/// compiled from the description (`walk_plan.rs`), and give both outcomes as text (the layout
/// found, or the error): they must be equal. `held` runs from the first device section to the
/// end of the description text, whose be32 length is at `desc_len_pos`; errors are located as
/// if `held` started at stream offset `base_offset`. `None` if the shape is not that, the text
/// is not JSON, or the description gets no plan (a defect of its own, reported by lookup only).
pub fn walk_by_lookup_and_plan(
    held: &[u8],
    base_offset: u64,
    desc_len_pos: usize,
    limits: &Limits,
) -> Option<(String, String)> {
    if desc_len_pos < 2 || desc_len_pos.checked_add(4)? > held.len() {
        return None;
    }
    let document = json::parse(held.get(desc_len_pos + 4..)?).ok()?;
    let plan = WalkPlan::compile(document.root())?;
    let lookup = walk_described(
        held,
        base_offset,
        desc_len_pos,
        Described::Lookup(document.root()),
        limits,
    );
    let planned = walk_described(
        held,
        base_offset,
        desc_len_pos,
        Described::Plan(&plan),
        limits,
    );
    Some((format!("{lookup:?}"), format!("{planned:?}")))
}

/// One RAM record inside a PART or END section.
#[derive(Debug, Clone)]
pub enum RamRecord {
    Zero,
    /// A full page; the data is repeated/truncated to the page size.
    Page(Vec<u8>),
    /// An XBZRLE record with this encoded payload (at most a page).
    Xbzrle(Vec<u8>),
    /// A COMPRESS_PAGE record with this (opaque) payload.
    Compressed(Vec<u8>),
    MultifdFlush,
}

/// Builds a stream record by record.
pub struct StreamBuilder {
    out: BytesMut,
    page_size: usize,
    next_section_id: u32,
    ram_section: Option<u32>,
    ram_block: String,
    block_named: bool,
    devices: Vec<String>,
}

const CPU_PREFIX_FIELDS: &[(&str, usize, Option<usize>)] = &[
    ("env.regs", 4, Some(16)),
    ("env.xregs", 8, Some(32)),
    ("env.pc", 8, None),
    ("cpsr", 4, None),
    ("env.spsr", 4, None),
    ("env.banked_spsr", 8, Some(8)),
    ("env.banked_r13", 4, Some(8)),
    ("env.banked_r14", 4, Some(8)),
    ("env.usr_regs", 4, Some(5)),
    ("env.fiq_regs", 4, Some(5)),
    ("env.elr_el", 8, Some(4)),
    ("env.sp_el", 8, Some(4)),
];
const CPU_TAIL_FIELDS: &[(&str, usize)] = &[
    ("env.exclusive_addr", 8),
    ("env.exclusive_val", 8),
    ("env.exclusive_high", 8),
    ("unused", 8),
    ("env.exception.syndrome", 4),
    ("env.exception.fsr", 4),
    ("env.exception.vaddress", 8),
    ("gt_timer[GTIMER_PHYS]", 8),
    ("gt_timer[GTIMER_VIRT]", 8),
    ("power_state", 1),
];

impl StreamBuilder {
    /// Header and configuration (`machine`, target page bits 12).
    pub fn new(machine: &str) -> Self {
        let mut out = BytesMut::new();
        out.put_u32(QEMU_VM_FILE_MAGIC);
        out.put_u32(QEMU_VM_FILE_VERSION);
        out.put_u8(QEMU_VM_CONFIGURATION);
        out.put_u32(machine.len() as u32);
        out.put_slice(machine.as_bytes());
        out.put_u8(QEMU_VM_SUBSECTION);
        put_counted(&mut out, CONFIGURATION_TARGET_PAGE_BITS);
        out.put_u32(1);
        out.put_u32(12);
        StreamBuilder {
            out,
            page_size: 4096,
            next_section_id: 0,
            ram_section: None,
            ram_block: "mach-virt.ram".into(),
            block_named: false,
            devices: Vec::new(),
        }
    }

    /// Preallocate for a stream of about `bytes` bytes.
    pub fn reserve(&mut self, bytes: usize) -> &mut Self {
        self.out.reserve(bytes);
        self
    }

    /// A `QEMU_VM_COMMAND` with this payload.
    pub fn command(&mut self, cmd: u16, payload: &[u8]) -> &mut Self {
        self.out.put_u8(QEMU_VM_COMMAND);
        self.out.put_u16(cmd);
        self.out.put_u16(payload.len() as u16);
        self.out.put_slice(payload);
        self
    }

    /// START "ram" with a MEM_SIZE block list (one block of `ram_bytes`), EOS, footer.
    pub fn ram_start(&mut self, ram_bytes: u64) -> &mut Self {
        let id = self.next_section_id;
        self.next_section_id += 1;
        self.ram_section = Some(id);
        self.out.put_u8(QEMU_VM_SECTION_START);
        self.out.put_u32(id);
        put_counted(&mut self.out, IDSTR_RAM);
        self.out.put_u32(0);
        self.out.put_u32(4);
        self.out.put_u64(ram_bytes | RAM_SAVE_FLAG_MEM_SIZE);
        let block = self.ram_block.clone();
        put_counted(&mut self.out, &block);
        self.out.put_u64(ram_bytes);
        self.out.put_u64(RAM_SAVE_FLAG_EOS);
        self.out.put_u8(QEMU_VM_SECTION_FOOTER);
        self.out.put_u32(id);
        self
    }

    /// A PART (or END) "ram" section with these records, then EOS and the footer.
    pub fn ram_section(&mut self, end: bool, records: &[RamRecord]) -> &mut Self {
        let Some(id) = self.ram_section else {
            return self;
        };
        self.out.put_u8(if end {
            QEMU_VM_SECTION_END
        } else {
            QEMU_VM_SECTION_PART
        });
        self.out.put_u32(id);
        for (i, record) in records.iter().enumerate() {
            self.ram_record(i as u64, record);
        }
        self.out.put_u64(RAM_SAVE_FLAG_EOS);
        self.out.put_u8(QEMU_VM_SECTION_FOOTER);
        self.out.put_u32(id);
        self
    }

    /// A PART section of `pages` full pages filled by `fill(page_index, page)`.
    pub fn ram_pages(&mut self, pages: u64, mut fill: impl FnMut(u64, &mut [u8])) -> &mut Self {
        let Some(id) = self.ram_section else {
            return self;
        };
        self.out.put_u8(QEMU_VM_SECTION_PART);
        self.out.put_u32(id);
        let mut page = vec![0u8; self.page_size];
        for index in 0..pages {
            fill(index, &mut page);
            self.page_header(index, RAM_SAVE_FLAG_PAGE);
            self.out.put_slice(&page);
        }
        self.out.put_u64(RAM_SAVE_FLAG_EOS);
        self.out.put_u8(QEMU_VM_SECTION_FOOTER);
        self.out.put_u32(id);
        self
    }

    fn page_header(&mut self, index: u64, kind: u64) {
        let offset = index * self.page_size as u64;
        if self.block_named {
            self.out.put_u64(offset | kind | RAM_SAVE_FLAG_CONTINUE);
        } else {
            self.out.put_u64(offset | kind);
            let block = self.ram_block.clone();
            put_counted(&mut self.out, &block);
            self.block_named = true;
        }
    }

    fn ram_record(&mut self, index: u64, record: &RamRecord) {
        match record {
            RamRecord::Zero => {
                self.page_header(index, RAM_SAVE_FLAG_ZERO);
                self.out.put_u8(0);
            }
            RamRecord::Page(data) => {
                self.page_header(index, RAM_SAVE_FLAG_PAGE);
                for i in 0..self.page_size {
                    let byte = if data.is_empty() {
                        0
                    } else {
                        data[i % data.len()]
                    };
                    self.out.put_u8(byte);
                }
            }
            RamRecord::Xbzrle(data) => {
                let data = &data[..data.len().min(self.page_size)];
                self.page_header(index, RAM_SAVE_FLAG_XBZRLE);
                self.out.put_u8(ENCODING_FLAG_XBZRLE);
                self.out.put_u16(data.len() as u16);
                self.out.put_slice(data);
            }
            RamRecord::Compressed(data) => {
                let data = &data[..data.len().min(self.page_size)];
                self.page_header(index, RAM_SAVE_FLAG_COMPRESS_PAGE);
                self.out.put_u32(data.len() as u32);
                self.out.put_slice(data);
            }
            RamRecord::MultifdFlush => self.out.put_u64(RAM_SAVE_FLAG_MULTIFD_FLUSH),
        }
    }

    fn full_header(&mut self, idstr: &str, instance: u32, version: u32) -> u32 {
        let id = self.next_section_id;
        self.next_section_id += 1;
        self.out.put_u8(QEMU_VM_SECTION_FULL);
        self.out.put_u32(id);
        put_counted(&mut self.out, idstr);
        self.out.put_u32(instance);
        self.out.put_u32(version);
        id
    }

    fn footer(&mut self, id: u32) {
        self.out.put_u8(QEMU_VM_SECTION_FOOTER);
        self.out.put_u32(id);
    }

    /// A FULL section with an opaque payload (described as one `buffer` field), plus an optional
    /// subsection with its own opaque payload.
    pub fn device(
        &mut self,
        idstr: &str,
        instance: u32,
        payload: &[u8],
        subsection: Option<(&str, &[u8])>,
    ) -> &mut Self {
        let id = self.full_header(idstr, instance, 1);
        self.out.put_slice(payload);
        let mut subs = String::new();
        if let Some((name, data)) = subsection {
            let full = format!("{idstr}/{name}");
            self.out.put_u8(QEMU_VM_SUBSECTION);
            put_counted(&mut self.out, &full);
            self.out.put_u32(1);
            self.out.put_slice(data);
            subs = format!(
                ", \"subsections\": [{{\"vmsd_name\": {}, \"version\": 1, \"fields\": [{{\"name\": \"data\", \"type\": \"buffer\", \"size\": {}}}]}}]",
                json_string(&full),
                data.len()
            );
        }
        self.footer(id);
        self.devices.push(format!(
            "{{\"name\": {}, \"instance_id\": {instance}, \"vmsd_name\": {}, \"version\": 1, \"fields\": [{{\"name\": \"data\", \"type\": \"buffer\", \"size\": {}}}]{subs}}}",
            json_string(idstr),
            json_string(idstr),
            payload.len()
        ));
        self
    }

    /// `cpu_common` + `cpu` (version 22) for one vCPU, with these cpreg arrays; `fill` seeds the
    /// other register bytes.
    pub fn cpu(&mut self, instance: u32, regs: &[(u64, u64)], fill: u8) -> &mut Self {
        self.device("cpu_common", instance, &[0, 0, 0, 0, 0, 0, 0, fill], None);
        let id = self.full_header(IDSTR_CPU, instance, 22);
        let mut fields = Vec::new();
        for (name, size, array_len) in CPU_PREFIX_FIELDS {
            let n = array_len.unwrap_or(1);
            for i in 0..size * n {
                self.out.put_u8(fill.wrapping_add(i as u8));
            }
            fields.push(match array_len {
                Some(n) => format!(
                    "{{\"name\": \"{name}\", \"array_len\": {n}, \"type\": \"uint64\", \"size\": {size}}}"
                ),
                None => format!("{{\"name\": \"{name}\", \"type\": \"uint64\", \"size\": {size}}}"),
            });
        }
        self.out.put_u32(regs.len() as u32);
        for (reg, _) in regs {
            self.out.put_u64(*reg);
        }
        for (_, value) in regs {
            self.out.put_u64(*value);
        }
        fields.push(format!(
            "{{\"name\": \"{CPREG_ARRAY_LEN_FIELD}\", \"type\": \"int32 le\", \"size\": 4}}"
        ));
        for name in [CPREG_INDEXES_FIELD, CPREG_VALUES_FIELD] {
            fields.push(format!(
                "{{\"name\": \"{name}\", \"array_len\": {}, \"type\": \"uint64\", \"size\": 8}}",
                regs.len()
            ));
        }
        for (name, size) in CPU_TAIL_FIELDS {
            for _ in 0..*size {
                self.out.put_u8(fill);
            }
            fields.push(format!(
                "{{\"name\": \"{name}\", \"type\": \"uint64\", \"size\": {size}}}"
            ));
        }
        self.out.put_u8(QEMU_VM_SUBSECTION);
        put_counted(&mut self.out, "cpu/irq-line-state");
        self.out.put_u32(1);
        self.out.put_u32(u32::from(fill));
        self.footer(id);
        self.devices.push(format!(
            "{{\"name\": \"cpu\", \"instance_id\": {instance}, \"vmsd_name\": \"cpu\", \"version\": 22, \"fields\": [{}], \"subsections\": [{{\"vmsd_name\": \"cpu/irq-line-state\", \"version\": 1, \"fields\": [{{\"name\": \"env.irq_line_state\", \"type\": \"uint32\", \"size\": 4}}]}}]}}",
            fields.join(", ")
        ));
        self
    }

    /// The description JSON for the device sections so far.
    pub fn description(&self) -> String {
        format!(
            "{{\"page_size\": {}, \"devices\": [{}]}}",
            self.page_size,
            self.devices.join(", ")
        )
    }

    /// EOF and the description: a complete precopy stream.
    pub fn finish(mut self) -> Vec<u8> {
        let description = self.description();
        self.out.put_u8(QEMU_VM_EOF);
        self.out.put_u8(QEMU_VM_VMDESCRIPTION);
        self.out.put_u32(description.len() as u32);
        self.out.put_slice(description.as_bytes());
        self.out.to_vec()
    }

    /// EOF without a description (`suppress-vmdesc=on`).
    pub fn finish_without_description(mut self) -> Vec<u8> {
        self.out.put_u8(QEMU_VM_EOF);
        self.out.to_vec()
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Nothing written yet (never: the header is written by `new`).
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// The bytes so far, without EOF.
    pub fn into_bytes(self) -> Vec<u8> {
        self.out.to_vec()
    }
}

/// What a guest can write into its own state to look like the end of the device phase: the
/// footer of section `section_id` (named `idstr`, instance 0, version 1), EOF, VMDESCRIPTION and a
/// description naming only that section, with one field of `guest_offset` bytes, i.e. reaching
/// exactly to these bytes when they sit `guest_offset` bytes into the section's payload.
pub fn forged_description_ending(section_id: u32, idstr: &str, guest_offset: usize) -> Vec<u8> {
    let json = format!(
        "{{\"devices\": [{{\"name\": {}, \"instance_id\": 0, \"version\": 1, \"fields\": [{{\"name\": \"data\", \"size\": {guest_offset}}}]}}]}}",
        json_string(idstr)
    );
    let mut out = BytesMut::new();
    out.put_u8(QEMU_VM_SECTION_FOOTER);
    out.put_u32(section_id);
    out.put_u8(QEMU_VM_EOF);
    out.put_u8(QEMU_VM_VMDESCRIPTION);
    out.put_u32(json.len() as u32);
    out.put_slice(json.as_bytes());
    out.to_vec()
}

fn put_counted(out: &mut BytesMut, s: &str) {
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
