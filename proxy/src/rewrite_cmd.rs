//! `migproxy rewrite IN|- OUT|-`: rewrite a saved stream offline for a destination profile.
//!
//! Everything but the device-state phase is copied as decoded (the same frames the proxy
//! forwards); at the device-state phase every vCPU is rewritten with the pure rewrite, and a
//! refusal stops before any device state is written (a partial output file is removed). The report
//! goes to standard error, with a progress line when standard error is a terminal.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;

use bytes::BytesMut;
use migproxy_codec::{offline, Frame, Limits, StreamDecoder};
use migproxy_config::{rewrite, Rewrite, RewriteReport, SubsectionReport};

use crate::cli::RewriteArgs;
use crate::error::ProxyError;
use crate::policy_args::policy_from_args;
use crate::profile_cmd::{self, no_device_state, open_input};
use crate::subsection_rules;

pub fn main(args: &RewriteArgs) -> Result<(), ProxyError> {
    let policy = policy_from_args(&args.policy)?;
    let (dest, source_profile) =
        profile_cmd::load_profiles(&args.dest_profile, args.source_profile.as_deref())?;
    let input = open_input(&args.input)?;
    let total = (args.input != Path::new("-"))
        .then(|| std::fs::metadata(&args.input).ok().map(|m| m.len()))
        .flatten();
    let to_stdout = args.output == Path::new("-");
    let out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            File::create(&args.output)
                .map_err(|e| ProxyError::io(format!("create {}", args.output.display()), e))?,
        )
    };
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut progress = Progress::new(total);
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut reports: Vec<RewriteReport> = Vec::new();
    let mut subsection_reports: Vec<SubsectionReport> = Vec::new();
    let mut saw_device_state = false;

    let result = offline::decode_reader(
        input,
        &mut decoder,
        |dec, frame| -> Result<(), ProxyError> {
            progress.update(dec.offset());
            let write = |out: &mut BufWriter<Box<dyn Write>>, bytes: &[u8]| {
                out.write_all(bytes)
                    .map_err(|e| ProxyError::io("write the rewritten stream", e))
            };
            match frame {
                Frame::Verbatim { bytes, .. } | Frame::Payload { bytes, .. } => {
                    write(&mut out, &bytes)
                }
                Frame::DeviceState(mut state) => {
                    saw_device_state = true;
                    if let (Some(stream), Some(profile)) = (&dec.info().machine, &dest.machine) {
                        if stream != profile {
                            eprintln!(
                                "migproxy: warning: the stream's machine type is {stream}, the \
                                 destination profile's {profile}: the destination needs the same one"
                            );
                        }
                    }
                    let rewrites: Vec<(u32, Rewrite)> = state
                        .cpus()
                        .iter()
                        .map(|c| {
                            let r = rewrite(
                                c.instance,
                                &c.registers,
                                &dest,
                                source_profile.as_ref(),
                                &policy,
                            );
                            (c.instance, r)
                        })
                        .collect();
                    reports = rewrites.iter().map(|(_, r)| r.report.clone()).collect();
                    let refused: Vec<String> = reports
                        .iter()
                        .filter(|r| r.is_refused())
                        .map(RewriteReport::refusal_summary)
                        .collect();
                    if !refused.is_empty() {
                        // Before a byte of device state is written.
                        return Err(ProxyError::Refused(refused.join(" | ")));
                    }
                    for (instance, new) in &rewrites {
                        if !new.report.is_unchanged() {
                            state.set_cpregs(*instance, &new.registers)?;
                        }
                    }
                    subsection_reports = subsection_rules::apply(&mut state, &dest)?;
                    let mut buf = BytesMut::with_capacity(state.wire_len());
                    state.encode(&mut buf);
                    write(&mut out, &buf)
                }
            }
        },
    );
    progress.finish();
    for report in &reports {
        eprintln!("{report}");
    }
    for report in &subsection_reports {
        eprintln!("{report}");
    }
    let result = result.and_then(|()| {
        if saw_device_state {
            Ok(())
        } else {
            Err(no_device_state(&args.input.display().to_string()))
        }
    });
    let result = result.and_then(|()| {
        out.flush()
            .map_err(|e| ProxyError::io("write the rewritten stream", e))
    });
    if result.is_err() && !to_stdout {
        // Never leave a half stream that looks like a migration file.
        drop(out);
        let _ = std::fs::remove_file(&args.output);
    }
    result
}

/// A one-line progress display on standard error, only when it is a terminal.
struct Progress {
    enabled: bool,
    total: Option<u64>,
    last_shown: u64,
}

impl Progress {
    const STEP: u64 = 8 << 20;

    fn new(total: Option<u64>) -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            total,
            last_shown: 0,
        }
    }

    fn update(&mut self, offset: u64) {
        if !self.enabled || offset < self.last_shown.saturating_add(Self::STEP) {
            return;
        }
        self.last_shown = offset;
        let mib = offset / (1 << 20);
        match self.total {
            Some(total) if total > 0 => {
                let percent = offset.saturating_mul(100) / total;
                eprint!(
                    "\rrewrite: {mib} MiB of {} MiB ({percent}%)",
                    total / (1 << 20)
                );
            }
            _ => eprint!("\rrewrite: {mib} MiB"),
        }
    }

    fn finish(&self) {
        if self.enabled && self.last_shown > 0 {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_silent_off_a_terminal() {
        let mut p = Progress {
            enabled: false,
            total: Some(100),
            last_shown: 0,
        };
        p.update(1 << 30);
        assert_eq!(p.last_shown, 0);
    }
}
