//! The source's reference description: the device-state layout of a fresh VM of the source's
//! configuration, read once at startup (`--source-reference`, `source_reference` in the file).
//!
//! It does two jobs. In precopy it makes the end of the held device phase exact: the decoder
//! accepts only an ending whose description has this layout, which a description the guest forged
//! inside its own state cannot have (DESIGN.md, "How the end of the phase is recognised"). After
//! a switch to postcopy it is the layout of the package's device state, which has no description
//! of its own (DESIGN.md, "Postcopy").
//!
//! The file is either the description JSON (what `migproxy profile capture --save-reference`
//! writes) or a whole saved stream of such a VM (`migrate "exec:cat > FILE"` of a `-S` VM), whose
//! description is taken from its end. Both have a size budget, checked before anything is read.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use migproxy_codec::offline::decode_reader;
use migproxy_codec::{DecodeError, Frame, Limits, ReferenceDescription, StreamDecoder};

use crate::error::ProxyError;

/// Largest description JSON accepted as a reference: the decoder's own description budget.
pub const MAX_REFERENCE_JSON_BYTES: u64 = 16 << 20;
/// Largest saved stream accepted as a reference. A fresh VM's stream is mostly zero-page headers
/// (about 9 bytes per 4 KiB page), so this covers guests far beyond a terabyte of RAM; the
/// description JSON alone is the smaller and faster choice.
pub const MAX_REFERENCE_STREAM_BYTES: u64 = 4 << 30;

/// What a migration stream starts with (QEMU_VM_FILE_MAGIC).
const STREAM_MAGIC: &[u8; 4] = b"QEVM";

/// A reference description, as its text (for the postcopy package walk) and its parsed layout
/// (for the decoder).
#[derive(Debug, Clone)]
pub struct SourceReference {
    pub description: Bytes,
    pub layout: ReferenceDescription,
}

impl SourceReference {
    /// A description JSON text; `origin` names it in the error.
    pub fn parse(description: Bytes, origin: &str) -> Result<SourceReference, ProxyError> {
        let layout = ReferenceDescription::parse(&description).map_err(|mismatch| {
            ProxyError::InvalidConfig(format!("source reference {origin}: {mismatch}"))
        })?;
        Ok(SourceReference {
            description,
            layout,
        })
    }

    /// Read a reference file (description JSON or saved stream), within its size budget.
    pub fn load(path: &Path) -> Result<SourceReference, ProxyError> {
        let name = path.display().to_string();
        let invalid =
            |what: String| ProxyError::InvalidConfig(format!("source reference {name}: {what}"));
        let unreadable = |e: std::io::Error| invalid(format!("cannot read it: {e}"));
        let mut file = File::open(path).map_err(unreadable)?;
        let size = file.metadata().map_err(unreadable)?.len();
        let mut magic = [0u8; 4];
        let head = read_up_to(&mut file, &mut magic).map_err(unreadable)?;
        let file = std::io::Cursor::new(magic.get(..head).unwrap_or_default().to_vec()).chain(file);
        if head == STREAM_MAGIC.len() && &magic == STREAM_MAGIC {
            if size > MAX_REFERENCE_STREAM_BYTES {
                return Err(invalid(format!(
                    "a saved stream of {size} bytes is over the {MAX_REFERENCE_STREAM_BYTES}-byte budget (save only the description: migproxy profile capture --save-reference)"
                )));
            }
            let description = stream_description(file.take(MAX_REFERENCE_STREAM_BYTES))
                .map_err(|why| invalid(format!("a saved stream, but {why}")))?;
            return SourceReference::parse(description, &name);
        }
        if size > MAX_REFERENCE_JSON_BYTES {
            return Err(invalid(format!(
                "{size} bytes is over the {MAX_REFERENCE_JSON_BYTES}-byte budget of a description"
            )));
        }
        let mut text = Vec::new();
        file.take(MAX_REFERENCE_JSON_BYTES)
            .read_to_end(&mut text)
            .map_err(unreadable)?;
        if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(invalid(
                "neither a saved migration stream (it does not start with QEVM) nor a description JSON object".into(),
            ));
        }
        SourceReference::parse(Bytes::from(text), &name)
    }
}

/// The description a saved stream ends with; why there is none, if so.
fn stream_description(reader: impl Read) -> Result<Bytes, String> {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut description = None;
    decode_reader::<_, ReadError>(reader, &mut decoder, |_, frame| {
        if let Frame::DeviceState(state) = frame {
            description = Some(Bytes::copy_from_slice(state.description_json()));
        }
        Ok(())
    })
    .map_err(|err| match err {
        ReadError::Decode(err) => format!("it does not decode: {err}"),
        ReadError::Io(err) => format!("it cannot be read: {err}"),
    })?;
    description.ok_or_else(|| {
        "it has no device state with a description (a postcopy stream, or suppress-vmdesc)"
            .to_owned()
    })
}

/// Fill `buf` unless the reader ends first; how many bytes were read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// What reading a saved stream can fail with (`decode_reader` needs both conversions).
enum ReadError {
    Decode(DecodeError),
    Io(std::io::Error),
}

impl From<DecodeError> for ReadError {
    fn from(err: DecodeError) -> Self {
        ReadError::Decode(err)
    }
}

impl From<std::io::Error> for ReadError {
    fn from(err: std::io::Error) -> Self {
        ReadError::Io(err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use migproxy_codec::testing::{RamRecord, StreamBuilder};

    /// A file holding `bytes`, removed when the returned value is dropped.
    fn temp_file(name: &str, bytes: &[u8]) -> tempfile::TempPath {
        let file = tempfile::Builder::new().suffix(name).tempfile().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        file.into_temp_path()
    }

    fn small_stream() -> Vec<u8> {
        let mut b = StreamBuilder::new("virt-10.0");
        b.ram_start(1 << 20).ram_section(true, &[RamRecord::Zero]);
        b.cpu(0, &[(0x6030_0000_0013_c000, 1)], 1);
        b.finish()
    }

    #[test]
    fn a_saved_stream_and_its_description_give_the_same_reference() {
        let stream = small_stream();
        let from_stream = SourceReference::load(&temp_file("fresh.bin", &stream)).unwrap();
        let from_json =
            SourceReference::load(&temp_file("fresh.json", &from_stream.description)).unwrap();
        assert_eq!(from_stream.description, from_json.description);
        assert!(from_json.layout.devices() > 0);
    }

    #[test]
    fn a_file_that_is_neither_is_named_with_what_is_wrong() {
        let path = temp_file("garbage.bin", b"GARBAGE");
        let err = SourceReference::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("neither a saved migration stream"), "{err}");
    }

    #[test]
    fn a_description_without_devices_is_refused_by_name() {
        let path = temp_file("empty.json", b"{\"page_size\": 4096}");
        let err = SourceReference::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("no \\\"devices\\\" array") || err.contains("devices"),
            "{err}"
        );
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn a_description_over_its_budget_is_refused_before_it_is_read() {
        let path = temp_file("huge.json", b"{}");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(MAX_REFERENCE_JSON_BYTES + 1).unwrap();
        let err = SourceReference::load(&path).unwrap_err().to_string();
        assert!(err.contains("budget"), "{err}");
    }

    #[test]
    fn a_truncated_stream_is_an_error_not_a_reference() {
        let stream = small_stream();
        let path = temp_file("cut.bin", stream.get(..stream.len() - 10).unwrap());
        let err = SourceReference::load(&path).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = err.to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains("a saved stream, but it does not decode"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_file_is_a_configuration_error_naming_it() {
        let path = std::env::temp_dir().join("migproxy-no-such-reference.json");
        let err = SourceReference::load(&path).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = err.to_string();
        assert!(err.contains("source reference"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
