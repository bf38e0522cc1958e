//! The `cpu` subsections of a held device-state phase against the destination: decide per vCPU
//! (`migproxy_config::check_subsections`, pure), then remove what may go. Shared by the daemon,
//! `rewrite` and `plan`, so all three do the same.

use migproxy_codec::{CpuSubsection, DeviceState};
use std::collections::BTreeMap;

use migproxy_config::{
    check_subsections, subsections, Profile, SourceSubsection, SubsectionReport,
};

use crate::error::{ProxyError, Refusal};

/// One report per vCPU that has a subsection to remove or refuse, in instance order.
pub fn decide(subsections: &[CpuSubsection], dest: &Profile) -> Vec<SubsectionReport> {
    // One pass to group them by vCPU: a scan of every subsection per vCPU would be quadratic in
    // a stream the source shapes.
    let mut by_vcpu: BTreeMap<u32, Vec<SourceSubsection<'_>>> = BTreeMap::new();
    for s in subsections {
        by_vcpu
            .entry(s.instance)
            .or_default()
            .push(SourceSubsection {
                name: &s.name,
                nested: &s.nested,
                payload: &s.payload,
            });
    }
    by_vcpu
        .into_iter()
        .map(|(instance, of_vcpu)| check_subsections(instance, &of_vcpu, dest))
        .filter(|report| !report.removed.is_empty() || report.is_refused())
        .collect()
}

/// Refuse (naming the subsections, vCPUs refused alike on one line) or remove what the reports
/// allow, before a byte of this device state reaches the destination.
pub fn apply(state: &mut DeviceState, dest: &Profile) -> Result<Vec<SubsectionReport>, ProxyError> {
    let reports = decide(&state.cpu_subsections(), dest);
    if reports.iter().any(SubsectionReport::is_refused) {
        return Err(ProxyError::Refused(Refusal::Subsections(
            subsections::refusal_summaries(&reports),
        )));
    }
    for report in &reports {
        for removed in &report.removed {
            state
                .remove_cpu_subsection(report.vcpu, &removed.name)
                .map_err(ProxyError::Decode)?;
        }
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    //! On a real QEMU 11.1 capture towards a 10.0 a64fx profile (captured from a real 10.0
    //! stream): the idle `cpu/wfxt-timer` is removed; the same capture with one vCPU's timer
    //! armed (its expiry rewritten, as no a64fx guest can arm it) is refused naming it.
    use std::path::{Path, PathBuf};

    use migproxy_codec::{Frame, Limits, StreamDecoder};

    use super::*;
    use crate::offline::capture::profile_from_stream;
    use crate::offline::input::Input;

    fn vector_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../codec/tests/vectors/{name}"))
    }

    fn profile_10_0() -> Profile {
        let stream = match Input::open(&vector_path("q10m72-a64fx.bin")).and_then(Input::read_cpus)
        {
            Ok(stream) => stream,
            Err(e) => panic!("reading the 10.0 vector: {e}"),
        };
        let mut profile = match profile_from_stream(&stream, None, "stream") {
            Ok(profile) => profile,
            Err(e) => panic!("profile from the 10.0 vector: {e}"),
        };
        profile.qemu_version = Some("10.0.2".into());
        profile
    }

    /// Decode `input` and run [`apply`] on its device state.
    fn apply_to(
        input: &[u8],
        dest: &Profile,
    ) -> Result<(Vec<SubsectionReport>, Vec<CpuSubsection>), ProxyError> {
        let mut decoder = StreamDecoder::new(Limits::default());
        let mut outcome = None;
        let reader = std::io::Cursor::new(input.to_vec());
        Input::from_reader(reader, "test stream".into()).decode(
            &mut decoder,
            "test",
            |_, frame| {
                if let Frame::DeviceState(mut state) = frame {
                    let reports = apply(&mut state, dest)?;
                    outcome = Some((reports, state.cpu_subsections()));
                }
                Ok(())
            },
        )?;
        Ok(outcome.unwrap_or_default())
    }

    const WFXT_HEADER: &[u8] = b"\x05\x0ecpu/wfxt-timer\x00\x00\x00\x01";

    fn real_11_1() -> Vec<u8> {
        match std::fs::read(vector_path("q111m72-a64fx.bin")) {
            Ok(bytes) => bytes,
            Err(e) => panic!("reading the 11.1 vector: {e}"),
        }
    }

    #[test]
    fn idle_wfxt_timer_of_a_real_11_1_stream_is_removed_for_10_0() {
        let (reports, left) = match apply_to(&real_11_1(), &profile_10_0()) {
            Ok(outcome) => outcome,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(reports.len(), 2);
        for report in &reports {
            assert!(!report.is_refused(), "{report}");
            assert_eq!(report.removed.len(), 1, "{report}");
            assert!(report.removed[0].reason.contains("not armed"), "{report}");
        }
        assert!(left.iter().all(|s| s.name != "cpu/wfxt-timer"));
        assert_eq!(left.len(), 6, "vfp, sve, irq-line-state of two vCPUs");
    }

    #[test]
    fn armed_wfxt_timer_of_a_real_11_1_stream_is_refused_by_name() {
        let mut input = real_11_1();
        let headers: Vec<usize> = input
            .windows(WFXT_HEADER.len())
            .enumerate()
            .filter(|(_, w)| *w == WFXT_HEADER)
            .map(|(at, _)| at)
            .collect();
        assert_eq!(headers.len(), 2, "one wfxt-timer subsection per vCPU");
        // vCPU 1's timer armed to expire at 5 s of virtual time.
        let payload = headers[1] + WFXT_HEADER.len();
        input[payload..payload + 8].copy_from_slice(&5_000_000_000u64.to_be_bytes());
        match apply_to(&input, &profile_10_0()) {
            Err(ProxyError::Refused(Refusal::Subsections(summaries))) => {
                let reason = summaries.join(" | ");
                assert!(reason.contains("vcpu 1"), "{reason}");
                assert!(reason.contains("cpu/wfxt-timer"), "{reason}");
                assert!(
                    reason.contains("armed (expires at 5000000000 ns)"),
                    "{reason}"
                );
                assert!(!reason.contains("vcpu 0"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // 11.1 itself loads it: nothing to remove or refuse.
        let mut dest_11_1 = profile_10_0();
        dest_11_1.qemu_version = Some("11.1.3".into());
        match apply_to(&input, &dest_11_1) {
            Ok((reports, left)) => {
                assert!(reports.is_empty(), "{reports:?}");
                assert_eq!(left.len(), 8);
            }
            Err(e) => panic!("{e}"),
        }
    }
}
