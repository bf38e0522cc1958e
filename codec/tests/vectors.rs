//! Every captured vector in `tests/vectors/*.bin` decodes and re-encodes byte for byte, whether it
//! is fed whole, one byte at a time, in random chunks or in large chunks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{decode_all, decode_chunked, Rng};
use migproxy_codec::{Frame, Limits};

fn vectors() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .collect();
    files.sort();
    files
}

#[test]
fn vector_directory_is_not_empty() {
    assert!(
        !vectors().is_empty(),
        "codec/tests/vectors/ holds no *.bin vector"
    );
}

#[test]
fn every_vector_round_trips_whole_and_in_large_chunks() {
    for path in vectors() {
        let input = std::fs::read(&path).unwrap();
        let (out, decoder) =
            decode_all(&input).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert!(decoder.is_done(), "{}", path.display());
        assert!(out == input, "{}: re-encoding differs", path.display());
        let (out, _) = decode_chunked(&input, Limits::default(), || 1 << 16, |_| {}).unwrap();
        assert!(out == input, "{}: 64 KiB chunks differ", path.display());
    }
}

#[test]
fn every_vector_round_trips_one_byte_at_a_time() {
    for path in vectors() {
        let input = std::fs::read(&path).unwrap();
        let (out, decoder) = decode_chunked(&input, Limits::default(), || 1, |_| {})
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert!(decoder.is_done());
        assert!(out == input, "{}: 1-byte feeding differs", path.display());
    }
}

#[test]
fn every_vector_round_trips_in_random_chunks() {
    for (seed, path) in vectors().into_iter().enumerate() {
        let input = std::fs::read(&path).unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed as u64);
        let (out, _) = decode_chunked(&input, Limits::default(), || 1 + rng.below(9000), |_| {})
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert!(out == input, "{}: random chunks differ", path.display());
    }
}

#[test]
fn precopy_vectors_expose_cpus_and_unchanged_rewrites_are_identical() {
    for path in vectors() {
        let input = std::fs::read(&path).unwrap();
        let mut cpu_count = 0;
        let (out, _) = decode_chunked(
            &input,
            Limits::default(),
            || usize::MAX,
            |frame| {
                if let Frame::DeviceState(state) = frame {
                    for cpu in state.cpus() {
                        assert!(!cpu.registers.is_empty());
                        assert!(cpu.registers.windows(2).all(|w| w[0].0 < w[1].0));
                        state.set_cpregs(cpu.instance, &cpu.registers).unwrap();
                        cpu_count += 1;
                    }
                }
            },
        )
        .unwrap();
        assert!(out == input, "{}: identity rewrite differs", path.display());
        let _ = cpu_count;
    }
}

/// Registers of every vCPU of a vector, read by decoding it.
fn cpus_of(input: &[u8]) -> Vec<migproxy_codec::CpuRegisters> {
    let mut cpus = Vec::new();
    decode_chunked(
        input,
        Limits::default(),
        || usize::MAX,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                cpus = state.cpus();
            }
        },
    )
    .unwrap();
    cpus
}

#[test]
fn a_real_cpu_section_takes_another_versions_register_list() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let q72 = std::fs::read(dir.join("q72-a64fx.bin")).unwrap();
    let q10 = std::fs::read(dir.join("q10-a64fx.bin")).unwrap();
    let target = cpus_of(&q72);
    assert_eq!(target.len(), 2);
    let source = cpus_of(&q10);
    assert_ne!(source[0].registers.len(), target[0].registers.len());
    // Rewrite the 10.0 stream's vCPUs to the 7.2 register lists, fed in odd chunks.
    let (out, _) = decode_chunked(
        &q10,
        Limits::default(),
        || 4093,
        |frame| {
            if let Frame::DeviceState(state) = frame {
                for cpu in &target {
                    state.set_cpregs(cpu.instance, &cpu.registers).unwrap();
                }
            }
        },
    )
    .unwrap();
    let delta = 16 * (source[0].registers.len() + source[1].registers.len()) as i64
        - 16 * (target[0].registers.len() + target[1].registers.len()) as i64;
    assert_eq!(q10.len() as i64 - out.len() as i64, delta);
    let rewritten = cpus_of(&out);
    assert_eq!(rewritten[0].registers, target[0].registers);
    assert_eq!(rewritten[1].registers, target[1].registers);
    // Everything before the first cpu section is untouched.
    let first_difference = q10.iter().zip(&out).position(|(a, b)| a != b).unwrap();
    assert!(first_difference > q10.len() / 2);
}

#[test]
fn truncated_vectors_fail_with_a_located_error() {
    for path in vectors() {
        let input = std::fs::read(&path).unwrap();
        // 31 cut points spread over the stream, plus the last few bytes.
        let cuts = (1..32)
            .map(|i| input.len() * i / 32)
            .chain(input.len().saturating_sub(4)..input.len());
        for cut in cuts {
            match decode_chunked(&input[..cut], Limits::default(), || 1 << 15, |_| {}) {
                Ok(_) => panic!("{}: prefix of {cut} bytes decoded", path.display()),
                Err(err) => assert!(
                    err.to_string().starts_with("at byte "),
                    "{}: {err}",
                    path.display()
                ),
            }
        }
    }
}

#[test]
fn corrupted_vectors_never_panic() {
    let path = vectors().into_iter().next().unwrap();
    let input = std::fs::read(&path).unwrap();
    let mut rng = Rng(7);
    for _ in 0..200 {
        let mut bad = input.clone();
        // Corrupt near record structure as well as anywhere: the first KiB and the last 64 KiB
        // (device state and description) hold most of it.
        let i = match rng.below(3) {
            0 => rng.below(1024),
            1 => input.len() - 1 - rng.below(65536.min(input.len())),
            _ => rng.below(input.len()),
        };
        bad[i] ^= 1 << rng.below(8);
        let _ = decode_chunked(&bad, Limits::default(), || 1 + rng.below(1 << 16), |_| {});
    }
}
