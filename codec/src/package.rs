//! The device state inside a postcopy package (`MIG_CMD_PACKAGED`), walked with a reference
//! description (DESIGN.md, "Postcopy").
//!
//! ```text
//! record:  08 0007 0004 | be32 n | blob (n bytes)
//! blob:    08 0004 0000 (LISTEN) | FULL s0 .. 7E s0 | ... | [PING 3] | [PING 0x42] | 08 0005 0000 (RUN)
//!                                  ^ walked with the reference  ^ must land exactly here
//! ```
//!
//! Both PINGs are optional, as QEMU's `postcopy_start` writes them: `PING 3` only with the
//! `postcopy-ram` capability (a postcopy of dirty bitmaps alone sends none), `PING 0x42` only
//! from a source since QEMU 10.2 with a return path.
//!
//! The package carries no description, so the layout comes from a reference description of the
//! source's configuration (captured from a fresh VM of the same QEMU, machine and devices). The
//! sections are walked by the same walk as the precopy device phase: the held span is the
//! package's sections followed by `00` (EOF), `06`, the reference's be32 length and text, so
//! every section header, subsection header and footer is checked and the walk must end exactly
//! where the trailing PING/RUN commands begin. Anything that does not verify is an error, never a
//! guess. The blob's end is found from its known length, never by scanning guest bytes.

use bytes::{BufMut, Bytes, BytesMut};

use crate::device_phase::{self, DeviceState};
use crate::error::DecodeError;
use crate::limits::Limits;
use crate::wire::*;

/// `08 0004 0000`: the LISTEN command every package starts with.
const LISTEN: [u8; 5] = [QEMU_VM_COMMAND, 0x00, 0x04, 0x00, 0x00];
/// `08 0005 0000`: the RUN command every package ends with.
const RUN: [u8; 5] = [QEMU_VM_COMMAND, 0x00, 0x05, 0x00, 0x00];
/// `08 0002 0004`: a PING command's header (a be32 value follows).
const PING_HEADER: [u8; 5] = [QEMU_VM_COMMAND, 0x00, 0x02, 0x00, 0x04];
/// A PING record: header and be32 value.
const PING_LEN: usize = 9;
/// `QEMU_VM_PING_PACKAGED_LOADED`: the source waits for its PONG before giving up the guest.
pub const PING_PACKAGED_LOADED: u32 = 0x42;
/// The PACKAGED record's header: command byte, be16 number, be16 length 4, be32 blob length.
const RECORD_HEADER_LEN: usize = 9;

/// A package whose device sections were walked with a reference description.
pub struct PackageDeviceState {
    /// The sections, held as the precopy walk holds a device phase.
    state: DeviceState,
    /// PING(s) and RUN, as received.
    tail: Bytes,
    /// Which commands the tail holds.
    ending: PackageEnding,
}

/// The commands after a package's device sections, as `postcopy_start` writes them: `PING 3`
/// with the `postcopy-ram` capability, `PING 0x42` from a source since QEMU 10.2 with a return
/// path, then RUN. A postcopy of dirty bitmaps alone (no `postcopy-ram`) has no `PING 3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageEnding {
    /// The PING before RUN (or before `PING 0x42`) other than `PING 0x42`: `PING 3` when the
    /// source has `postcopy-ram`.
    pub ping: Option<u32>,
    /// `PING 0x42` before RUN: the source resumes its guest if the destination never confirms.
    pub loaded_ping: bool,
}

impl PackageEnding {
    /// The ending of the whole PACKAGED `record` (its 9-byte header included), read from its
    /// end; `None` if it does not end with RUN. Constant work: at most three commands are read.
    pub fn of_record(record: &[u8]) -> Option<PackageEnding> {
        tail_of(record.get(RECORD_HEADER_LEN..)?)
    }

    /// The bytes these commands take.
    fn len(&self) -> usize {
        RUN.len() + PING_LEN * (usize::from(self.ping.is_some()) + usize::from(self.loaded_ping))
    }
}

impl std::fmt::Display for PackageEnding {
    /// `PING 3, PING 0x42, RUN`, `PING 0x42, RUN`, `RUN` ...
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(value) = self.ping {
            write!(f, "PING {value:#x}, ")?;
        }
        if self.loaded_ping {
            write!(f, "PING {PING_PACKAGED_LOADED:#x}, ")?;
        }
        f.write_str("RUN")
    }
}

impl std::fmt::Debug for PackageDeviceState {
    // Device payloads are guest state: show the layout only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageDeviceState")
            .field("state", &self.state)
            .field("tail", &self.tail.len())
            .field("ending", &self.ending)
            .finish()
    }
}

impl PackageDeviceState {
    /// Walk the whole PACKAGED `record` (header included) that starts at stream `offset`, with
    /// `reference` (a description JSON text) as the layout of its sections.
    pub fn walk(
        record: &[u8],
        offset: u64,
        reference: &[u8],
        limits: &Limits,
    ) -> Result<PackageDeviceState, DecodeError> {
        let at = |pos: usize| offset.saturating_add(u64::try_from(pos).unwrap_or(u64::MAX));
        let header = record.get(..RECORD_HEADER_LEN);
        let declared = header
            .filter(|h| h.starts_with(&[QEMU_VM_COMMAND, 0x00, 0x07, 0x00, 0x04]))
            .and_then(|h| h.get(5..9))
            .and_then(|len| <[u8; 4]>::try_from(len).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| DecodeError::Unexpected {
                offset: at(0),
                expected: "a MIG_CMD_PACKAGED record".into(),
                found: format!("{} bytes of something else", record.len()),
            })?;
        let blob = record.get(RECORD_HEADER_LEN..).unwrap_or_default();
        if u64::from(declared) != u64::try_from(blob.len()).unwrap_or(u64::MAX) {
            return Err(DecodeError::Malformed {
                offset: at(5),
                message: format!("package length {declared}, but {} bytes follow", blob.len()),
            });
        }
        if !blob.starts_with(&LISTEN) {
            return Err(DecodeError::Unexpected {
                offset: at(RECORD_HEADER_LEN),
                expected: "POSTCOPY_LISTEN at the start of the package".into(),
                found: format!("{:02x?}", blob.get(..LISTEN.len()).unwrap_or(blob)),
            });
        }
        let ending = tail_of(blob).ok_or_else(|| DecodeError::Unexpected {
            offset: at(RECORD_HEADER_LEN + blob.len().saturating_sub(RUN.len())),
            expected: "POSTCOPY_RUN at the end of the package".into(),
            found: "other bytes".into(),
        })?;
        let sections_end = blob.len() - ending.len();
        let sections = blob.get(LISTEN.len()..sections_end).unwrap_or_default();
        let reference_len = u32::try_from(reference.len()).map_err(|_| DecodeError::Malformed {
            offset: at(0),
            message: "reference description over 4 GiB".into(),
        })?;
        // What the precopy walk expects: sections, EOF, the description's header, its text.
        let mut held = BytesMut::with_capacity(sections.len() + 6 + reference.len());
        held.extend_from_slice(sections);
        held.put_u8(QEMU_VM_EOF);
        held.put_u8(QEMU_VM_VMDESCRIPTION);
        let desc_len_pos = held.len();
        held.put_u32(reference_len);
        held.extend_from_slice(reference);
        let held = held.freeze();
        let base_offset = at(RECORD_HEADER_LEN + LISTEN.len());
        let layout = device_phase::walk(&held, base_offset, desc_len_pos, None, None, limits)?;
        Ok(PackageDeviceState {
            state: DeviceState::new(held, base_offset, desc_len_pos, layout, true, limits),
            tail: Bytes::copy_from_slice(blob.get(sections_end..).unwrap_or_default()),
            ending,
        })
    }

    /// The sections, to read and rewrite like a precopy device phase (the reference's text
    /// stays inside: only the sections are written back).
    pub fn device_state(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// Whether the package ends with `PING 0x42` before RUN: a source since QEMU 10.2 with a
    /// return path, which resumes its guest if the destination never confirms the package.
    pub fn waits_for_destination(&self) -> bool {
        self.ending.loaded_ping
    }

    /// The commands after the sections (which PINGs the source wrote before RUN).
    pub fn ending(&self) -> PackageEnding {
        self.ending
    }

    /// The PACKAGED record with the (rewritten) sections and the blob length updated.
    pub fn to_record(&self) -> Result<Bytes, DecodeError> {
        let sections = self.state.sections_bytes();
        let blob_len = LISTEN.len() + sections.len() + self.tail.len();
        let declared = u32::try_from(blob_len).map_err(|_| DecodeError::Malformed {
            offset: 0,
            message: format!(
                "a rewritten package of {blob_len} bytes does not fit its be32 length"
            ),
        })?;
        let mut out = BytesMut::with_capacity(RECORD_HEADER_LEN + blob_len);
        out.extend_from_slice(&[QEMU_VM_COMMAND, 0x00, 0x07, 0x00, 0x04]);
        out.put_u32(declared);
        out.extend_from_slice(&LISTEN);
        out.extend_from_slice(&sections);
        out.extend_from_slice(&self.tail);
        Ok(out.freeze())
    }
}

/// The blob's trailing commands; `None` if the blob does not end with RUN. `postcopy_start`
/// (migration/migration.c) writes, after the sections: `PING 3` if `postcopy-ram` is on,
/// `PING 0x42` if the source (QEMU >= 10.2) has a return path, then RUN; so the tail is RUN,
/// PING x RUN, PING 0x42 RUN or PING x PING 0x42 RUN.
///
/// Read from the end, this cannot take section bytes for a PING: the sections end with a
/// section footer (`7E` be32 id), and its `7E` falls where a PING has the `04` of its length.
/// Whatever else is wrong there the walk refuses, since it must end exactly where the tail begins.
fn tail_of(blob: &[u8]) -> Option<PackageEnding> {
    let before_run = blob.len().checked_sub(RUN.len())?;
    if blob.get(before_run..)? != RUN {
        return None;
    }
    let ping_value = |end: usize| -> Option<u32> {
        let start = end.checked_sub(PING_LEN)?;
        let ping = blob.get(start..end)?;
        if !ping.starts_with(&PING_HEADER) {
            return None;
        }
        Some(u32::from_be_bytes(
            <[u8; 4]>::try_from(ping.get(5..)?).ok()?,
        ))
    };
    let Some(last) = ping_value(before_run) else {
        // Neither PING: a postcopy without postcopy-ram from a source without the loaded PING.
        return Some(PackageEnding {
            ping: None,
            loaded_ping: false,
        });
    };
    if last != PING_PACKAGED_LOADED {
        // `PING 3` alone: postcopy-ram from a source without the loaded PING.
        return Some(PackageEnding {
            ping: Some(last),
            loaded_ping: false,
        });
    }
    // `PING 0x42`: preceded by `PING 3` with postcopy-ram, alone without it.
    Some(PackageEnding {
        ping: before_run.checked_sub(PING_LEN).and_then(ping_value),
        loaded_ping: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::StreamBuilder;

    const SCTLR_EL1: u64 = 0x6030_0000_0013_c080;
    const CONTEXTIDR_EL1: u64 = 0x6030_0000_0013_c681;

    /// Two vCPUs with these registers.
    fn builder(registers: &[(u64, u64)]) -> StreamBuilder {
        let mut builder = StreamBuilder::new("virt-7.2");
        builder.cpu(0, registers, 0x11);
        builder.cpu(1, registers, 0x22);
        builder
    }

    /// Which PINGs `postcopy_start` writes into the package.
    #[derive(Clone, Copy)]
    struct Pings {
        /// `PING 3`: the `postcopy-ram` capability is on.
        postcopy_ram: bool,
        /// `PING 0x42`: a source since QEMU 10.2 with a return path.
        loaded: bool,
    }

    /// postcopy-ram, loaded PING: a 10.2+ source with a return path.
    const RAM_AND_LOADED: Pings = Pings {
        postcopy_ram: true,
        loaded: true,
    };

    /// A package as QEMU builds it (`postcopy_start`: LISTEN, the sections, `PING 3` with
    /// postcopy-ram, `PING 0x42` with a return path since 10.2, RUN) for two vCPUs with these
    /// registers, and the description a fresh VM of that configuration sends (the reference).
    fn packaged(registers: &[(u64, u64)], pings: Pings) -> (Vec<u8>, String) {
        let header_len = StreamBuilder::new("virt-7.2").into_bytes().len();
        let reference = builder(registers).description();
        let stream = builder(registers).into_bytes();
        let mut blob = LISTEN.to_vec();
        blob.extend_from_slice(&stream[header_len..]);
        if pings.postcopy_ram {
            blob.extend_from_slice(&[0x08, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 3]);
        }
        if pings.loaded {
            blob.extend_from_slice(&[0x08, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 0x42]);
        }
        blob.extend_from_slice(&RUN);
        let mut record = vec![0x08, 0x00, 0x07, 0x00, 0x04];
        record.extend_from_slice(&u32::try_from(blob.len()).unwrap_or(u32::MAX).to_be_bytes());
        record.extend_from_slice(&blob);
        (record, reference)
    }

    #[test]
    fn a_package_is_walked_rewritten_and_its_length_updated() -> Result<(), DecodeError> {
        let source = [(SCTLR_EL1, 0x30d0_0980), (CONTEXTIDR_EL1, 0)];
        let dest = [(SCTLR_EL1, 0x30d0_0980)];
        let (record, reference) = packaged(&source, RAM_AND_LOADED);
        let mut package =
            PackageDeviceState::walk(&record, 1000, reference.as_bytes(), &Limits::default())?;
        assert!(package.waits_for_destination());
        // Unchanged: byte for byte.
        assert_eq!(package.to_record()?, record);
        let cpus = package.device_state().cpus();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[0].registers, source);
        for cpu in cpus {
            package.device_state().set_cpregs(cpu.instance, &dest)?;
        }
        let (expected, _) = packaged(&dest, RAM_AND_LOADED);
        assert_eq!(package.to_record()?, expected);
        Ok(())
    }

    #[test]
    fn an_older_package_has_no_loaded_ping() -> Result<(), DecodeError> {
        let pings = Pings {
            postcopy_ram: true,
            loaded: false,
        };
        let (record, reference) = packaged(&[(SCTLR_EL1, 1)], pings);
        let package =
            PackageDeviceState::walk(&record, 0, reference.as_bytes(), &Limits::default())?;
        assert!(!package.waits_for_destination());
        assert_eq!(package.to_record()?, record);
        Ok(())
    }

    /// Without `postcopy-ram` (a postcopy of dirty bitmaps alone) QEMU sends no `PING 3`: the
    /// package ends `PING 0x42` RUN from a 10.2+ source with a return path, RUN alone otherwise.
    /// (A fuzz finding: the walk took the lone `PING 0x42` for the second of two PINGs and
    /// refused such packages.)
    #[test]
    fn a_package_without_postcopy_ram_has_no_ping_3() -> Result<(), DecodeError> {
        let source = [(SCTLR_EL1, 0x30d0_0980), (CONTEXTIDR_EL1, 0)];
        let dest = [(SCTLR_EL1, 0x30d0_0980)];
        for loaded in [true, false] {
            let pings = Pings {
                postcopy_ram: false,
                loaded,
            };
            let (record, reference) = packaged(&source, pings);
            let mut package =
                PackageDeviceState::walk(&record, 0, reference.as_bytes(), &Limits::default())?;
            assert_eq!(package.waits_for_destination(), loaded);
            let ending = PackageEnding {
                ping: None,
                loaded_ping: loaded,
            };
            assert_eq!(package.ending(), ending);
            assert_eq!(PackageEnding::of_record(&record), Some(ending));
            assert_eq!(package.to_record()?, record);
            let cpus = package.device_state().cpus();
            assert_eq!(cpus.len(), 2);
            assert_eq!(cpus[1].registers, source);
            for cpu in cpus {
                package.device_state().set_cpregs(cpu.instance, &dest)?;
            }
            let (expected, _) = packaged(&dest, pings);
            assert_eq!(package.to_record()?, expected);
        }
        Ok(())
    }

    /// The ending names the PINGs as QEMU wrote them, for every combination `postcopy_start`
    /// writes; a blob that does not end with RUN has none.
    #[test]
    fn the_ending_names_the_pings_before_run() -> Result<(), DecodeError> {
        let registers = [(SCTLR_EL1, 1)];
        for (postcopy_ram, loaded, shown) in [
            (true, true, "PING 0x3, PING 0x42, RUN"),
            (true, false, "PING 0x3, RUN"),
            (false, true, "PING 0x42, RUN"),
            (false, false, "RUN"),
        ] {
            let (record, reference) = packaged(
                &registers,
                Pings {
                    postcopy_ram,
                    loaded,
                },
            );
            let package =
                PackageDeviceState::walk(&record, 0, reference.as_bytes(), &Limits::default())?;
            assert_eq!(package.ending().to_string(), shown);
            assert_eq!(PackageEnding::of_record(&record), Some(package.ending()));
        }
        let (mut record, _) = packaged(&registers, RAM_AND_LOADED);
        record.pop();
        assert_eq!(PackageEnding::of_record(&record), None);
        assert_eq!(PackageEnding::of_record(&record[..4]), None);
        Ok(())
    }

    /// PINGs QEMU never writes there (two `PING 3`, `PING 0x42` before `PING 3`) are left to the
    /// walk, which refuses them: it must end where the tail begins.
    #[test]
    fn pings_out_of_order_are_refused() {
        let limits = Limits::default();
        for extra in [
            [0x08, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 3],
            [0x08, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 0x42],
        ] {
            let pings = Pings {
                postcopy_ram: true,
                loaded: false,
            };
            let (record, reference) = packaged(&[(SCTLR_EL1, 1)], pings);
            // The extra PING goes right after the sections, before `PING 3` and RUN.
            let at = record.len() - RUN.len() - PING_LEN;
            let mut blob = record[RECORD_HEADER_LEN..at].to_vec();
            blob.extend_from_slice(&extra);
            blob.extend_from_slice(&record[at..]);
            let mut bad = vec![0x08, 0x00, 0x07, 0x00, 0x04];
            bad.extend_from_slice(&u32::try_from(blob.len()).unwrap_or(u32::MAX).to_be_bytes());
            bad.extend_from_slice(&blob);
            let err = PackageDeviceState::walk(&bad, 0, reference.as_bytes(), &limits);
            assert!(err.is_err(), "{extra:02x?}: {err:?}");
        }
    }

    #[test]
    fn a_reference_of_another_layout_is_refused() {
        let (record, _) = packaged(&[(SCTLR_EL1, 1)], RAM_AND_LOADED);
        // One vCPU fewer: the walk does not end where the PING/RUN commands begin.
        let mut one = StreamBuilder::new("virt-7.2");
        one.cpu(0, &[(SCTLR_EL1, 1)], 0x11);
        let other = one.description();
        assert!(
            PackageDeviceState::walk(&record, 0, other.as_bytes(), &Limits::default()).is_err()
        );
    }

    #[test]
    fn a_damaged_frame_is_refused_by_position() {
        let (record, reference) = packaged(&[(SCTLR_EL1, 1)], RAM_AND_LOADED);
        let limits = Limits::default();
        // Length off by one.
        let mut longer = record.clone();
        longer.push(0);
        assert!(PackageDeviceState::walk(&longer, 0, reference.as_bytes(), &limits).is_err());
        // No RUN at the end.
        let mut no_run = record.clone();
        let last = no_run.len() - 1;
        no_run[last] = 1;
        assert!(PackageDeviceState::walk(&no_run, 0, reference.as_bytes(), &limits).is_err());
        // No LISTEN at the start.
        let mut no_listen = record.clone();
        no_listen[11] = 0x05;
        let err = PackageDeviceState::walk(&no_listen, 0, reference.as_bytes(), &limits);
        assert!(
            matches!(err, Err(DecodeError::Unexpected { offset: 9, .. })),
            "{err:?}"
        );
    }
}
