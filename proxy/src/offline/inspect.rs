//! `migproxy inspect FILE|-`: decode a saved main-channel stream and summarise it.
//!
//! The stream is decoded with the same `StreamDecoder` the proxy uses, so a file that inspects
//! cleanly is one the proxy would accept. The summary lists the machine, page size, every section
//! (iterable ones with their record counts, device sections from the held device-state phase),
//! RAM statistics and each vCPU's cpreg list. The readable summary is bounded like the daemon's
//! logs (`migproxy_config::digest`): runs of alike sections share one line, vCPUs with the same
//! registers share one list, other vCPUs show only where they differ, and `--all` prints every
//! section and every register of every vCPU. `--json` prints everything as one JSON object
//! (a stable interface, DESIGN.md "Stable interfaces"): ids and values as lower-case `0x` hex
//! strings, registers in stream order.

use std::io::Write;

use migproxy_codec::wire::{
    RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO,
};
use migproxy_codec::{
    CpuRegisters, Frame, Limits, MigCommand, RecordKind, StreamDecoder, StreamInfo,
};
use migproxy_config::digest::{Grouped, NAMED_REGISTERS};
use serde_json::{json, Value};

use crate::cli::InspectArgs;
use crate::error::ProxyError;
use crate::offline::input::Input;

pub fn main(args: &InspectArgs) -> Result<(), ProxyError> {
    let summary = inspect(Input::open(&args.file)?)?;
    let text = if args.json {
        let mut text =
            serde_json::to_string_pretty(&summary.to_json()).map_err(ProxyError::JsonOutput)?;
        text.push('\n');
        text
    } else {
        summary.to_text(args.all)
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        // `migproxy inspect x | head` is fine.
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(ProxyError::io("standard output", err)),
    }
}

/// One section as the summary shows it.
#[derive(Debug, Clone)]
struct SectionSummary {
    id: u32,
    idstr: String,
    instance: u32,
    version: u32,
    records: u64,
    bytes: u64,
    device: bool,
}

/// Counts of RAM records by kind, and the bytes they carried (headers included).
#[derive(Debug, Default)]
struct RamStats {
    mem_size: u64,
    zero: u64,
    page: u64,
    page_bytes: u64,
    xbzrle: u64,
    xbzrle_bytes: u64,
    compressed: u64,
    compressed_bytes: u64,
    multifd_flush: u64,
    eos: u64,
    /// What the current page payload belongs to, so Payload frames are counted with it.
    current: Option<u64>,
}

impl RamStats {
    fn record(&mut self, flags: u64, len: u64) {
        let kind = flags & !RAM_SAVE_FLAG_CONTINUE;
        self.current = Some(kind);
        match kind {
            RAM_SAVE_FLAG_MEM_SIZE => self.mem_size += 1,
            RAM_SAVE_FLAG_ZERO => self.zero += 1,
            RAM_SAVE_FLAG_PAGE => self.page += 1,
            RAM_SAVE_FLAG_XBZRLE => self.xbzrle += 1,
            RAM_SAVE_FLAG_COMPRESS_PAGE => self.compressed += 1,
            RAM_SAVE_FLAG_MULTIFD_FLUSH => self.multifd_flush += 1,
            RAM_SAVE_FLAG_EOS => self.eos += 1,
            _ => {}
        }
        self.payload(len);
    }

    fn payload(&mut self, len: u64) {
        match self.current {
            Some(RAM_SAVE_FLAG_PAGE) => self.page_bytes += len,
            Some(RAM_SAVE_FLAG_XBZRLE) => self.xbzrle_bytes += len,
            Some(RAM_SAVE_FLAG_COMPRESS_PAGE) => self.compressed_bytes += len,
            _ => {}
        }
    }
}

#[derive(Debug, Default)]
struct Summary {
    info: StreamInfo,
    stream_bytes: u64,
    sections: Vec<SectionSummary>,
    ram: RamStats,
    commands: Vec<(String, u64)>,
    device_state_bytes: Option<u64>,
    packaged_bytes: Option<u64>,
    cpus: Vec<CpuRegisters>,
}

impl Summary {
    fn section_mut(&mut self, id: u32) -> Option<&mut SectionSummary> {
        self.sections
            .iter_mut()
            .rev()
            .find(|s| s.id == id && !s.device)
    }

    fn is_ram(&self, id: u32) -> bool {
        self.sections
            .iter()
            .any(|s| s.id == id && !s.device && s.idstr == "ram")
    }

    fn count_command(&mut self, name: String) {
        match self.commands.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => self.commands.push((name, 1)),
        }
    }

    fn add(&mut self, frame: Frame) {
        let len = frame.wire_len() as u64;
        match frame {
            Frame::Verbatim {
                kind, section_id, ..
            } => {
                match &kind {
                    RecordKind::SectionStart {
                        idstr,
                        instance,
                        version,
                    } => {
                        if let Some(id) = section_id {
                            self.sections.push(SectionSummary {
                                id,
                                idstr: idstr.clone(),
                                instance: *instance,
                                version: *version,
                                records: 0,
                                bytes: 0,
                                device: false,
                            });
                        }
                    }
                    RecordKind::Command(cmd) => {
                        if let MigCommand::Packaged { blob_len } = cmd {
                            self.packaged_bytes = Some(u64::from(*blob_len));
                        }
                        self.count_command(command_name(cmd));
                    }
                    _ => {}
                }
                if let Some(id) = section_id {
                    if let RecordKind::RamRecord { flags } = kind {
                        self.ram.record(flags, len);
                    }
                    if let Some(section) = self.section_mut(id) {
                        if matches!(
                            kind,
                            RecordKind::SectionStart { .. }
                                | RecordKind::SectionPart
                                | RecordKind::SectionEnd
                        ) {
                            section.records += 1;
                        }
                        section.bytes += len;
                    }
                }
            }
            Frame::Payload { section_id, .. } => {
                if self.is_ram(section_id) {
                    self.ram.payload(len);
                }
                if let Some(section) = self.section_mut(section_id) {
                    section.bytes += len;
                }
            }
            Frame::DeviceState(state) => {
                self.device_state_bytes = Some(len);
                for s in state.sections() {
                    self.sections.push(SectionSummary {
                        id: s.section_id,
                        idstr: s.idstr.clone(),
                        instance: s.instance,
                        version: s.version,
                        records: 1,
                        bytes: s.wire_len as u64,
                        device: true,
                    });
                }
                self.cpus = state.cpus();
            }
        }
    }

    fn to_json(&self) -> Value {
        let sections: Vec<Value> = self
            .sections
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "idstr": s.idstr,
                    "instance": s.instance,
                    "version": s.version,
                    "records": s.records,
                    "bytes": s.bytes,
                    "kind": if s.device { "device" } else { "iterable" },
                })
            })
            .collect();
        let cpus: Vec<Value> = self
            .cpus
            .iter()
            .map(|cpu| {
                let registers: Vec<Value> = cpu
                    .registers
                    .iter()
                    .map(|&(id, value)| {
                        json!({
                            "id": format!("{id:#x}"),
                            "name": register_name(id),
                            "value": format!("{value:#x}"),
                        })
                    })
                    .collect();
                json!({
                    "instance": cpu.instance,
                    "section_version": cpu.section_version,
                    "count": cpu.registers.len(),
                    "registers": registers,
                })
            })
            .collect();
        let ram = &self.ram;
        json!({
            "machine": self.info.machine,
            "page_size": self.info.page_size,
            "capabilities": self.info.capabilities,
            "return_path": self.info.return_path,
            "postcopy_advised": self.info.postcopy_advised,
            "stream_bytes": self.stream_bytes,
            "commands": self.commands.iter().map(|(name, count)| json!({"name": name, "count": count})).collect::<Vec<_>>(),
            "sections": sections,
            "ram": {
                "mem_size_records": ram.mem_size,
                "zero_pages": ram.zero,
                "pages": ram.page,
                "page_bytes": ram.page_bytes,
                "xbzrle_pages": ram.xbzrle,
                "xbzrle_bytes": ram.xbzrle_bytes,
                "compressed_pages": ram.compressed,
                "compressed_bytes": ram.compressed_bytes,
                "multifd_flushes": ram.multifd_flush,
                "eos_records": ram.eos,
            },
            "device_state_bytes": self.device_state_bytes,
            "postcopy_package_bytes": self.packaged_bytes,
            "cpus": cpus,
        })
    }

    /// `all`: every section and every register of every vCPU; otherwise the bounded digest.
    fn to_text(&self, all: bool) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let info = &self.info;
        let _ = writeln!(
            out,
            "machine:      {}",
            info.machine
                .as_deref()
                .unwrap_or("(no configuration record)")
        );
        let _ = writeln!(
            out,
            "page size:    {}",
            info.page_size.map_or("?".into(), |p| p.to_string())
        );
        if !info.capabilities.is_empty() {
            let _ = writeln!(out, "capabilities: {}", info.capabilities.join(", "));
        }
        let _ = writeln!(out, "stream:       {} bytes", self.stream_bytes);
        let _ = writeln!(
            out,
            "return path:  {}{}",
            if info.return_path { "yes" } else { "no" },
            if info.postcopy_advised {
                ", postcopy advised"
            } else {
                ""
            }
        );
        if !self.commands.is_empty() {
            let list: Vec<String> = self
                .commands
                .iter()
                .map(|(name, count)| format!("{name} x{count}"))
                .collect();
            let _ = writeln!(out, "commands:     {}", list.join(", "));
        }
        let _ = writeln!(out, "\nsections:");
        let _ = writeln!(
            out,
            "  {:>4}  {:<28} {:>8} {:>7} {:>9} {:>12}",
            "id", "idstr", "instance", "version", "records", "bytes"
        );
        if all {
            for s in &self.sections {
                let _ = writeln!(
                    out,
                    "  {:>4}  {:<28} {:>8} {:>7} {:>9} {:>12}",
                    s.id, s.idstr, s.instance, s.version, s.records, s.bytes
                );
            }
        } else {
            section_digest(&self.sections, &mut out);
        }
        let ram = &self.ram;
        let _ = writeln!(out, "\nram:");
        let _ = writeln!(out, "  zero pages        {:>10}", ram.zero);
        let _ = writeln!(
            out,
            "  full pages        {:>10}  ({} bytes with headers)",
            ram.page, ram.page_bytes
        );
        let _ = writeln!(
            out,
            "  xbzrle pages      {:>10}  ({} bytes with headers)",
            ram.xbzrle, ram.xbzrle_bytes
        );
        let _ = writeln!(
            out,
            "  compressed pages  {:>10}  ({} bytes with headers)",
            ram.compressed, ram.compressed_bytes
        );
        let _ = writeln!(out, "  multifd flushes   {:>10}", ram.multifd_flush);
        let _ = writeln!(out, "  eos records       {:>10}", ram.eos);
        match (self.device_state_bytes, self.packaged_bytes) {
            (Some(bytes), _) => {
                let _ = writeln!(
                    out,
                    "\ndevice state: {bytes} bytes (sections, eof, description)"
                );
            }
            (None, Some(bytes)) => {
                let _ = writeln!(
                    out,
                    "\ndevice state: inside the postcopy package ({bytes} bytes; no description, so its sections are not delimited)"
                );
            }
            (None, None) => {
                let _ = writeln!(out, "\ndevice state: none");
            }
        }
        if all {
            for cpu in &self.cpus {
                let _ = writeln!(
                    out,
                    "\ncpu {} (section version {}): {} registers",
                    cpu.instance,
                    cpu.section_version,
                    cpu.registers.len()
                );
                for &(id, value) in &cpu.registers {
                    out.push_str(&register_line(id, value));
                }
            }
        } else {
            cpu_digest(&self.cpus, &mut out);
        }
        out
    }
}

/// One register of a listing.
fn register_line(id: u64, value: u64) -> String {
    format!(
        "  {:<20} {:<24} {:#x}\n",
        format!("{id:#x}"),
        register_name(id).unwrap_or("-"),
        value
    )
}

/// How many lines the section table of the digest has at most before it counts the rest.
const LISTED_SECTION_KINDS: usize = 64;

/// Sections of one name, version and kind, as the digest's table shows them.
struct SectionKind<'a> {
    first: &'a SectionSummary,
    last: &'a SectionSummary,
    instances: (u32, u32),
    records: u64,
    bytes: u64,
    count: usize,
}

/// The section table, bounded: the sections of one name, version and kind (the `cpu` and
/// `cpu_common` of every vCPU, the instances of one device) share one line, in order of first
/// appearance, with their id and instance ranges and summed records and bytes; at most
/// [`LISTED_SECTION_KINDS`] lines, the sections of the rest counted.
fn section_digest(sections: &[SectionSummary], out: &mut String) {
    use std::fmt::Write as _;
    let mut kinds: Vec<SectionKind<'_>> = Vec::new();
    let mut index: std::collections::HashMap<(&str, u32, bool), usize> =
        std::collections::HashMap::new();
    let mut more = 0usize;
    for s in sections {
        let key = (s.idstr.as_str(), s.version, s.device);
        match index.get(&key) {
            Some(&n) => {
                let kind = &mut kinds[n];
                kind.last = s;
                kind.instances = (
                    kind.instances.0.min(s.instance),
                    kind.instances.1.max(s.instance),
                );
                kind.records += s.records;
                kind.bytes += s.bytes;
                kind.count += 1;
            }
            None if kinds.len() < LISTED_SECTION_KINDS => {
                index.insert(key, kinds.len());
                kinds.push(SectionKind {
                    first: s,
                    last: s,
                    instances: (s.instance, s.instance),
                    records: s.records,
                    bytes: s.bytes,
                    count: 1,
                });
            }
            None => more += 1,
        }
    }
    for kind in &kinds {
        let (id, instance) = if kind.count == 1 {
            (kind.first.id.to_string(), kind.first.instance.to_string())
        } else {
            (
                format!("{}..{}", kind.first.id, kind.last.id),
                format!("{}..{}", kind.instances.0, kind.instances.1),
            )
        };
        let _ = write!(
            out,
            "  {id:>4}  {:<28} {instance:>8} {:>7} {:>9} {:>12}",
            kind.first.idstr, kind.first.version, kind.records, kind.bytes
        );
        if kind.count > 1 {
            let _ = write!(out, "  ({} sections)", kind.count);
        }
        out.push('\n');
    }
    if more > 0 {
        let _ = writeln!(
            out,
            "  ... and {more} more sections of other kinds (--all lists every section)"
        );
    }
}

/// One vCPU's registers as grouping compares them.
#[derive(PartialEq)]
struct CpuKey<'a> {
    section_version: u32,
    registers: &'a [(u64, u64)],
}

/// The vCPUs, bounded: vCPUs with the same registers and values share one heading; the first
/// group's registers are listed, every other group's only where they differ from it (the first
/// [`NAMED_REGISTERS`], then counted); at most `DESCRIBED_OUTCOMES` groups, the rest counted.
fn cpu_digest(cpus: &[CpuRegisters], out: &mut String) {
    use std::fmt::Write as _;
    let mut groups: Grouped<CpuKey<'_>> = Grouped::default();
    for cpu in cpus {
        groups.add(
            cpu.instance,
            CpuKey {
                section_version: cpu.section_version,
                registers: &cpu.registers,
            },
        );
    }
    let mut reference: Option<(String, std::collections::HashMap<u64, u64>)> = None;
    let mut shortened = false;
    for (key, vcpus) in groups.groups() {
        let _ = write!(
            out,
            "\n{vcpus}, section version {}: {} registers",
            key.section_version,
            key.registers.len()
        );
        let Some((first, values)) = &reference else {
            out.push('\n');
            for &(id, value) in key.registers {
                out.push_str(&register_line(id, value));
            }
            reference = Some((
                format!("vcpu {}", vcpus.first()),
                key.registers.iter().copied().collect(),
            ));
            continue;
        };
        let ids: std::collections::HashSet<u64> = key.registers.iter().map(|r| r.0).collect();
        let differing: Vec<(u64, Option<u64>)> = key
            .registers
            .iter()
            .filter(|(id, value)| values.get(id) != Some(value))
            .map(|&(id, value)| (id, Some(value)))
            .chain(
                values
                    .keys()
                    .filter(|id| !ids.contains(id))
                    .map(|&id| (id, None)),
            )
            .collect();
        let _ = writeln!(out, ", {} differ from {first}:", differing.len());
        for &(id, value) in differing.iter().take(NAMED_REGISTERS) {
            match value {
                Some(value) => out.push_str(&register_line(id, value)),
                None => out.push_str(&format!(
                    "  {:<20} {:<24} (absent)\n",
                    format!("{id:#x}"),
                    register_name(id).unwrap_or("-")
                )),
            }
        }
        if differing.len() > NAMED_REGISTERS {
            shortened = true;
            let _ = writeln!(
                out,
                "  ... and {} more differing registers",
                differing.len() - NAMED_REGISTERS
            );
        }
    }
    let undescribed = groups.undescribed();
    if !undescribed.is_empty() {
        shortened = true;
        let _ = writeln!(
            out,
            "\nand {} more vCPUs with other registers ({undescribed})",
            undescribed.count()
        );
    }
    if shortened {
        let _ = writeln!(out, "(--all lists every register of every vCPU)");
    }
}

fn register_name(id: u64) -> Option<&'static str> {
    migproxy_config::reg_name(id)
}

fn command_name(cmd: &MigCommand) -> String {
    match cmd {
        MigCommand::OpenReturnPath => "OPEN_RETURN_PATH".into(),
        MigCommand::Ping(_) => "PING".into(),
        MigCommand::PostcopyAdvise { .. } => "POSTCOPY_ADVISE".into(),
        MigCommand::PostcopyListen => "POSTCOPY_LISTEN".into(),
        MigCommand::PostcopyRun => "POSTCOPY_RUN".into(),
        MigCommand::PostcopyRamDiscard => "POSTCOPY_RAM_DISCARD".into(),
        MigCommand::Packaged { .. } => "PACKAGED".into(),
        MigCommand::EnableColo => "ENABLE_COLO".into(),
        MigCommand::PostcopyResume => "POSTCOPY_RESUME".into(),
        MigCommand::RecvBitmap => "RECV_BITMAP".into(),
        MigCommand::SwitchoverStart => "SWITCHOVER_START".into(),
        MigCommand::Other(n) => format!("command {n}"),
    }
}

fn inspect(input: Input) -> Result<Summary, ProxyError> {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut summary = Summary::default();
    input.decode(&mut decoder, "inspect", |_, frame| {
        summary.add(frame);
        Ok(())
    })?;
    summary.info = decoder.info().clone();
    summary.stream_bytes = decoder.offset();
    Ok(summary)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn inspect_bytes(bytes: &[u8]) -> Result<Summary, ProxyError> {
        let input = Input::from_reader(std::io::Cursor::new(bytes.to_vec()), "test".into());
        inspect(input)
    }

    fn vector(name: &str) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../codec/tests/vectors")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    }

    #[test]
    fn summarises_a_precopy_stream() {
        let input = vector("q72-a64fx.bin");
        let summary = inspect_bytes(&input[..]).unwrap();
        assert_eq!(summary.info.machine.as_deref(), Some("virt-7.2"));
        assert_eq!(summary.info.page_size, Some(4096));
        assert_eq!(summary.stream_bytes, input.len() as u64);
        let ram = summary.sections.iter().find(|s| s.idstr == "ram").unwrap();
        assert_eq!(ram.records, 3);
        assert_eq!(summary.cpus.len(), 2);
        assert_eq!(summary.cpus[0].registers.len(), 248);
        let total: u64 = summary.sections.iter().map(|s| s.bytes).sum();
        assert!(total < input.len() as u64);
        assert!(summary.ram.zero > 0);
        let all = summary.to_text(true);
        assert!(all.contains("cpu 1 (section version 22): 248 registers"));
        assert_eq!(all.matches("\n  0x").count(), 2 * 248);
        // Both vCPUs alike: one heading, one list.
        let digest = summary.to_text(false);
        assert!(digest.contains("\nvcpu 0-1 (2 vcpus), section version 22: 248 registers\n"));
        assert_eq!(digest.matches("\n  0x").count(), 248);
    }

    #[test]
    fn json_has_the_contract_shape() {
        let summary = inspect_bytes(&vector("q10-a64fx.bin")[..]).unwrap();
        let json = summary.to_json();
        assert_eq!(json["machine"], "virt-10.0");
        assert_eq!(json["page_size"], 4096);
        let ram = json["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["idstr"] == "ram")
            .unwrap();
        for key in ["id", "instance", "version", "records", "bytes"] {
            assert!(ram[key].is_u64(), "{key}");
        }
        let cpus = json["cpus"].as_array().unwrap();
        assert_eq!(cpus.len(), 2);
        let registers = cpus[0]["registers"].as_array().unwrap();
        assert_eq!(registers.len(), 261);
        for reg in registers {
            let id = reg["id"].as_str().unwrap();
            let value = reg["value"].as_str().unwrap();
            for hex in [id, value] {
                assert!(hex.starts_with("0x"), "{hex}");
                let digits = &hex[2..];
                assert!(digits == "0" || !digits.starts_with('0'), "{hex}");
                assert_eq!(digits, digits.to_lowercase());
            }
            assert!(reg["name"].is_string() || reg["name"].is_null());
        }
        // Registers in stream order, which QEMU keeps sorted by id.
        let ids: Vec<u64> = registers
            .iter()
            .map(|r| u64::from_str_radix(&r["id"].as_str().unwrap()[2..], 16).unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn postcopy_streams_report_the_package() {
        let summary = inspect_bytes(&vector("q10-postcopy-main.bin")[..]).unwrap();
        assert!(summary.cpus.is_empty());
        assert!(summary.packaged_bytes.is_some());
        assert!(summary.info.postcopy_advised);
        assert!(summary.to_text(false).contains("postcopy package"));
    }

    #[test]
    fn a_truncated_stream_is_an_input_error() {
        let input = vector("q72-a64fx.bin");
        let err = inspect_bytes(&input[..input.len() - 100]).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert!(err.to_string().contains("at byte"), "{err}");
    }
}
