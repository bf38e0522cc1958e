//! The step plan against the plan before it, on the real captures of `codec/tests/vectors`
//! (QEMU 7.2, 10.0 and 11.1; cortex-a57, a64fx, max): every capture's vCPUs rewritten towards
//! every capture's profile, under each policy, as sent (sorted) and reversed (unsorted), must
//! give the same registers and the same report.

use std::path::PathBuf;

use migproxy_codec::offline::decode_reader;
use migproxy_codec::{DecodeError, Frame, Limits, StreamDecoder};

use super::previous::PreviousPlan;
use super::*;

/// Why a capture could not be read (`decode_reader` needs both conversions).
#[derive(Debug)]
struct ReadError(String);

impl From<DecodeError> for ReadError {
    fn from(err: DecodeError) -> Self {
        ReadError(format!("it does not decode: {err}"))
    }
}

impl From<std::io::Error> for ReadError {
    fn from(err: std::io::Error) -> Self {
        ReadError(format!("it cannot be read: {err}"))
    }
}

/// A capture's name and its vCPUs' registers (instance, list as sent).
type CapturedCpus = (String, Vec<(u32, Vec<(u64, u64)>)>);

/// Every vector's name and its vCPUs' registers (instance, list as sent), for the vectors whose
/// device state has cpreg arrays.
fn captured_cpus() -> Vec<CapturedCpus> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../codec/tests/vectors");
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
            .collect(),
        Err(err) => panic!("{}: {err}", dir.display()),
    };
    paths.sort();
    let mut captures = Vec::new();
    for path in paths {
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(err) => panic!("{}: {err}", path.display()),
        };
        let mut decoder = StreamDecoder::new(Limits::default());
        let mut cpus = Vec::new();
        let read = decode_reader::<_, ReadError>(file, &mut decoder, |_, frame| {
            if let Frame::DeviceState(state) = frame {
                cpus.extend(
                    state
                        .cpus()
                        .into_iter()
                        .map(|cpu| (cpu.instance, cpu.registers)),
                );
            }
            Ok(())
        });
        if let Err(err) = read {
            panic!("{}: {}", path.display(), err.0);
        }
        if !cpus.is_empty() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            captures.push((name, cpus));
        }
    }
    captures
}

fn policies() -> Vec<Policy> {
    let mut policies = vec![Policy::default()];
    for on_extra in [OnExtra::Drop, OnExtra::Refuse] {
        policies.push(Policy {
            on_extra,
            ..Policy::default()
        });
    }
    for fill_missing in [FillMissing::Always, FillMissing::Never] {
        policies.push(Policy {
            fill_missing,
            ..Policy::default()
        });
    }
    for on_id_mismatch in [
        OnIdMismatch::Refuse,
        OnIdMismatch::Warn,
        OnIdMismatch::UseDestination,
    ] {
        policies.push(Policy {
            on_id_mismatch,
            ..Policy::default()
        });
    }
    policies
}

#[test]
fn steps_rewrite_the_real_captures_like_the_previous_plan() {
    let captures = captured_cpus();
    // The vectors of three QEMU versions and three CPU models: a missing directory or a decoder
    // that stopped finding cpreg arrays must not pass by comparing nothing.
    assert!(
        captures.len() >= 12,
        "only {} captures with cpreg arrays",
        captures.len()
    );
    let profiles: Vec<(&str, Profile)> = captures
        .iter()
        .map(|(name, cpus)| match Profile::from_vcpus(Accel::Tcg, cpus) {
            Ok(profile) => (name.as_str(), profile),
            Err(err) => panic!("{name}: profile: {err}"),
        })
        .collect();
    let policies = policies();
    let (mut compared, mut changed, mut refused) = (0usize, 0usize, 0usize);
    for ((source_name, cpus), (_, source_profile)) in captures.iter().zip(&profiles) {
        for (dest_name, dest) in &profiles {
            for policy in &policies {
                for with_source in [true, false] {
                    let source_profile = with_source.then_some(source_profile);
                    for (instance, registers) in cpus {
                        let reversed: Vec<(u64, u64)> = registers.iter().rev().copied().collect();
                        for list in [registers, &reversed] {
                            let ids: Vec<u64> = list.iter().map(|&(id, _)| id).collect();
                            let new = RewritePlan::new(&ids, dest).apply(
                                *instance,
                                list,
                                dest,
                                source_profile,
                                policy,
                            );
                            let old = PreviousPlan::new(&ids, dest).apply(
                                *instance,
                                list,
                                dest,
                                source_profile,
                                policy,
                            );
                            assert_eq!(
                                new, old,
                                "{source_name} vcpu {instance} -> {dest_name}, {policy:?}, source profile {with_source}"
                            );
                            compared += 1;
                            changed += usize::from(!new.report.is_unchanged());
                            refused += usize::from(new.report.is_refused());
                        }
                    }
                }
            }
        }
    }
    // The comparison covered rewrites that change the list and ones that refuse, not only
    // identical lists.
    assert!(changed > compared / 4, "{changed} of {compared} changed");
    assert!(refused > 0, "none of {compared} refused");
    eprintln!("{compared} rewrites compared: {changed} changed, {refused} refused");
}
