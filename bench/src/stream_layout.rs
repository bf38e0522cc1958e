//! Where the device-state phase of a captured stream begins, so that the switchover
//! benchmark can send the RAM part first and time the tail alone.
//!
//! Found the way the proxy finds it: the stream is decoded with migproxy's own codec, and the
//! phase starts at the stream offset of the `DeviceState` frame (every record before it is
//! delimited structurally). No byte pattern is searched for: guest RAM could contain any.

use std::io::BufReader;
use std::path::Path;

use migproxy_codec::{offline, DecodeError, Frame, Limits, StreamDecoder};

use crate::BenchError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    pub total_len: u64,
    /// Offset of the first FULL section of the device-state phase.
    pub device_state_offset: u64,
    /// Number of `cpu` sections (= vCPUs).
    pub vcpus: usize,
}

impl StreamLayout {
    pub fn tail_len(&self) -> u64 {
        self.total_len - self.device_state_offset
    }
}

/// What can stop the walk: the codec's error or the file's.
#[derive(Debug, thiserror::Error)]
enum WalkError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decode the whole file (decode-only runs at several GB/s) and note where the phase starts.
pub fn layout_of_file(path: &Path) -> Result<StreamLayout, BenchError> {
    let file =
        std::fs::File::open(path).map_err(BenchError::io(format!("open {}", path.display())))?;
    let total_len = file
        .metadata()
        .map_err(BenchError::io(format!("stat {}", path.display())))?
        .len();
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut offset: u64 = 0;
    let mut phase = None;
    offline::decode_reader(
        BufReader::with_capacity(1 << 20, file),
        &mut decoder,
        |_, frame| -> Result<(), WalkError> {
            if let Frame::DeviceState(state) = &frame {
                phase = Some((offset, state.cpus().len()));
            }
            offset += frame.wire_len() as u64;
            Ok(())
        },
    )
    .map_err(|e| BenchError::Stream {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (device_state_offset, vcpus) = phase.ok_or_else(|| BenchError::Stream {
        path: path.to_path_buf(),
        reason: "no device-state phase (a postcopy stream?)".into(),
    })?;
    Ok(StreamLayout {
        total_len,
        device_state_offset,
        vcpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../codec/tests/vectors")
            .join(name)
    }

    #[test]
    fn finds_phase_start_and_vcpus_in_a_real_stream() {
        let path = vector("q72-a64fx.bin");
        let layout = match layout_of_file(&path) {
            Ok(layout) => layout,
            Err(e) => panic!("{e}"),
        };
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert_eq!(layout.total_len, bytes.len() as u64);
        assert_eq!(layout.vcpus, 2);
        let at = usize::try_from(layout.device_state_offset).unwrap_or(usize::MAX);
        // The phase opens with a FULL section header and ends with EOF + the description.
        assert_eq!(bytes.get(at), Some(&0x04));
        assert!(layout.tail_len() > 10_000 && layout.tail_len() < 100_000);
    }

    #[test]
    fn a_stream_without_device_state_is_an_error() {
        assert!(layout_of_file(&vector("q72-postcopy-main.bin")).is_err());
    }
}
