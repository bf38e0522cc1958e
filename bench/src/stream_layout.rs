//! Where the device-state phase of a captured stream begins, so that the switchover
//! benchmark can send the RAM part first and time the tail alone.
//!
//! This is a benchmark helper, not a parser the proxy relies on: it reads the
//! description JSON the way QEMU's `scripts/analyze-migration.py` does (the `0x06 be32 len
//! {json}` record at the very end of the file), takes the first described device (name,
//! instance) and finds the last `QEMU_VM_SECTION_FULL` header for it. Device sections come
//! after every RAM page, so the last match is the start of the phase.

use std::path::Path;

use crate::BenchError;

/// `QEMU_VM_SECTION_FULL` (migration/savevm.c).
const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// `QEMU_VM_VMDESCRIPTION` (migration/savevm.c).
const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// analyze-migration.py looks for the description in the last 10 MB too.
const DESCRIPTION_SEARCH_WINDOW: usize = 10 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    pub total_len: u64,
    /// Offset of the first FULL section of the device-state phase.
    pub device_state_offset: u64,
    /// Number of `cpu` sections described (= vCPUs).
    pub vcpus: usize,
}

impl StreamLayout {
    pub fn tail_len(&self) -> u64 {
        self.total_len - self.device_state_offset
    }
}

/// Reads only the end of the file (the device state is small; the RAM before it is not).
pub fn layout_of_file(path: &Path) -> Result<StreamLayout, BenchError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file =
        std::fs::File::open(path).map_err(BenchError::io(format!("open {}", path.display())))?;
    let total_len = file
        .metadata()
        .map_err(BenchError::io(format!("stat {}", path.display())))?
        .len();
    // The device state of a big guest is a few MB; 64 MiB of tail is plenty.
    let window = total_len.min(64 * 1024 * 1024);
    let start = total_len - window;
    file.seek(SeekFrom::Start(start))
        .map_err(BenchError::io(format!("seek {}", path.display())))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)
        .map_err(BenchError::io(format!("read {}", path.display())))?;
    let relative = layout_of_tail(&tail).map_err(|reason| BenchError::Stream {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(StreamLayout {
        total_len,
        device_state_offset: start + relative.0,
        vcpus: relative.1,
    })
}

/// (device-state offset within `data`, vCPU count).
fn layout_of_tail(data: &[u8]) -> Result<(u64, usize), String> {
    let json_start = find_description(data).ok_or("no QEMU_VM_VMDESCRIPTION record at the end")?;
    let json = data.get(json_start..).ok_or("description out of range")?;
    let description: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("description json: {e}"))?;
    let devices = description
        .get("devices")
        .and_then(|d| d.as_array())
        .ok_or("description has no devices")?;
    let first = devices.first().ok_or("description lists no device")?;
    let name = first
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or("first device has no name")?;
    let instance = first
        .get("instance_id")
        .and_then(|n| n.as_u64())
        .and_then(|n| u32::try_from(n).ok())
        .ok_or("first device has no instance_id")?;
    let vcpus = devices
        .iter()
        .filter(|d| d.get("name").and_then(|n| n.as_str()) == Some("cpu"))
        .count();
    let name_len = u8::try_from(name.len()).map_err(|_| "device name longer than 255")?;
    // FULL header: u8 type, be32 section id, u8 len, idstr, be32 instance, be32 version.
    let mut needle = vec![name_len];
    needle.extend_from_slice(name.as_bytes());
    needle.extend_from_slice(&instance.to_be_bytes());
    let search_end = json_start.saturating_sub(5);
    let haystack = data.get(..search_end).ok_or("description out of range")?;
    let found = haystack
        .windows(needle.len())
        .rposition(|w| w == needle.as_slice())
        .ok_or_else(|| format!("no FULL section header for {name} instance {instance}"))?;
    let header = found
        .checked_sub(5)
        .ok_or("FULL header truncated at the start of the window")?;
    if data.get(header) != Some(&QEMU_VM_SECTION_FULL) {
        return Err(format!("{name} header at {header} is not a FULL section"));
    }
    Ok((header as u64, vcpus))
}

/// Offset of the JSON of the description: a `{` preceded by `0x06 be32 len` with len
/// reaching exactly the end of the data.
fn find_description(data: &[u8]) -> Option<usize> {
    let from = data.len().saturating_sub(DESCRIPTION_SEARCH_WINDOW);
    (from + 5..data.len()).rev().find(|&i| {
        data.get(i) == Some(&b'{')
            && data.get(i - 5) == Some(&QEMU_VM_VMDESCRIPTION)
            && data
                .get(i - 4..i)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .and_then(|len| usize::try_from(len).ok())
                == Some(data.len() - i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic() -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        // RAM data that happens to contain the counted name and instance (not a header)
        s.extend_from_slice(b"\x03\0\0\0\x02xxxx\x05timer\0\0\0\0");
        let phase = s.len();
        s.extend_from_slice(b"\x04\0\0\0\x05\x05timer\0\0\0\0\0\0\0\x02payload~\0\0\0\x05");
        s.extend_from_slice(b"\x04\0\0\0\x06\x03cpu\0\0\0\0\0\0\0\x16regs~\0\0\0\x06");
        s.push(0x1f);
        let json = br#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0},{"name":"cpu","instance_id":0}]}"#;
        s.push(QEMU_VM_VMDESCRIPTION);
        s.extend_from_slice(&(json.len() as u32).to_be_bytes());
        s.extend_from_slice(json);
        assert_eq!(layout_of_tail(&s), Ok((phase as u64, 1)));
        s
    }

    #[test]
    fn finds_phase_start_and_vcpus() {
        let s = synthetic();
        let mut truncated = s.clone();
        truncated.pop();
        assert!(layout_of_tail(&truncated).is_err());
    }

    #[test]
    fn no_description_is_an_error() {
        assert!(layout_of_tail(b"QEVM\0\0\0\x03\x1f").is_err());
    }
}
