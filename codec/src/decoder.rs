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
//! The records themselves are parsed by pure functions in their own modules (`configuration`,
//! `command`, `section`, `ram`, `bitmap`, `block`, `device_phase`); this module keeps the state
//! between them. Each call to `decode` yields at most one frame. Records are emitted whole (after being parsed
//! completely), except page and block payloads, which are cut from the read buffer in whatever
//! pieces have arrived (`Frame::Payload`), so a page never waits for its last byte and is never
//! copied. `Ok(None)` always means "need more bytes"; lengths read from the wire are checked
//! against [`Limits`] before anything waits for (and so buffers) that many bytes.
//!
//! # Finding the end of the device-state phase
//!
//! FULL sections carry no length, and the description that gives their sizes comes after them
//! (DESIGN.md, "Device state is delimited exactly, never by scanning"). The decoder
//! therefore keeps every byte from the first FULL section in the read buffer and, each time bytes
//! arrive, asks one question: does the received data end with `00 06 <be32 len> <a JSON object of
//! exactly len bytes>`? `candidates` answers it looking at each held byte once. Only when that
//! holds is the description parsed and the held bytes walked with it; the walk must check every
//! section header, subsection header and footer and land exactly on that EOF. A source that sends no
//! description (`suppress-vmdesc=on`) leaves the decoder in this state: `awaiting_description()`
//! is true and the connection code owns the deadline; at end of input the decoder reports
//! `MissingDescription`.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::bitmap;
use crate::block;
use crate::candidates::CandidateScanner;
use crate::command::{self, MigCommand};
use crate::configuration::ConfigurationParser;
use crate::description_cache::DescriptionCache;
use crate::device_phase::{self, DeviceState};
use crate::error::{DecodeError, SectionRef};
use crate::frame::{Frame, RecordKind, StreamInfo};
use crate::limits::Limits;
use crate::ram::{self, RamContext, RamRecord};
use crate::record::RecordError;
use crate::reference::ReferenceDescription;
use crate::section;
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
    /// Checking relay: a description verified at the end of the received bytes and the phase was
    /// released, but without a reference nothing proves that it was the real one. If more bytes
    /// arrive, it was not: the phase goes on (see `set_checking_relay`).
    Ended {
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

/// Work the decoder has done, for tests that hold it to constant work per received byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeWork {
    /// Held device-phase bytes examined while looking for the description (each once).
    pub device_phase_bytes_scanned: u64,
    /// Descriptions parsed and walked (candidate endings tried).
    pub descriptions_tried: u64,
    /// Of those that were accepted, how many reused the description cache's parse (the same
    /// text as the cached one: not parsed again).
    pub descriptions_reused: u64,
    /// Configuration elements (machine name, subsection headers, capabilities) parsed.
    pub configuration_elements: u64,
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
    /// Progress through a configuration record split over several reads.
    configuration: ConfigurationParser,
    /// Progress of the search for the end of the device phase.
    candidates: CandidateScanner,
    /// Why the last apparent description at the end of the held bytes did not verify.
    description_error: Option<DecodeError>,
    work: DecodeWork,
    /// Endings of the device phase must have this layout (see `reference`).
    reference: Option<ReferenceDescription>,
    /// The listener's last accepted description, parsed (see `description_cache.rs`).
    description_cache: Option<DescriptionCache>,
    /// Checking relay: an unconfirmed ending does not end the stream (see `set_checking_relay`).
    checking_relay: bool,
    /// The device phase as released so far when a released ending turned out to be false: the
    /// decoder then holds the phase in its own buffer (`phase`), `released` bytes of which the
    /// connection has already forwarded.
    released_phase: Option<Bytes>,
    phase: Option<BytesMut>,
    released: usize,
    /// Consecutive page records come as one frame (see `set_coalesce_ram_records`).
    coalesce_ram_records: bool,
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
            configuration: ConfigurationParser::default(),
            candidates: CandidateScanner::default(),
            description_error: None,
            work: DecodeWork::default(),
            reference: None,
            description_cache: None,
            checking_relay: false,
            released_phase: None,
            phase: None,
            released: 0,
            coalesce_ram_records: false,
        }
    }

    /// Accept an ending of the device phase only if its description has this layout (see
    /// `ReferenceDescription`): the ending is then exact, whatever the guest wrote into its state.
    pub fn set_reference_description(&mut self, reference: ReferenceDescription) {
        self.reference = Some(reference);
    }

    /// Reuse (and update) `cache`'s parsed description when a description is byte-for-byte the
    /// cached one. Changes nothing that is accepted or refused, only what is recomputed.
    pub fn set_description_cache(&mut self, cache: DescriptionCache) {
        self.description_cache = Some(cache);
    }

    /// Compile the walk plan of the cache's description, if not done yet
    /// ([`DescriptionCache::prepare`]): for after the device state has been released.
    pub fn prepare_description_cache(&self) {
        if let Some(cache) = &self.description_cache {
            cache.prepare();
        }
    }

    /// For a connection that forwards the device state unchanged (no rewrite): an ending that
    /// verified but is not confirmed by a reference description is released (as a
    /// `Frame::DeviceState`) without ending the stream. If more bytes follow, the ending was
    /// device data that looked like one (a guest can write such bytes into its registers), and the
    /// phase simply goes on: the decoder keeps the released bytes (no copy until then), holds what
    /// follows, and releases it (as `RecordKind::DevicePhaseContinued` frames) only once a later
    /// description verifies the WHOLE phase from its first section. Forwarding a false ending is
    /// harmless: the destination reads those bytes as the field they really are.
    ///
    /// A connection that rewrites must not use this without a reference (a rewrite based on a
    /// forged description cannot be taken back); `DeviceState::is_confirmed` says which it got.
    pub fn set_checking_relay(&mut self, relay: bool) {
        self.checking_relay = relay;
    }

    /// For a connection that forwards RAM as it is: consecutive page records (ZERO, PAGE, XBZRLE,
    /// COMPRESS_PAGE: header and payload) come as one `RecordKind::RamRecords` frame, one slice
    /// of the read buffer, instead of a frame per header and per payload. Every header is still
    /// parsed and checked exactly as it is without this (each one once), and the bytes are the
    /// same; only the cut differs: a bulk RAM phase is then a few frames per read instead of two
    /// per page, which is most of the work of relaying it. A record that is not a page record, or
    /// does not parse, ends the run and is decoded on its own (so errors keep their offsets).
    pub fn set_coalesce_ram_records(&mut self, coalesce: bool) {
        self.coalesce_ram_records = coalesce;
    }

    /// While holding the device phase: why the bytes that last looked like a complete
    /// description (EOF, VMDESCRIPTION, be32 length reaching the end of the received bytes, a JSON
    /// object) did not verify. Such bytes may be device data that merely look like a description,
    /// so the decoder keeps holding; at end of input it reports this error instead of
    /// `MissingDescription` if no byte arrived after them. Connection code can name it when its
    /// description deadline expires.
    pub fn description_error(&self) -> Option<&DecodeError> {
        self.description_error.as_ref()
    }

    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// Work done so far (see [`DecodeWork`]).
    pub fn work(&self) -> DecodeWork {
        DecodeWork {
            device_phase_bytes_scanned: self.candidates.examined(),
            ..self.work
        }
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

    /// The stream may end here (after the description / final EOF). In a checking relay after an
    /// unconfirmed ending more may still follow (see `set_checking_relay`); otherwise any
    /// further byte is `TrailingData`.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done | State::Ended { .. })
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

    /// Locate a pure parser's error: stream offset and, inside a section, the section.
    fn located(&self, err: RecordError, section: Option<u32>) -> DecodeError {
        match err {
            RecordError::Invalid {
                pos,
                expected,
                found,
            } => match section {
                Some(id) => DecodeError::InSection {
                    offset: self.at(pos),
                    section: self.section_ref(id),
                    expected,
                    found,
                },
                None => DecodeError::Unexpected {
                    offset: self.at(pos),
                    expected,
                    found,
                },
            },
            RecordError::TooLong {
                pos,
                what,
                len,
                limit,
            } => DecodeError::LimitExceeded {
                offset: self.at(pos),
                what: match section {
                    Some(id) => format!("{what} in {}", self.section_ref(id)),
                    None => what,
                },
                len,
                limit,
            },
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
            State::Ended { start } => Ok(self.after_unconfirmed_ending(src, start)),
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
        let (Some(magic), Some(version)) = (src.get(0..4), src.get(4..8)) else {
            return Ok(Step::NeedMore);
        };
        let magic = u32::from_be_bytes(magic.try_into().unwrap_or_default());
        let version = u32::from_be_bytes(version.try_into().unwrap_or_default());
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

    /// The configuration record (see `configuration`), resumed where the last read left it.
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
        let before = self.configuration.elements();
        let parsed = self.configuration.resume(src, self.limits.max_record);
        self.work.configuration_elements += self.configuration.elements().saturating_sub(before);
        let config = match parsed {
            Ok(Some(config)) => config,
            Ok(None) => return self.need_record(src, "configuration record"),
            Err(err) => return Err(self.located(err, None)),
        };
        self.page_size = 1u64 << config.page_bits;
        self.ignore_shared = config.capabilities.iter().any(|c| c == "x-ignore-shared");
        self.mapped_ram = config.capabilities.iter().any(|c| c == "mapped-ram");
        self.info.machine = Some(config.machine);
        self.info.page_size = Some(self.page_size);
        self.info.capabilities = config.capabilities;
        self.state = State::Record;
        Ok(self.emit(src, config.len, RecordKind::Configuration, None))
    }

    fn record(&mut self, src: &mut BytesMut) -> Result<Step, DecodeError> {
        let Some(&tag) = src.first() else {
            return Ok(Step::NeedMore);
        };
        match tag {
            QEMU_VM_SECTION_START => self.section_start(src),
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                let Some(id) = section::parse_part_or_end(src) else {
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
                    let Ok(Some(header)) = section::parse_start(src) else {
                        return Ok(Step::NeedMore);
                    };
                    return Err(DecodeError::EarlySetupDevice {
                        offset: self.offset,
                        what: format!("full section {} \"{}\"", header.id, header.idstr),
                    });
                }
                self.state = State::DevicePhase { start: self.offset };
                self.candidates = CandidateScanner::default();
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
        let header = match section::parse_start(src) {
            Ok(Some(header)) => header,
            Ok(None) => return Ok(Step::NeedMore),
            Err(err) => return Err(self.located(err, None)),
        };
        let kind = match header.idstr.as_str() {
            IDSTR_RAM => IterKind::Ram,
            IDSTR_DIRTY_BITMAP => IterKind::DirtyBitmap,
            IDSTR_BLOCK => IterKind::Block,
            _ => {
                // An unknown iterable has no known record format, so it cannot be delimited:
                // refuse cleanly.
                return Err(DecodeError::InSection {
                    offset: self.offset,
                    section: SectionRef {
                        id: header.id,
                        idstr: Some(header.idstr),
                    },
                    expected: "an iterable section this codec knows (ram, dirty-bitmap, block)"
                        .into(),
                    found: "an unknown iterable section".into(),
                });
            }
        };
        if !self.iterables.contains_key(&header.id)
            && self.iterables.len() >= self.limits.max_sections
        {
            return Err(DecodeError::Malformed {
                offset: self.offset,
                message: format!(
                    "iterable section {} \"{}\": more than {} iterable sections in one stream (limit max_sections)",
                    header.id, header.idstr, self.limits.max_sections
                ),
            });
        }
        self.iterables.insert(
            header.id,
            Iterable {
                kind,
                idstr: header.idstr.clone(),
            },
        );
        self.state = iter_state(kind, header.id);
        Ok(self.emit(
            src,
            header.len,
            RecordKind::SectionStart {
                idstr: header.idstr,
                instance: header.instance,
                version: header.version,
            },
            Some(header.id),
        ))
    }

    /// `QEMU_VM_COMMAND` (see `command`).
    fn command(&mut self, src: &mut BytesMut) -> Result<Step, DecodeError> {
        let record = match command::parse(src, self.limits.max_packaged, self.info.postcopy_advised)
        {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(Step::NeedMore),
            Err(err) => return Err(self.located(err, None)),
        };
        match record.command {
            MigCommand::OpenReturnPath => self.info.return_path = true,
            MigCommand::PostcopyAdvise { .. } => {
                self.info.postcopy_advised = true;
                if record.advise_summary.is_some() {
                    self.advise_summary = record.advise_summary;
                }
            }
            _ => {}
        }
        Ok(self.emit(src, record.len, RecordKind::Command(record.command), None))
    }

    /// One RAM record header (see `ram`).
    fn ram_record(&mut self, src: &mut BytesMut, section: u32) -> Result<Step, DecodeError> {
        let ctx = RamContext {
            page_size: self.page_size,
            blocks: &self.ram_blocks,
            current_block_len: self.current_block_len,
            mapped_ram: self.mapped_ram,
        };
        let record = match ram::parse_record(src, &ctx) {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(Step::NeedMore),
            Err(err) => return Err(self.located(err, Some(section))),
        };
        match record {
            RamRecord::Page {
                head,
                payload,
                block_len,
                ..
            } if self.coalesce_ram_records => {
                Ok(self.ram_run(src, section, head, payload, block_len))
            }
            RamRecord::Page {
                flags,
                head,
                payload,
                block_len,
            } => {
                self.current_block_len = Some(block_len);
                if payload > 0 {
                    self.state = State::Payload {
                        section,
                        remaining: payload,
                        then: AfterPayload::Ram,
                    };
                }
                Ok(self.emit(src, head, RecordKind::RamRecord { flags }, Some(section)))
            }
            RamRecord::MemSize { flags, total } => {
                if total == 0 {
                    return Ok(self.emit(src, 8, RecordKind::RamRecord { flags }, Some(section)));
                }
                self.state = State::RamBlockList {
                    section,
                    flags,
                    remaining: total,
                    parsed: 8,
                };
                Ok(Step::Again)
            }
            RamRecord::MultifdFlush { flags } => {
                Ok(self.emit(src, 8, RecordKind::RamRecord { flags }, Some(section)))
            }
            RamRecord::Eos { flags } => {
                self.state = State::Footer { section };
                Ok(self.emit(src, 8, RecordKind::RamRecord { flags }, Some(section)))
            }
        }
    }

    /// A run of page records starting with one whose header (`head` bytes, then `payload` bytes,
    /// in a block of `block_len` bytes) has been parsed: the records that follow it in `src` join
    /// the run while they parse as page records, the last one possibly with only part of its
    /// payload (the rest then streams as `Payload`). Each header is parsed once: a record that
    /// ends the run (another kind, an error, an incomplete header) is left for `ram_record`,
    /// which parses it again as the first of the next call: at most one header per call.
    fn ram_run(
        &mut self,
        src: &mut BytesMut,
        section: u32,
        mut head: usize,
        mut payload: usize,
        mut block_len: u64,
    ) -> Step {
        let mut pos = 0usize;
        let mut records = 0u64;
        let mut partial = None;
        loop {
            records += 1;
            let record_end = pos.saturating_add(head).saturating_add(payload);
            if record_end > src.len() {
                // Its header is complete (parsed), its payload still arriving.
                partial = Some(record_end - src.len());
                pos = src.len();
                break;
            }
            pos = record_end;
            let ctx = RamContext {
                page_size: self.page_size,
                blocks: &self.ram_blocks,
                current_block_len: Some(block_len),
                mapped_ram: self.mapped_ram,
            };
            let Some(rest) = src.get(pos..) else {
                break;
            };
            match ram::parse_record(rest, &ctx) {
                Ok(Some(RamRecord::Page {
                    head: next_head,
                    payload: next_payload,
                    block_len: next_block_len,
                    ..
                })) => {
                    head = next_head;
                    payload = next_payload;
                    block_len = next_block_len;
                }
                _ => break,
            }
        }
        self.current_block_len = Some(block_len);
        if let Some(remaining) = partial {
            self.state = State::Payload {
                section,
                remaining,
                then: AfterPayload::Ram,
            };
        }
        self.emit(src, pos, RecordKind::RamRecords { records }, Some(section))
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
        ram::check_advise_summary(self.advise_summary)
            .map_err(|err| self.located(err, Some(section)))?;
        if parsed == 8 {
            // A new list replaces the old one (QEMU resends it after a block list change).
            self.ram_blocks.clear();
            self.current_block_len = None;
        }
        while remaining > 0 {
            let entry = match ram::parse_block_entry(src, parsed, remaining, self.ignore_shared) {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(err) => return Err(self.located(err, Some(section))),
            };
            remaining -= entry.used_length;
            parsed = entry.end;
            self.ram_blocks
                .insert(entry.name.to_vec(), entry.used_length);
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

    /// One dirty-bitmap chunk (see `bitmap`).
    fn dirty_bitmap_chunk(
        &mut self,
        src: &mut BytesMut,
        section: u32,
    ) -> Result<Step, DecodeError> {
        let chunk = match bitmap::parse_chunk(src, self.limits.max_record) {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok(Step::NeedMore),
            Err(err) => return Err(self.located(err, Some(section))),
        };
        if chunk.eos {
            self.state = State::Footer { section };
        }
        Ok(self.emit(src, chunk.len, RecordKind::IterableChunk, Some(section)))
    }

    /// One block-migration record (see `block`).
    fn block_record(&mut self, src: &mut BytesMut, section: u32) -> Result<Step, DecodeError> {
        let record = match block::parse_record(src) {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(Step::NeedMore),
            Err(err) => return Err(self.located(err, Some(section))),
        };
        let after = if record.eos {
            State::Footer { section }
        } else {
            State::Block { section }
        };
        self.state = if record.payload == 0 {
            after
        } else {
            State::Payload {
                section,
                remaining: record.payload,
                then: if record.eos {
                    AfterPayload::Footer
                } else {
                    AfterPayload::Block
                },
            }
        };
        Ok(self.emit(src, record.head, RecordKind::IterableChunk, Some(section)))
    }

    fn footer(&mut self, src: &mut BytesMut, section: u32) -> Result<Step, DecodeError> {
        let len = match section::parse_footer(src, section) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(Step::NeedMore),
            Err(err) => return Err(self.located(err, Some(section))),
        };
        self.state = State::Record;
        Ok(self.emit(src, len, RecordKind::SectionFooter, Some(section)))
    }

    fn held_limit(&self) -> usize {
        self.limits
            .max_device_state
            .saturating_add(self.limits.max_description)
            .saturating_add(6)
    }

    fn device_phase(&mut self, src: &mut BytesMut, start: u64) -> Result<Step, DecodeError> {
        if let Some(phase) = self.phase.as_mut() {
            // After a false ending the decoder holds the phase itself (one copy per byte).
            phase.extend_from_slice(&src.split());
        }
        let held: &[u8] = match &self.phase {
            Some(phase) => phase,
            None => src,
        };
        if held.len() > self.held_limit() {
            return Err(DecodeError::LimitExceeded {
                offset: start,
                what: "held device-state phase (full sections, eof and description)".into(),
                len: held.len() as u64,
                limit: self.held_limit(),
            });
        }
        let scanned_before = self.candidates.examined();
        let ending = self.candidates.advance(held, self.limits.max_description);
        if self.candidates.examined() != scanned_before {
            // Bytes arrived after the last candidate: its error no longer describes the end.
            self.description_error = None;
        }
        let Some(desc_len_pos) = ending else {
            return Ok(Step::NeedMore);
        };
        self.work.descriptions_tried += 1;
        // Device payloads are guest data and may end with bytes that look like a description:
        // only a walk that verifies every header and footer and lands exactly on EOF counts.
        let layout = match device_phase::walk(
            held,
            start,
            desc_len_pos,
            self.reference.as_ref(),
            self.description_cache.as_ref(),
            &self.limits,
        ) {
            Ok(layout) => {
                if layout.description_reused {
                    self.work.descriptions_reused += 1;
                }
                layout
            }
            Err(err) => {
                self.description_error = Some(err);
                return Ok(Step::NeedMore);
            }
        };
        self.description_error = None;
        // Held, the phase is bounded by both budgets together (where the description starts is
        // only known at a verified ending); from here each is its own budget. A false ending
        // inside the device state cannot cause this: the real one lies further on.
        let device_len = desc_len_pos.saturating_sub(1);
        if device_len > self.limits.max_device_state {
            return Err(DecodeError::LimitExceeded {
                offset: start,
                what: "device-state phase (full sections and eof)".into(),
                len: u64::try_from(device_len).unwrap_or(u64::MAX),
                limit: self.limits.max_device_state,
            });
        }
        let confirmed = self.reference.is_some();
        self.state = if confirmed || !self.checking_relay {
            State::Done
        } else {
            State::Ended { start }
        };
        if let Some(phase) = &self.phase {
            // The whole phase verified; the connection has the first `released` bytes already.
            let tail = Bytes::copy_from_slice(phase.get(self.released..).unwrap_or_default());
            self.offset += tail.len() as u64;
            self.released = phase.len();
            return Ok(Step::Frame(Frame::Verbatim {
                kind: RecordKind::DevicePhaseContinued,
                section_id: None,
                bytes: tail,
            }));
        }
        let len = src.len();
        let held = src.split_to(len).freeze();
        self.offset += len as u64;
        self.released = len;
        if matches!(self.state, State::Ended { .. }) {
            // Kept (a reference count, no copy) in case the ending proves false.
            self.released_phase = Some(held.clone());
        }
        Ok(Step::Frame(Frame::DeviceState(Box::new(DeviceState::new(
            held,
            start,
            desc_len_pos,
            layout,
            confirmed,
            &self.limits,
        )))))
    }

    /// Bytes after an unconfirmed ending: it was device data; hold the phase again.
    fn after_unconfirmed_ending(&mut self, src: &mut BytesMut, start: u64) -> Step {
        if src.is_empty() {
            return Step::NeedMore;
        }
        if self.phase.is_none() {
            let released = self.released_phase.take().unwrap_or_default();
            let mut phase = BytesMut::with_capacity(released.len() + src.len());
            phase.extend_from_slice(&released);
            self.phase = Some(phase);
        }
        self.state = State::DevicePhase { start };
        Step::Again
    }

    /// Why the input may not end here.
    fn eof_error(&mut self, src: &BytesMut) -> DecodeError {
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
            State::Ended { .. } => {
                return DecodeError::TrailingData {
                    offset: self.offset,
                }
            }
            State::DevicePhase { start } => {
                // The description error describes the end of the input only if nothing
                // arrived after it (it is cleared when bytes do); it keeps its own offset.
                return self
                    .description_error
                    .take()
                    .unwrap_or(DecodeError::MissingDescription { offset: start });
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

fn iter_state(kind: IterKind, section: u32) -> State {
    match kind {
        IterKind::Ram => State::Ram { section },
        IterKind::DirtyBitmap => State::DirtyBitmap { section },
        IterKind::Block => State::Block { section },
    }
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
