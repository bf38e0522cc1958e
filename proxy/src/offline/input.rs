//! The one loader of the offline commands: saved streams (a file or standard input), decoded by
//! the proxy's own `StreamDecoder` with 1 MiB blocking reads, and register profiles.
//!
//! A read failure names the input it came from; a stream without the device state the command
//! needs says so by name.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;

use bytes::BytesMut;
use migproxy_codec::{CpuRegisters, CpuSubsection, Frame, Limits, StreamDecoder, StreamInfo};
use migproxy_config::Profile;
use tokio_util::codec::Decoder;

use crate::error::ProxyError;
use crate::offline::progress::Progress;

const READ_BYTES: usize = 1 << 20;

/// A stream to decode: where it comes from, and its size when known (for progress).
pub struct Input {
    reader: Box<dyn Read>,
    /// The path as given, or a description (`migration stream from SOCKET`).
    pub name: String,
    pub total: Option<u64>,
}

impl Input {
    /// Open `path`, or standard input for `-`.
    pub fn open(path: &Path) -> Result<Input, ProxyError> {
        let name = path.display().to_string();
        if path == Path::new("-") {
            return Ok(Input::from_reader(std::io::stdin().lock(), name));
        }
        let file = File::open(path).map_err(|e| ProxyError::io(format!("open {name}"), e))?;
        let total = file.metadata().ok().map(|m| m.len());
        Ok(Input {
            total,
            ..Input::from_reader(file, name)
        })
    }

    pub fn from_reader(reader: impl Read + 'static, name: String) -> Input {
        Input {
            reader: Box::new(reader),
            name,
            total: None,
        }
    }

    /// Decode the whole stream, calling `on_frame` for every frame; an incomplete stream is an
    /// error at its end. `progress` labels the progress line (shown on a terminal only).
    pub fn decode(
        mut self,
        decoder: &mut StreamDecoder,
        progress: &'static str,
        mut on_frame: impl FnMut(&StreamDecoder, Frame) -> Result<(), ProxyError>,
    ) -> Result<(), ProxyError> {
        let mut progress = Progress::new(progress, self.total);
        let mut buffer = BytesMut::with_capacity(READ_BYTES);
        let mut chunk = vec![0u8; READ_BYTES];
        let result = loop {
            let n = match self.reader.read(&mut chunk) {
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => break Err(ProxyError::io(format!("reading {}", self.name), err)),
            };
            if n == 0 {
                break drain(decoder, &mut buffer, true, &mut on_frame);
            }
            buffer.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if let Err(err) = drain(decoder, &mut buffer, false, &mut on_frame) {
                break Err(err);
            }
            progress.update(decoder.offset());
        };
        progress.finish();
        result
    }

    /// Decode the whole stream and keep its `cpu` sections' registers.
    pub fn read_cpus(self) -> Result<StreamCpus, ProxyError> {
        let origin = self.name.clone();
        let mut decoder = StreamDecoder::new(Limits::default());
        let mut cpus: Option<Vec<CpuRegisters>> = None;
        let mut subsections = Vec::new();
        let mut description = Vec::new();
        self.decode(&mut decoder, "read", |_, frame| {
            if let Frame::DeviceState(state) = frame {
                cpus = Some(state.cpus());
                subsections = state.cpu_subsections();
                description = state.description_json().to_vec();
            }
            Ok(())
        })?;
        let cpus = cpus.ok_or_else(|| ProxyError::NoDeviceState {
            origin: origin.clone(),
        })?;
        if cpus.is_empty() {
            return Err(ProxyError::NoCpuSection { origin });
        }
        Ok(StreamCpus {
            info: decoder.info().clone(),
            cpus,
            subsections,
            description,
        })
    }
}

/// Every frame `buffer` holds (and, at the end of the input, what only EOF completes).
fn drain(
    decoder: &mut StreamDecoder,
    buffer: &mut BytesMut,
    at_eof: bool,
    on_frame: &mut impl FnMut(&StreamDecoder, Frame) -> Result<(), ProxyError>,
) -> Result<(), ProxyError> {
    loop {
        let frame = if at_eof {
            decoder.decode_eof(buffer)?
        } else {
            decoder.decode(buffer)?
        };
        match frame {
            Some(frame) => on_frame(decoder, frame)?,
            None => return Ok(()),
        }
    }
}

/// What a saved stream says about its vCPUs.
pub struct StreamCpus {
    pub info: StreamInfo,
    pub cpus: Vec<CpuRegisters>,
    /// Top-level subsections of the `cpu` sections.
    pub subsections: Vec<CpuSubsection>,
    /// The description JSON the device state ended with (a reference description when the
    /// stream is a fresh VM's: `profile capture --save-reference`).
    pub description: Vec<u8>,
}

/// The destination profile and, when given, the source's: what `plan` and `rewrite` compare.
pub fn load_profiles(
    dest: &Path,
    source: Option<&Path>,
) -> Result<(Profile, Option<Profile>), ProxyError> {
    Ok((Profile::load(dest)?, source.map(Profile::load).transpose()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_failure_names_the_input() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let input = Input::from_reader(Failing, "saved.bin".into());
        let err = match input.read_cpus() {
            Err(err) => err,
            Ok(_) => panic!("a failing reader decoded"),
        };
        assert_eq!(err.to_string(), "reading saved.bin: disk on fire");
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn a_stream_without_devices_has_no_registers_to_read() {
        let mut builder = migproxy_codec::testing::StreamBuilder::new("virt-7.2");
        builder.ram_start(1 << 20);
        builder.ram_section(true, &[]);
        let bytes = builder.finish_without_description();
        let input = Input::from_reader(std::io::Cursor::new(bytes), "ram-only.bin".into());
        match input.read_cpus() {
            Err(ProxyError::NoDeviceState { origin }) => assert_eq!(origin, "ram-only.bin"),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("registers read from a stream without devices"),
        }
    }
}
