//! `migproxy rewrite IN|- OUT|-`: rewrite a saved stream offline for a destination profile.
//!
//! Everything but the device-state phase is copied as decoded (the same frames the proxy
//! forwards); at the device-state phase every vCPU is rewritten with the pure rewrite and the
//! `cpu` subsections the destination cannot load are removed or refused (`subsection_rules`), and a
//! refusal stops before any device state is written (a partial output file is removed). The report
//! goes to standard error, with a progress line when standard error is a terminal.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use bytes::BytesMut;
use migproxy_codec::{Frame, Limits, StreamDecoder};
use migproxy_config::{rewrite, RefusalDigest, Rewrite, RewriteReport, SubsectionReport};

use crate::cli::policy::policy_from_args;
use crate::cli::RewriteArgs;
use crate::error::{ProxyError, Refusal};
use crate::offline::input::{load_profiles, Input};
use crate::offline::plan::vcpu_lines;
use crate::subsection_rules;

pub fn main(args: &RewriteArgs) -> Result<(), ProxyError> {
    let policy = policy_from_args(&args.policy)?;
    let (dest, source_profile) = load_profiles(&args.dest_profile, args.source_profile.as_deref())?;
    let input = Input::open(&args.input)?;
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
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut reports: Vec<RewriteReport> = Vec::new();
    let mut subsection_reports: Vec<SubsectionReport> = Vec::new();
    let mut saw_device_state = false;

    let result = input.decode(
        &mut decoder,
        "rewrite",
        |dec, frame| -> Result<(), ProxyError> {
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
                    let mut refused = RefusalDigest::default();
                    reports.iter().for_each(|r| refused.add(r));
                    if refused.is_refused() {
                        // Before a byte of device state is written.
                        return Err(ProxyError::Refused(Refusal::Registers(
                            refused.summaries(),
                        )));
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
    for line in vcpu_lines(&reports, &subsection_reports, args.all) {
        eprintln!("{line}");
    }
    let result = result.and_then(|()| {
        if saw_device_state {
            Ok(())
        } else {
            Err(ProxyError::NoDeviceState {
                origin: args.input.display().to_string(),
            })
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
