//! `migproxy plan` on the real KVM streams of Linux 6.1, 6.12 and 7.3 (the fixtures
//! `integration-tests/fixtures/kvm/`, made by the KVM lab's `capture-kvm-fixtures`): every ordered
//! pair of kernels, with the destination profile captured from the destination kernel's own
//! stream (`profile capture --from-stream`) and from `--from-kvm` inside its host. The expected
//! outcome of each pair is the table of docs/profiles.md ("The KVM rules").

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KERNELS: [&str; 3] = ["6.1", "6.12", "7.3"];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../integration-tests/fixtures/kvm")
}

/// Decompress `name.xz` of the fixtures into `dir`; fails by name when the fixture is missing.
fn unpack(dir: &Path, name: &str) -> PathBuf {
    let packed = fixture_dir().join(format!("{name}.xz"));
    assert!(
        packed.is_file(),
        "KVM fixture {} is missing: regenerate with `cargo run -p migproxy-integration-tests --bin capture-kvm-fixtures`",
        packed.display()
    );
    let out = dir.join(name);
    let data = Command::new("xz")
        .arg("-dc")
        .arg(&packed)
        .output()
        .unwrap_or_else(|e| panic!("running xz for {}: {e}", packed.display()));
    assert!(data.status.success(), "xz -dc {}", packed.display());
    std::fs::write(&out, data.stdout).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    out
}

fn migproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_migproxy"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running migproxy {args:?}: {e}"))
}

fn text(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("migproxy-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Kernel {
    series: &'static str,
    stream: PathBuf,
    /// `profile capture --from-stream` of the kernel's own fresh stream (no writable masks).
    stream_profile: PathBuf,
    /// `profile capture --from-kvm` inside the same host.
    kvm_profile: PathBuf,
}

fn kernels(dir: &Path) -> Vec<Kernel> {
    KERNELS
        .iter()
        .map(|&series| {
            let stream = unpack(dir, &format!("kvm-{series}.stream"));
            let kvm_profile = unpack(dir, &format!("kvm-{series}.from-kvm.json"));
            let stream_profile = dir.join(format!("kvm-{series}.from-stream.json"));
            let out = migproxy(&[
                "profile",
                "capture",
                "--from-stream",
                text(&stream),
                "-o",
                text(&stream_profile),
            ]);
            assert!(
                out.status.success(),
                "capture {series}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Kernel {
                series,
                stream,
                stream_profile,
                kvm_profile,
            }
        })
        .collect()
}

/// What the KVM rules decide for a pair, and the lines `plan` must print for it.
fn expected(src: &str, dst: &str) -> (i32, Vec<&'static str>) {
    match (src, dst) {
        (s, d) if s == d => (0, vec!["unchanged"]),
        ("6.1", _) => (
            0,
            vec![
                "unchanged",
                "value  CCSIDR[L1 data]: source 0x701fe01a, destination 0x2: kept; the destination kernel takes it",
                "value  CLIDR_EL1: source 0x82000023, destination 0x2000021: kept; the destination kernel takes it",
                "verdict: the migration can go through migproxy",
            ],
        ),
        ("6.12", "7.3") => (
            0,
            vec![
                "3 dropped, 0 filled, 0 refused",
                "drop   TCR2_EL1 (0x603000000013c103) = 0x0: the source CPU has no FEAT_TCR2",
                "drop   PIRE0_EL1 (0x603000000013c512) = 0x1de7ec7edbadc0de: the source CPU has no FEAT_S1PIE",
                "drop   PIR_EL1 (0x603000000013c513) = 0x1de7ec7edbadc0de: the source CPU has no FEAT_S1PIE",
                "verdict: the migration can go through migproxy",
            ],
        ),
        ("7.3", "6.12") => (
            3,
            vec![
                "REFUSE KVM_REG_ARM_PSCI_VERSION 1.3 (0x10003): the destination kernel offers at most 1.1 (0x10001)",
                "drop   PMMIR_EL1 (0x603000000013c4f6) = 0x0",
                "drop   KVM_REG_ARM_VENDOR_HYP_BMAP_2 (0x6030000000160003) = 0x0",
                "verdict: REFUSED",
            ],
        ),
        (_, "6.1") => (
            3,
            vec![
                "REFUSE CCSIDR[L1 data]: source 0x2, destination 0x701fe01a; the destination kernel (before Linux 6.3",
                "REFUSE CCSIDR[L1 instruction]: source 0x2",
                "REFUSE CCSIDR[L2 data]: source 0x2",
                "REFUSE CLIDR_EL1: source 0x2000021, destination 0x82000023",
                "REFUSE ID_AA64DFR0_EL1: source 0x10305408, destination 0x10305406",
                "drop   CCSIDR[L3 data] (0x6020000000110004) = 0x2: the source's CLIDR_EL1 describes no such cache",
                // CNTP_CTL_EL0 reads 0x4 or 0x0: ISTATUS is live state, ENABLE/IMASK are clear.
                "drop   CNTP_CTL_EL0 (0x603000000013df11) = 0x",
                "the physical timer is disabled (ENABLE and IMASK clear)",
                "verdict: REFUSED",
            ],
        ),
        _ => panic!("no expectation for {src} -> {dst}"),
    }
}

#[test]
fn plan_decides_every_kernel_pair_by_the_kvm_rules() {
    let dir = TempDir::new("kvm-plan");
    let kernels = kernels(&dir.0);
    let mut checked = 0;
    for src in &kernels {
        for dst in &kernels {
            for (kind, profile) in [
                ("from-stream", &dst.stream_profile),
                ("from-kvm", &dst.kvm_profile),
            ] {
                // Every register's decision, not the digest.
                let out = migproxy(&[
                    "plan",
                    "--all",
                    "--source",
                    text(&src.stream),
                    "--dest-profile",
                    text(profile),
                ]);
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                let pair = format!("{} -> {} ({kind} profile)", src.series, dst.series);
                println!(
                    "== plan {pair}: exit {:?}\n{stdout}{stderr}",
                    out.status.code()
                );
                let (code, lines) = expected(src.series, dst.series);
                assert_eq!(out.status.code(), Some(code), "{pair}:\n{stdout}{stderr}");
                for line in lines {
                    assert!(
                        stdout.contains(line),
                        "{pair}: missing {line:?} in\n{stdout}"
                    );
                }
                if code == 3 {
                    // The daemon's and plan's refusal message names the registers too.
                    assert!(stderr.contains("refused: vcpu 0: "), "{pair}: {stderr}");
                }
                check_rewrite(&dir.0, src, dst, profile, code, &pair);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 18);
}

/// `rewrite` makes the decision `plan` announced: an unchanged pair comes out byte for byte, the
/// upgrade without the three registers, a refused pair not at all (exit 3, no output file).
fn check_rewrite(dir: &Path, src: &Kernel, dst: &Kernel, profile: &Path, code: i32, pair: &str) {
    let out_path = dir.join("rewritten.stream");
    let _ = std::fs::remove_file(&out_path);
    let out = migproxy(&[
        "rewrite",
        text(&src.stream),
        text(&out_path),
        "--dest-profile",
        text(profile),
    ]);
    assert_eq!(
        out.status.code(),
        Some(code),
        "rewrite {pair}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if code != 0 {
        assert!(!out_path.exists(), "rewrite {pair} left an output file");
        return;
    }
    let read =
        |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    let (input, output) = (read(&src.stream), read(&out_path));
    if src.series == "6.1" || src.series == dst.series {
        assert!(input == output, "rewrite {pair}: not byte for byte");
    } else {
        // 6.12 -> 7.3: three registers of 16 bytes (id + value) fewer, in both arrays.
        assert_eq!(input.len() - output.len(), 3 * 16, "rewrite {pair}");
        let inspect = migproxy(&["inspect", "--all", text(&out_path)]);
        let listing = String::from_utf8_lossy(&inspect.stdout);
        assert!(listing.contains("255 registers"), "{pair}: {listing}");
        for gone in ["TCR2_EL1", "PIRE0_EL1", "PIR_EL1 "] {
            assert!(
                !listing.contains(gone),
                "{pair}: {gone} still in the stream"
            );
        }
    }
}
