//! The main-channel state machine and its `tokio_util::codec::Decoder` implementation.
//!
//! ```text
//!  FileHeader --QEVM v3--> Configuration --(07 ... | no 07)--> Record
//!
//!  Record --01 START / 02 PART / 03 END--> Ram | DirtyBitmap | Block   (by the START's idstr)
//!         --08 COMMAND (PACKAGED: + opaque blob)--> Record
//!         --00 EOF (no device phase: postcopy)--> Done
//!         --04 FULL after an END--> DevicePhase
//!         --04 FULL before any END--> error (early_setup device)
//!
//!  Ram ---ZERO/MULTIFD_FLUSH---> Ram
//!      ---MEM_SIZE--> RamBlockList --block list complete--> Ram
//!      ---PAGE/XBZRLE/COMPRESS_PAGE head--> Payload(n) --n bytes as they arrive--> Ram
//!      ---EOS--> Footer --7E id--> Record
//!  DirtyBitmap --chunk--> DirtyBitmap, --chunk with EOS--> Footer
//!  Block --DEVICE_BLOCK head--> Payload(1 MiB) --> Block | Footer, --EOS--> Footer
//!
//!  DevicePhase: hold every byte until the received bytes end with EOF + VMDESCRIPTION,
//!               walk them with the description --> DeviceState frame --> Done
//!  Done: any further byte is an error
//! ```
//!
//! Each call to `decode` yields at most one frame. Records are emitted whole (after being parsed
//! completely), except page and block payloads, which are cut from the read buffer in whatever
//! pieces have arrived (`Frame::Payload`), so a page never waits for its last byte and is never
//! copied. `Ok(None)` always means "need more bytes"; lengths read from the wire are checked
//! against [`Limits`] before anything waits for (and so buffers) that many bytes.
//!
//! # Finding the end of the device-state phase
//!
//! FULL sections carry no length, and the description that gives their sizes comes after them
//! (design-decisions §1). The decoder therefore keeps every byte from the first FULL section in the
//! read buffer and, each time bytes arrive, asks one question of the *end* of that buffer: does it
//! end with `00 06 <be32 len> <a JSON object of exactly len bytes>`? The object is found by
//! walking JSON structure backwards from the last byte (cheap: an inner object closes after a few
//! bytes). Only when that holds is the description parsed and the held bytes walked with it; the
//! walk must check every section header, subsection header and footer and land exactly on that
//! EOF. Nothing in the device payloads is ever searched for a marker. A source that sends no
//! description (`suppress-vmdesc=on`) leaves the decoder in this state: `awaiting_description()`
//! is true and the connection code owns the deadline; at end of input the decoder reports
//! `MissingDescription`.

use std::collections::HashMap;

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::device_phase::{self, DeviceState};
use crate::error::{DecodeError, SectionRef};
use crate::frame::{Frame, MigCommand, RecordKind, StreamInfo};
use crate::limits::Limits;
use crate::reader::{self, Reader};
use crate::wire::*;

/// What kind of iterable section a START introduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IterKind {
    Ram,
    DirtyBitmap,
    Block,
}

#[derive(Debug, Clone)]
struct Iterable {
    kind: IterKind,
    idstr: String,
}

/// Where to go after a payload has streamed through.
#[derive(Debug, Clone, Copy)]
enum AfterPayload {
    Ram,
    Block,
    Footer,
}

#[derive(Debug, Clone, Copy)]
enum State {
    FileHeader,
    /// After the header: a CONFIGURATION record follows if the next byte is 0x07.
    Configuration,
    /// Between top-level records.
    Record,
    /// Inside a RAM section, before a record header.
    Ram {
        section: u32,
    },
    /// A MEM_SIZE record: `parsed` bytes (header + complete block entries) validated and still in
    /// the buffer, `remaining` RAM bytes still to be accounted for by block entries.
    RamBlockList {
        section: u32,
        flags: u64,
        remaining: u64,
        parsed: usize,
    },
    /// Payload bytes of the current page or block record.
    Payload {
        section: u32,
        remaining: usize,
        then: AfterPayload,
    },
    DirtyBitmap {
        section: u32,
    },
    Block {
        section: u32,
    },
    Footer {
        section: u32,
    },
    /// Holding everything from the first FULL section (which starts at stream offset `start`).
    DevicePhase {
        start: u64,
    },
    Done,
}

/// Result of one step of the state machine.
enum Step {
    Frame(Frame),
    /// State changed without output; run again.
    Again,
    NeedMore,
}

/// Decoder of the QEMU main migration channel.
#[derive(Debug)]
pub struct StreamDecoder {
    limits: Limits,
    info: StreamInfo,
    offset: u64,
    state: State,
    iterables: HashMap<u32, Iterable>,
    page_size: u64,
    ignore_shared: bool,
    mapped_ram: bool,
    /// `ram_pagesize_summary` of a 16-byte POSTCOPY_ADVISE.
    advise_summary: Option<u64>,
    /// An END record has been seen: a FULL section now starts the device-state phase.
    seen_end: bool,
    /// RAM blocks of the MEM_SIZE list: idstr -> used_length. Page records must name one of
    /// them and stay inside it, as QEMU's loader demands ("Unknown ramblock", "Illegal RAM
    /// offset"): a damaged stream then fails here, at its offset, not in the destination.
    ram_blocks: HashMap<Vec<u8>, u64>,
    /// used_length of the block the last page record named (CONTINUE records refer to it).
    current_block_len: Option<u64>,
    /// Why the last apparent description at the end of the held bytes did not verify, and the
    /// held length it was checked at (so the same bytes are not walked twice).
    description_error: Option<(usize, DecodeError)>,
}

impl StreamDecoder {
    pub fn new(limits: Limits) -> Self {
        StreamDecoder {
            limits,
            info: StreamInfo::default(),
            offset: 0,
            state: State::FileHeader,
            iterables: HashMap::new(),
            page_size: 1 << ARM_TARGET_PAGE_BITS_MIN,
            ignore_shared: false,
            mapped_ram: false,
            advise_summary: None,
            seen_end: false,
            ram_blocks: HashMap::new(),
            current_block_len: None,
            description_error: None,
        }
    }

    /// While holding the device phase: why the bytes that last looked like a complete
    /// description (EOF, VMDESCRIPTION, be32 length reaching the end of the received bytes, a JSON
    /// object) did not verify. Such bytes may be device data that merely look like a description,
    /// so the decoder keeps holding; at end of input it reports this error instead of
    /// `MissingDescription`. Connection code can name it when its description deadline expires.
    pub fn description_error(&self) -> Option<&DecodeError> {
        self.description_error.as_ref().map(|(_, err)| err)
    }

    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// Stream offset of the next byte to decode.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The device-state phase is being held and its description has not been verified yet.
    ///
    /// FULL sections carry no length, so the decoder cannot tell where EOF lies before the
    /// description arrives: this is true from the first FULL section on. While it is true the
    /// source has finished RAM and is sending device state (tens of KB, a few MB at most); the
    /// connection code should fail the migration when no further byte arrives within its
    /// description deadline.
    pub fn awaiting_description(&self) -> bool {
        matches!(self.state, State::DevicePhase { .. })
    }

    /// Nothing more may follow (after the description / final EOF).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn section_ref(&self, id: u32) -> SectionRef {
        SectionRef {
            id,
            idstr: self.iterables.get(&id).map(|it| it.idstr.clone()),
        }
    }

    fn at(&self, pos: usize) -> u64 {
        self.offset + pos as u64
    }

    fn in_section(&self, section: u32, pos: usize, expected: &str, found: String) -> DecodeError {
        DecodeError::InSection {
            offset: self.at(pos),
            section: self.section_ref(section),
            expected: expected.to_string(),
            found,
        }
    }

    fn emit(
        &mut self,
        src: &mut BytesMut,
        n: usize,
        kind: RecordKind,
        section_id: Option<u32>,
    ) -> Step {
        let bytes = src.split_to(n).freeze();
        self.offset += n as u64;
        Step::Frame(Frame::Verbatim {
            kind,
            section_id,
            bytes,
        })
    }

    /// A whole record is not complete yet: fine, unless it already exceeds the record limit.
    fn need_record(&self, src: &BytesMut, what: &str) -> Result<Step, DecodeError> {
        if src.len() > self.limits.max_record {
            return Err(DecodeError::LimitExceeded {
                offset: self.offset,
                what: what.to_string(),
                len: src.len() as u64,
                limit: self.limits.max_record,
            });
        }
        Ok(Step::NeedMore)
    }

    fn step(&mut self, src: &mut BytesMut) -> Result<Step, DecodeError> {
        match self.state {
            State::FileHeader => self.file_header(src),
            State::Configuration => self.configuration(src),
            State::Record => self.record(src),
            State::Ram { section } => self.ram_record(src, section),
            State::RamBlockList {
                section,
                flags,
                remaining,
                parsed,
            } => self.ram_block_list(src, section, flags, remaining, parsed),
            State::Payload {
                section,
                remaining,
                then,
            } => Ok(self.payload(src, section, remaining, then)),
            State::DirtyBitmap { section } => self.dirty_bitmap_chunk(src, section),
            State::Block { section } => self.block_record(src, section),
            State::Footer { section } => self.footer(src, section),
            State::DevicePhase { start } => self.device_phase(src, start),
            State::Done => {
                if src.is_empty() {
                    Ok(Step::NeedMore)
                } else {
                    Err(DecodeError::TrailingData {
                        offset: self.offset,
                    })
                }
            }
        }
    }

    fn file_header(&mut self, src: &mut BytesMut) -> Result<Step, DecodeError> {
        let mut r = Reader::new(src);
        let (Some(magic), Some(version)) = (r.be32(), r.be32()) else {
            return Ok(Step::NeedMore);
        };
        if magic != QEMU_VM_FILE_MAGIC {
            return Err(DecodeError::Unexpected {
                offset: 0,
                expected: "file magic 0x5145564d (\"QEVM\")".into(),
                found: format!("0x{magic:08x}"),
            });
        }
        if version != QEMU_VM_FILE_VERSION {
            return Err(DecodeError::Unexpected {
                offset: 4,
                expected: "file version 3".into(),
                found: version.to_string(),
            });
        }
        self.state = State::Configuration;
        Ok(self.emit(src, 8, RecordKind::FileHeader, None))
    }

    /// `configuration` vmstate: be32 len, machine name, subsections (stream-format §1).
    fn configuration(&mut self, src: &mut BytesMut) -> Result<Step, DecodeError> {
        match src.first() {
            None => return Ok(Step::NeedMore),
            Some(&QEMU_VM_CONFIGURATION) => {}
            Some(_) => {
                // send-configuration=off: the target's minimum page size applies.
                self.info.page_size = Some(self.page_size);
                self.state = State::Record;
                return Ok(Step::Again);
            }
        }
        let mut r = Reader::at(src, 1);
        let Some(len) = r.be32() else {
            return Ok(Step::NeedMore);
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.limits.max_record {
            return Err(DecodeError::LimitExceeded {
                offset: self.at(1),
                what: "machine name".into(),
                len: len as u64,
                limit: self.limits.max_record,
            });
        }
        let Some(machine) = r.bytes(len) else {
            return self.need_record(src, "configuration record");
        };
        let machine = reader::name(machine);
        let mut page_bits = ARM_TARGET_PAGE_BITS_MIN;
        let mut capabilities = Vec::new();
        // Subsections follow while the next byte is QEMU_VM_SUBSECTION; one byte of look-ahead
        // past the record is needed to know it has ended.
        loop {
            let sub_start = r.pos();
            match r.u8() {
                None => return self.need_record(src, "configuration record"),
                Some(QEMU_VM_SUBSECTION) => {}
                Some(_) => {
                    r = Reader::at(src, sub_start);
                    break;
                }
            }
            let (Some(name), Some(_version)) = (r.counted(), r.be32()) else {
                return self.need_record(src, "configuration record");
            };
            let name_str = reader::name(name);
            match name_str.as_str() {
                CONFIGURATION_TARGET_PAGE_BITS => {
                    let Some(bits) = r.be32() else {
                        return self.need_record(src, "configuration record");
                    };
                    if !(ARM_TARGET_PAGE_BITS_MIN..=30).contains(&bits) {
                        return Err(DecodeError::Unexpected {
                            offset: self.at(r.pos() - 4),
                            expected: "target page bits between 10 and 30".into(),
                            found: bits.to_string(),
                        });
                    }
                    page_bits = bits;
                }
                CONFIGURATION_CAPABILITIES => {
                    let Some(count) = r.be32() else {
                        return self.need_record(src, "configuration record");
                    };
                    for _ in 0..count {
                        let Some(cap) = r.counted() else {
                            return self.need_record(src, "configuration record");
                        };
                        capabilities.push(reader::name(cap));
                    }
                }
                CONFIGURATION_UUID => {
                    if r.bytes(16).is_none() {
                        return self.need_record(src, "configuration record");
                    }
                }
                _ => {
                    return Err(DecodeError::Unexpected {
                        offset: self.at(sub_start),
                        expected: "a known configuration subsection".into(),
                        found: format!("\"{name_str}\""),
                    })
                }
            }
        }
        let len = r.pos();
        self.page_size = 1u64 << page_bits;
        self.ignore_shared = capabilities.iter().any(|c| c == "x-ignore-shared");
        self.mapped_ram = capabilities.iter().any(|c| c == "mapped-ram");
        self.info.machine = Some(machine);
        self.info.page_size = Some(self.page_size);
        self.info.capabilities = capabilities;
        self.state = State::Record;
        Ok(self.emit(src, len, RecordKind::Configuration, None))
    }

    fn record(&mut self, src: &mut BytesMut) -> Result<Step, DecodeError> {
        let Some(&tag) = src.first() else {
            return Ok(Step::NeedMore);
        };
        match tag {
            QEMU_VM_SECTION_START => self.section_start(src),
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                let mut r = Reader::at(src, 1);
                let Some(id) = r.be32() else {
                    return Ok(Step::NeedMore);
                };
                let Some(iterable) = self.iterables.get(&id) else {
                    return Err(DecodeError::Unexpected {
                        offset: self.at(1),
                        expected: "the id of a section opened by a START record".into(),
                        found: format!("section id {id}"),
                    });
                };
                self.state = iter_state(iterable.kind, id);
                let kind = if tag == QEMU_VM_SECTION_END {
                    self.seen_end = true;
                    RecordKind::SectionEnd
                } else {
                    RecordKind::SectionPart
                };
                Ok(self.emit(src, 5, kind, Some(id)))
            }
            QEMU_VM_SECTION_FULL => {
                if !self.seen_end {
                    let mut r = Reader::at(src, 1);
                    let (Some(id), Some(idstr)) = (r.be32(), r.counted()) else {
                        return Ok(Step::NeedMore);
                    };
                    return Err(DecodeError::EarlySetupDevice {
                        offset: self.offset,
                        what: format!("full section {id} \"{}\"", reader::name(idstr)),
                    });
                }
                self.state = State::DevicePhase { start: self.offset };
                Ok(Step::Again)
            }
            QEMU_VM_COMMAND => self.command(src),
            QEMU_VM_EOF => {
                // Without a device phase (postcopy: device state went in the package) EOF ends
                // the stream and no description follows.
                self.state = State::Done;
                Ok(self.emit(src, 1, RecordKind::Eof, None))
            }
            other => Err(DecodeError::Unexpected {
                offset: self.offset,
                expected: "a record type (START, PART, END, FULL, COMMAND or EOF)".into(),
                found: record_type_name(other),
            }),
        }
    }

    fn section_start(&mut self, src: &mut BytesMut) -> Result<Step, DecodeError> {
        let mut r = Reader::at(src, 1);
        let (Some(id), Some(idstr), Some(instance), Some(version)) =
            (r.be32(), r.counted(), r.be32(), r.be32())
        else {
            return Ok(Step::NeedMore);
        };
        let idstr = reader::name(idstr);
        let kind = match idstr.as_str() {
            IDSTR_RAM => IterKind::Ram,
            IDSTR_DIRTY_BITMAP => IterKind::DirtyBitmap,
            IDSTR_BLOCK => IterKind::Block,
            _ => {
                // An unknown iterable cannot be delimited (stream-format §5): refuse cleanly.
                return Err(DecodeError::InSection {
                    offset: self.offset,
                    section: SectionRef {
                        id,
                        idstr: Some(idstr),
                    },
                    expected: "an iterable section this codec knows (ram, dirty-bitmap, block)"
                        .into(),
                    found: "an unknown iterable section".into(),
                });
            }
        };
        self.iterables.insert(
            id,
            Iterable {
                kind,
                idstr: idstr.clone(),
            },
        );
        self.state = iter_state(kind, id);
        let len = r.pos();
        Ok(self.emit(
            src,
            len,
            RecordKind::SectionStart {
                idstr,
                instance,
                version,
            },
            Some(id),
        ))
    }

    /// `QEMU_VM_COMMAND`: be16 cmd, be16 len, len bytes; PACKAGED adds an opaque blob.
    fn command(&mut self, src: &mut BytesMut) -> Result<Step, DecodeError> {
        let mut r = Reader::at(src, 1);
        let (Some(cmd), Some(len)) = (r.be16(), r.be16()) else {
            return Ok(Step::NeedMore);
        };
        let expected_len: Option<u16> = match cmd {
            MIG_CMD_OPEN_RETURN_PATH
            | MIG_CMD_POSTCOPY_LISTEN
            | MIG_CMD_POSTCOPY_RUN
            | MIG_CMD_ENABLE_COLO
            | MIG_CMD_POSTCOPY_RESUME
            | MIG_CMD_SWITCHOVER_START => Some(0),
            MIG_CMD_PING | MIG_CMD_PACKAGED => Some(4),
            _ => None,
        };
        let bad_len = |expected: &str| DecodeError::Unexpected {
            offset: self.at(3),
            expected: format!("length {expected} for command {cmd}"),
            found: len.to_string(),
        };
        if expected_len.is_some_and(|l| l != len)
            || (cmd == MIG_CMD_POSTCOPY_ADVISE && len != 0 && len != 16)
        {
            return Err(bad_len(&match expected_len {
                Some(l) => l.to_string(),
                None => "0 or 16".into(),
            }));
        }
        if cmd == MIG_CMD_INVALID {
            return Err(DecodeError::Unexpected {
                offset: self.at(1),
                expected: "a migration command".into(),
                found: "MIG_CMD_INVALID (0)".into(),
            });
        }
        let Some(payload) = r.bytes(usize::from(len)) else {
            return Ok(Step::NeedMore);
        };
        let mut p = Reader::new(payload);
        let kind = match cmd {
            MIG_CMD_OPEN_RETURN_PATH => {
                self.info.return_path = true;
                MigCommand::OpenReturnPath
            }
            MIG_CMD_PING => MigCommand::Ping(p.be32().unwrap_or(0)),
            MIG_CMD_POSTCOPY_ADVISE => {
                self.info.postcopy_advised = true;
                if len == 16 {
                    self.advise_summary = p.be64();
                }
                MigCommand::PostcopyAdvise { len }
            }
            MIG_CMD_POSTCOPY_LISTEN => MigCommand::PostcopyListen,
            MIG_CMD_POSTCOPY_RUN => MigCommand::PostcopyRun,
            MIG_CMD_POSTCOPY_RAM_DISCARD => MigCommand::PostcopyRamDiscard,
            MIG_CMD_PACKAGED => {
                let blob_len = p.be32().unwrap_or(0);
                let blob = usize::try_from(blob_len).unwrap_or(usize::MAX);
                if blob > self.limits.max_packaged {
                    return Err(DecodeError::LimitExceeded {
                        offset: self.at(5),
                        what: "postcopy package (MIG_CMD_PACKAGED)".into(),
                        len: u64::from(blob_len),
                        limit: self.limits.max_packaged,
                    });
                }
                if r.bytes(blob).is_none() {
                    return Ok(Step::NeedMore);
                }
                MigCommand::Packaged { blob_len }
            }
            MIG_CMD_ENABLE_COLO => MigCommand::EnableColo,
            MIG_CMD_POSTCOPY_RESUME => MigCommand::PostcopyResume,
            MIG_CMD_RECV_BITMAP => MigCommand::RecvBitmap,
            MIG_CMD_SWITCHOVER_START => MigCommand::SwitchoverStart,
            other => MigCommand::Other(other),
        };
        let total = r.pos();
        Ok(self.emit(src, total, RecordKind::Command(kind), None))
    }

    /// One RAM record (stream-format §4): be64 offset|flags, then per flag.
    fn ram_record(&mut self, src: &mut BytesMut, section: u32) -> Result<Step, DecodeError> {
        let mut r = Reader::new(src);
        let Some(header) = r.be64() else {
            return Ok(Step::NeedMore);
        };
        // QEMU: flags = addr & ~TARGET_PAGE_MASK.
        let flags = header & (self.page_size - 1);
        let kind = flags & !RAM_SAVE_FLAG_CONTINUE;
        let record = RecordKind::RamRecord { flags };
        match kind {
            RAM_SAVE_FLAG_ZERO
            | RAM_SAVE_FLAG_PAGE
            | RAM_SAVE_FLAG_XBZRLE
            | RAM_SAVE_FLAG_COMPRESS_PAGE => {
                let block_len = if flags & RAM_SAVE_FLAG_CONTINUE == 0 {
                    let Some(name) = r.counted() else {
                        return Ok(Step::NeedMore);
                    };
                    match self.ram_blocks.get(name) {
                        Some(&len) => len,
                        None => {
                            return Err(self.in_section(
                                section,
                                8,
                                "a ram block of the MEM_SIZE list",
                                format!("{:?}", reader::name(name)),
                            ))
                        }
                    }
                } else {
                    match self.current_block_len {
                        Some(len) => len,
                        None => {
                            return Err(self.in_section(
                                section,
                                0,
                                "a ram block name before the first CONTINUE record",
                                format!("flags 0x{flags:x}"),
                            ))
                        }
                    }
                };
                let page_offset = header & !(self.page_size - 1);
                if page_offset
                    .checked_add(self.page_size)
                    .is_none_or(|end| end > block_len)
                {
                    return Err(self.in_section(
                        section,
                        0,
                        &format!("a page offset inside its ram block of {block_len} bytes"),
                        format!("0x{page_offset:x}"),
                    ));
                }
                let (payload, then) = match kind {
                    RAM_SAVE_FLAG_ZERO => {
                        let Some(fill) = r.u8() else {
                            return Ok(Step::NeedMore);
                        };
                        // Both senders write 0; QEMU 10.0's loader refuses anything else.
                        if fill != 0 {
                            return Err(self.in_section(
                                section,
                                r.pos() - 1,
                                "a zero page fill byte 0x00",
                                format!("0x{fill:02x}"),
                            ));
                        }
                        (0, AfterPayload::Ram)
                    }
                    RAM_SAVE_FLAG_PAGE => (self.page_size_usize(), AfterPayload::Ram),
                    RAM_SAVE_FLAG_XBZRLE => {
                        let (Some(encoding), Some(len)) = (r.u8(), r.be16()) else {
                            return Ok(Step::NeedMore);
                        };
                        if encoding != ENCODING_FLAG_XBZRLE {
                            return Err(self.in_section(
                                section,
                                r.pos() - 3,
                                "xbzrle encoding flag 0x01",
                                format!("0x{encoding:02x}"),
                            ));
                        }
                        if u64::from(len) > self.page_size {
                            return Err(self.in_section(
                                section,
                                r.pos() - 2,
                                "an xbzrle length up to the page size",
                                len.to_string(),
                            ));
                        }
                        (usize::from(len), AfterPayload::Ram)
                    }
                    _ => {
                        let Some(len) = r.be32() else {
                            return Ok(Step::NeedMore);
                        };
                        // QEMU refuses more than compressBound(TARGET_PAGE_SIZE).
                        let bound = compress_bound(self.page_size);
                        if u64::from(len) > bound {
                            return Err(self.in_section(
                                section,
                                r.pos() - 4,
                                &format!("a compressed page of at most {bound} bytes"),
                                len.to_string(),
                            ));
                        }
                        (usize::try_from(len).unwrap_or(usize::MAX), AfterPayload::Ram)
                    }
                };
                self.current_block_len = Some(block_len);
                let head = r.pos();
                if payload > 0 {
                    self.state = State::Payload {
                        section,
                        remaining: payload,
                        then,
                    };
                }
                Ok(self.emit(src, head, record, Some(section)))
            }
            RAM_SAVE_FLAG_MEM_SIZE => {
                if self.mapped_ram {
                    return Err(self.in_section(
                        section,
                        0,
                        "a sequential stream",
                        "the mapped-ram capability (file: migrations only)".into(),
                    ));
                }
                let total = header & !(self.page_size - 1);
                if total == 0 {
                    return Ok(self.emit(src, 8, record, Some(section)));
                }
                self.state = State::RamBlockList {
                    section,
                    flags,
                    remaining: total,
                    parsed: 8,
                };
                Ok(Step::Again)
            }
            // QEMU writes these two as the bare flag: address bits mean a misaligned stream.
            RAM_SAVE_FLAG_MULTIFD_FLUSH | RAM_SAVE_FLAG_EOS if header != kind => {
                Err(self.in_section(
                    section,
                    0,
                    &format!("a bare 0x{kind:x} record header"),
                    format!("0x{header:016x}"),
                ))
            }
            RAM_SAVE_FLAG_MULTIFD_FLUSH => Ok(self.emit(src, 8, record, Some(section))),
            RAM_SAVE_FLAG_EOS => {
                self.state = State::Footer { section };
                Ok(self.emit(src, 8, record, Some(section)))
            }
            _ => Err(self.in_section(
                section,
                0,
                "a ram record flag (ZERO, MEM_SIZE, PAGE, EOS, XBZRLE, COMPRESS_PAGE, MULTIFD_FLUSH)",
                if flags & RAM_SAVE_FLAG_HOOK != 0 {
                    format!("flags 0x{flags:x} (RAM_SAVE_FLAG_HOOK: rdma is not supported)")
                } else {
                    format!("flags 0x{flags:x}")
                },
            )),
        }
    }

    fn page_size_usize(&self) -> usize {
        // page bits are at most 30 (checked in the configuration).
        usize::try_from(self.page_size).unwrap_or(usize::MAX)
    }

    /// The MEM_SIZE block list: entries until their used_length values add up to the total.
    fn ram_block_list(
        &mut self,
        src: &mut BytesMut,
        section: u32,
        flags: u64,
        mut remaining: u64,
        mut parsed: usize,
    ) -> Result<Step, DecodeError> {
        if let Some(summary) = self.advise_summary {
            // Per-block page sizes are written for hugepage blocks only, and the stream does not
            // say which (stream-format §4.3 A): refuse rather than guess.
            if summary.count_ones() > 1 {
                return Err(self.in_section(
                    section,
                    0,
                    "a single page size in the postcopy advise summary",
                    format!("ram_pagesize_summary 0x{summary:x} (mixed page sizes)"),
                ));
            }
        }
        if parsed == 8 {
            // A new list replaces the old one (QEMU resends it after a block list change).
            self.ram_blocks.clear();
            self.current_block_len = None;
        }
        while remaining > 0 {
            let mut r = Reader::at(src, parsed);
            let (Some(name), Some(used_length)) = (r.counted(), r.be64()) else {
                break;
            };
            if self.ignore_shared && r.be64().is_none() {
                break;
            }
            if used_length > remaining {
                return Err(self.in_section(
                    section,
                    r.pos() - 8,
                    &format!("a block length within the remaining {remaining} bytes of MEM_SIZE"),
                    used_length.to_string(),
                ));
            }
            remaining -= used_length;
            parsed = r.pos();
            self.ram_blocks.insert(name.to_vec(), used_length);
        }
        if parsed > self.limits.max_record {
            return Err(DecodeError::LimitExceeded {
                offset: self.offset,
                what: "ram block list (MEM_SIZE)".into(),
                len: parsed as u64,
                limit: self.limits.max_record,
            });
        }
        if remaining > 0 {
            self.state = State::RamBlockList {
                section,
                flags,
                remaining,
                parsed,
            };
            return Ok(Step::NeedMore);
        }
        self.state = State::Ram { section };
        Ok(self.emit(src, parsed, RecordKind::RamRecord { flags }, Some(section)))
    }

    fn payload(
        &mut self,
        src: &mut BytesMut,
        section: u32,
        remaining: usize,
        then: AfterPayload,
    ) -> Step {
        if src.is_empty() {
            return Step::NeedMore;
        }
        let n = remaining.min(src.len());
        let bytes = src.split_to(n).freeze();
        self.offset += n as u64;
        self.state = if n == remaining {
            match then {
                AfterPayload::Ram => State::Ram { section },
                AfterPayload::Block => State::Block { section },
                AfterPayload::Footer => State::Footer { section },
            }
        } else {
            State::Payload {
                section,
                remaining: remaining - n,
                then,
            }
        };
        Step::Frame(Frame::Payload {
            section_id: section,
            bytes,
        })
    }

    /// One dirty-bitmap chunk (migration/block-dirty-bitmap.c, stream-format §5).
    fn dirty_bitmap_chunk(
        &mut self,
        src: &mut BytesMut,
        section: u32,
    ) -> Result<Step, DecodeError> {
        let mut r = Reader::new(src);
        let Some(flags) = r.u8() else {
            return Ok(Step::NeedMore);
        };
        if flags & DIRTY_BITMAP_MIG_EXTRA_FLAGS_8 != 0 {
            return Err(self.in_section(
                section,
                0,
                "single-byte dirty-bitmap flags",
                format!("flags 0x{flags:02x} (extra flag bytes are never sent by qemu 7.2/10.0)"),
            ));
        }
        if flags & DIRTY_BITMAP_MIG_FLAG_DEVICE_NAME != 0 && r.counted().is_none() {
            return self.need_record(src, "dirty-bitmap chunk");
        }
        if flags & DIRTY_BITMAP_MIG_FLAG_BITMAP_NAME != 0 && r.counted().is_none() {
            return self.need_record(src, "dirty-bitmap chunk");
        }
        if flags & DIRTY_BITMAP_MIG_FLAG_START != 0 {
            // be32 granularity (despite the be64 in QEMU's format comment), u8 bitmap flags.
            if r.be32().is_none() || r.u8().is_none() {
                return Ok(Step::NeedMore);
            }
        } else if flags & DIRTY_BITMAP_MIG_FLAG_COMPLETE != 0 {
        } else if flags & DIRTY_BITMAP_MIG_FLAG_BITS != 0 {
            let (Some(_first), Some(_count)) = (r.be64(), r.be32()) else {
                return Ok(Step::NeedMore);
            };
            if flags & DIRTY_BITMAP_MIG_FLAG_ZEROES == 0 {
                let Some(size) = r.be64() else {
                    return Ok(Step::NeedMore);
                };
                let size_usize = usize::try_from(size).unwrap_or(usize::MAX);
                if size_usize > self.limits.max_record {
                    return Err(DecodeError::LimitExceeded {
                        offset: self.at(r.pos() - 8),
                        what: format!("dirty-bitmap chunk in {}", self.section_ref(section)),
                        len: size,
                        limit: self.limits.max_record,
                    });
                }
                if r.bytes(size_usize).is_none() {
                    return Ok(Step::NeedMore);
                }
            }
        }
        if flags & DIRTY_BITMAP_MIG_FLAG_EOS != 0 {
            self.state = State::Footer { section };
        }
        let len = r.pos();
        Ok(self.emit(src, len, RecordKind::IterableChunk, Some(section)))
    }

    /// One block-migration record (QEMU <= 9.0 migration/block.c).
    fn block_record(&mut self, src: &mut BytesMut, section: u32) -> Result<Step, DecodeError> {
        let mut r = Reader::new(src);
        let Some(header) = r.be64() else {
            return Ok(Step::NeedMore);
        };
        // flags = addr & (BDRV_SECTOR_SIZE - 1)
        let flags = header & ((1u64 << BDRV_SECTOR_BITS) - 1);
        let eos = flags & BLK_MIG_FLAG_EOS != 0;
        let after = if eos {
            State::Footer { section }
        } else {
            State::Block { section }
        };
        if flags & BLK_MIG_FLAG_DEVICE_BLOCK != 0 {
            if r.counted().is_none() {
                return Ok(Step::NeedMore);
            }
            let head = r.pos();
            self.state = if flags & BLK_MIG_FLAG_ZERO_BLOCK != 0 {
                after
            } else {
                State::Payload {
                    section,
                    remaining: BLK_MIG_BLOCK_SIZE,
                    then: if eos {
                        AfterPayload::Footer
                    } else {
                        AfterPayload::Block
                    },
                }
            };
            return Ok(self.emit(src, head, RecordKind::IterableChunk, Some(section)));
        }
        if flags & BLK_MIG_FLAG_PROGRESS == 0 && !eos {
            return Err(self.in_section(
                section,
                0,
                "a block migration flag (DEVICE_BLOCK, EOS, PROGRESS)",
                format!("flags 0x{flags:x}"),
            ));
        }
        self.state = after;
        Ok(self.emit(src, 8, RecordKind::IterableChunk, Some(section)))
    }

    fn footer(&mut self, src: &mut BytesMut, section: u32) -> Result<Step, DecodeError> {
        let mut r = Reader::new(src);
        let (Some(tag), Some(id)) = (r.u8(), r.be32()) else {
            if let Some(&tag) = src.first() {
                if tag != QEMU_VM_SECTION_FOOTER {
                    return Err(self.in_section(
                        section,
                        0,
                        "section footer (0x7e)",
                        record_type_name(tag),
                    ));
                }
            }
            return Ok(Step::NeedMore);
        };
        if tag != QEMU_VM_SECTION_FOOTER || id != section {
            return Err(self.in_section(
                section,
                0,
                &format!("section footer 7e {section:08x}"),
                format!("{tag:02x} {id:08x}"),
            ));
        }
        self.state = State::Record;
        Ok(self.emit(src, 5, RecordKind::SectionFooter, Some(section)))
    }

    fn held_limit(&self) -> usize {
        self.limits
            .max_device_state
            .saturating_add(self.limits.max_description)
            .saturating_add(6)
    }

    fn device_phase(&mut self, src: &mut BytesMut, start: u64) -> Result<Step, DecodeError> {
        if src.len() > self.held_limit() {
            return Err(DecodeError::LimitExceeded {
                offset: start,
                what: "held device-state phase (full sections, eof and description)".into(),
                len: src.len() as u64,
                limit: self.held_limit(),
            });
        }
        if matches!(&self.description_error, Some((len, _)) if *len == src.len()) {
            return Ok(Step::NeedMore);
        }
        let Some(desc_len_pos) = device_phase::description_at_end(src, self.limits.max_description)
        else {
            return Ok(Step::NeedMore);
        };
        // Device payloads are guest data and may end with bytes that look like a description:
        // only a walk that verifies every header and footer and lands exactly on EOF counts.
        match device_phase::walk(src, start, desc_len_pos) {
            Ok(layout) => {
                let len = src.len();
                let held = src.split_to(len).freeze();
                self.offset += len as u64;
                self.description_error = None;
                self.state = State::Done;
                Ok(Step::Frame(Frame::DeviceState(DeviceState::new(
                    held,
                    start,
                    desc_len_pos,
                    layout,
                ))))
            }
            Err(err) => {
                self.description_error = Some((src.len(), err));
                Ok(Step::NeedMore)
            }
        }
    }

    /// Why the input may not end here.
    fn eof_error(&self, src: &BytesMut) -> DecodeError {
        let expected = match self.state {
            State::FileHeader => "the file header",
            State::Configuration => "the configuration record",
            State::Record => "a record (the stream ended before QEMU_VM_EOF)",
            State::Ram { .. } => "a ram record",
            State::RamBlockList { .. } => "the ram block list",
            State::Payload { .. } => "a page payload",
            State::DirtyBitmap { .. } => "a dirty-bitmap chunk",
            State::Block { .. } => "a block migration record",
            State::Footer { .. } => "a section footer",
            State::DevicePhase { start } => {
                return match &self.description_error {
                    Some((len, err)) if *len == src.len() => clone_error(err),
                    _ => DecodeError::MissingDescription { offset: start },
                };
            }
            State::Done => {
                return DecodeError::TrailingData {
                    offset: self.offset,
                }
            }
        };
        DecodeError::Truncated {
            offset: self.offset + src.len() as u64,
            expected: expected.to_string(),
        }
    }
}

/// `DecodeError` holds an `io::Error`, so it is not `Clone`; the device-phase variants are.
fn clone_error(err: &DecodeError) -> DecodeError {
    match err {
        DecodeError::Description { offset, message } => DecodeError::Description {
            offset: *offset,
            message: message.clone(),
        },
        DecodeError::DeviceState {
            offset,
            section,
            message,
        } => DecodeError::DeviceState {
            offset: *offset,
            section: section.clone(),
            message: message.clone(),
        },
        DecodeError::UnexpectedInDevicePhase { offset, found } => {
            DecodeError::UnexpectedInDevicePhase {
                offset: *offset,
                found: found.clone(),
            }
        }
        other => DecodeError::Malformed {
            offset: 0,
            message: other.to_string(),
        },
    }
}

fn iter_state(kind: IterKind, section: u32) -> State {
    match kind {
        IterKind::Ram => State::Ram { section },
        IterKind::DirtyBitmap => State::DirtyBitmap { section },
        IterKind::Block => State::Block { section },
    }
}

/// zlib's compressBound(), which QEMU uses to bound a COMPRESS_PAGE record.
fn compress_bound(len: u64) -> u64 {
    len + (len >> 12) + (len >> 14) + (len >> 25) + 13
}

impl Decoder for StreamDecoder {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        loop {
            match self.step(src)? {
                Step::Frame(frame) => return Ok(Some(frame)),
                Step::Again => continue,
                Step::NeedMore => return Ok(None),
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() && self.is_done() {
            return Ok(None);
        }
        Err(self.eof_error(src))
    }
}
