//! The offline reports stay bounded however many vCPUs a stream has: `inspect`, `plan` and `rewrite` print
//! a digest by default (vCPUs with the same outcome share one block, lists name their first
//! registers and count the rest), every register of every vCPU with `--all`, and `plan --json`
//! stays complete with each warning naming its vCPU. The streams are a real QEMU 10.0 capture's
//! vCPU repeated to the vCPU budget, planned against profiles captured from real streams.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::*;

const VCPUS: u32 = 512;

/// Every line the digest may print for one stream: a head, at most 8 outcomes of a bounded
/// block each, the counted rest, a verdict and a hint.
const MAX_DIGEST_LINES: usize = 120;

fn run(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running migproxy {args:?}: {e}"))
}

/// The profiles of the real 10.0 -> 7.2 pair (`-M virt-7.2 -cpu a64fx`, 2 vCPUs) and a stream
/// of `VCPUS` vCPUs, each with vCPU 0's registers of the real 10.0 capture; `change` may edit a
/// vCPU's registers.
struct ManyVcpus {
    dir: TempDir,
    stream: String,
    dest: String,
    source: String,
}

impl ManyVcpus {
    fn new(name: &str, change: impl Fn(u32, &mut Vec<(u64, u64)>)) -> ManyVcpus {
        let dir = TempDir::new(name);
        let dest = vector_profile(&dir, "q72-a64fx.bin", &[], "dest72.json");
        let source = vector_profile(&dir, "q10m72-a64fx.bin", &[], "src10.json");
        let stream = dir.file("many.bin");
        std::fs::write(
            &stream,
            repeated_vcpu(&vector("q10m72-a64fx.bin"), VCPUS, change),
        )
        .unwrap();
        ManyVcpus {
            dir,
            stream,
            dest,
            source,
        }
    }

    fn plan(&self, extra: &[&str]) -> Output {
        self.run(&["plan", "--source", &self.stream], extra)
    }

    fn rewrite(&self, output: &str, extra: &[&str]) -> Output {
        self.run(&["rewrite", &self.stream, &self.dir.file(output)], extra)
    }

    /// `migproxy HEAD... --dest-profile D --source-profile S EXTRA...`
    fn run(&self, head: &[&str], extra: &[&str]) -> Output {
        let mut args = head.to_vec();
        args.extend([
            "--dest-profile",
            &self.dest,
            "--source-profile",
            &self.source,
        ]);
        args.extend_from_slice(extra);
        run(&args)
    }
}

/// The readable plan of `out`, which must have exited with `code`, within the digest's bound.
fn digest(out: &Output, code: i32) -> String {
    let text = stdout(out);
    assert_eq!(out.status.code(), Some(code), "{text}{}", stderr(out));
    println!("{text}");
    let lines = text.lines().count();
    assert!(lines <= MAX_DIGEST_LINES, "{lines} lines:\n{text}");
    text
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn plan_digests_512_alike_vcpus_and_all_lists_every_register() {
    let many = ManyVcpus::new("plan-digest", |_, _| {});
    let text = digest(&many.plan(&[]), 0);
    let lines = text.lines().count();
    assert!(
        text.contains("\nvcpu 0-511 (512 vcpus): 261 -> 248 registers: 16 dropped, 3 filled"),
        "{text}"
    );
    assert_eq!(text.matches("\n  drop ").count(), 8, "{text}");
    assert!(
        text.contains("\n  ... and 8 more dropped registers\n"),
        "{text}"
    );
    assert!(text.contains("--all lists every register"), "{text}");

    let all = many.plan(&["--all"]);
    let text = stdout(&all);
    assert_eq!(all.status.code(), Some(0), "{}", stderr(&all));
    for vcpu in 0..VCPUS {
        assert!(
            text.contains(&format!(
                "\nvcpu {vcpu}: 261 -> 248 registers: 16 dropped, 3 filled"
            )),
            "vcpu {vcpu} missing"
        );
    }
    assert_eq!(text.matches("\n  drop ").count(), 512 * 16);
    assert_eq!(text.matches("\n  fill ").count(), 512 * 3);
    println!(
        "plan of {VCPUS} vCPUs: {lines} lines by default, {} with --all",
        text.lines().count()
    );
}

/// vCPUs refused for different values: one block per distinct refusal, each REFUSE line in the
/// exact words of the refusal, at most 8 outcomes described and the rest counted; `--all` has
/// every vCPU's refusal.
#[test]
fn plan_names_each_distinct_refusal_exactly_and_counts_the_rest() {
    // DBGVCR (dropped when 0) holds a value of its own on every vCPU from 100 up.
    const DBGVCR: u64 = 0x4020_0000_200e_0380;
    let many = ManyVcpus::new("plan-refusals", |vcpu, registers| {
        if vcpu >= 100 {
            let reg = registers.iter_mut().find(|(id, _)| *id == DBGVCR).unwrap();
            reg.1 = u64::from(vcpu);
        }
    });
    let out = many.plan(&[]);
    let text = digest(&out, 3);
    assert!(
        text.contains("\nvcpu 0-99 (100 vcpus): 261 -> 248 registers: 16 dropped"),
        "{text}"
    );
    assert!(text.contains(
        "\nvcpu 100: 261 -> 249 registers: 15 dropped, 3 filled, 1 refused, 0 id mismatches\n  \
         REFUSE DBGVCR = 0x64 is not on the destination and differs from the source default 0x0: \
         dropping it would lose guest state\n"
    ));
    // 0-99, then 100 to 106 alone: the other 405 counted.
    assert!(
        text.contains(
            "\nand 405 more vCPUs with other outcomes (--all lists every vCPU) (vcpu 107-511 (405 vcpus))\n"
        ),
        "{text}"
    );
    assert!(text.contains("verdict: REFUSED"), "{text}");
    // The refusal message is the daemon's digest.
    let message = stderr(&out);
    assert!(
        message.contains("vcpu 100: DBGVCR = 0x64 is not on the destination"),
        "{message}"
    );
    assert!(message.len() < 8192, "{} bytes: {message}", message.len());

    let all = many.plan(&["--all"]);
    let text = stdout(&all);
    for vcpu in 100..VCPUS {
        assert!(
            text.contains(&format!(
                "  REFUSE DBGVCR = {vcpu:#x} is not on the destination"
            )),
            "vcpu {vcpu}'s refusal missing"
        );
    }
}

#[test]
fn rewrite_reports_a_digest_on_stderr_and_all_lists_every_register() {
    let many = ManyVcpus::new("rewrite-digest", |_, _| {});
    let digest = many.rewrite("digest.bin", &[]);
    let report = stderr(&digest);
    assert_eq!(digest.status.code(), Some(0), "{report}");
    println!("{report}");
    let lines = report.lines().count();
    assert!(lines <= MAX_DIGEST_LINES, "{lines} lines:\n{report}");
    assert!(
        report.starts_with("vcpu 0-511 (512 vcpus): 261 -> 248 registers: 16 dropped, 3 filled"),
        "{report}"
    );
    let all = many.rewrite("all.bin", &["--all"]);
    let report = stderr(&all);
    assert_eq!(all.status.code(), Some(0), "{report}");
    assert_eq!(report.matches("\n  drop ").count(), 512 * 16);
    assert!(report.contains("\nvcpu 511: 261 -> 248 registers"));
    // The report changes, the stream does not.
    let read = |name: &str| std::fs::read(many.dir.file(name)).unwrap();
    assert!(read("digest.bin") == read("all.bin"));
}

/// `plan --json` is complete (every vCPU, every register) and each warning names its vCPU: the
/// odd vCPUs list two registers out of order (QEMU never does; the rewrite sorts them and warns).
#[test]
fn plan_json_is_complete_and_its_warnings_name_the_vcpu() {
    let many = ManyVcpus::new("plan-json", |vcpu, registers| {
        if vcpu % 2 == 1 {
            registers.swap(0, 1);
        }
    });
    let out = many.plan(&["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vcpus = plan["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 512);
    let mut warned = 0;
    for (n, vcpu) in vcpus.iter().enumerate() {
        assert_eq!(vcpu["vcpu"], n, "{vcpu}");
        assert_eq!(vcpu["dropped"].as_array().unwrap().len(), 16, "{vcpu}");
        for warning in vcpu["warnings"].as_array().unwrap() {
            assert_eq!(
                warning.as_str().unwrap(),
                format!("vcpu {n}: the source list was not sorted by id; sorted it")
            );
            assert_eq!(n % 2, 1, "{vcpu}");
            warned += 1;
        }
    }
    assert_eq!(warned, 256);
    // The readable plan: the same warning once, for the odd vCPUs together.
    let text = stdout(&many.plan(&[]));
    assert!(
        text.contains("\nvcpu 1,3,5,7,9,11,13,15 and 248 more (256 vcpus): 261 -> 248 registers"),
        "{text}"
    );
    assert_eq!(
        text.matches("\n  warning: the source list was not sorted by id; sorted it\n")
            .count(),
        1,
        "{text}"
    );
}

/// `inspect` lists one register list for alike vCPUs and only the differences of the others;
/// `--all` every section and every register of every vCPU.
#[test]
fn inspect_digests_alike_vcpus_and_all_lists_every_register() {
    const DBGVCR: u64 = 0x4020_0000_200e_0380;
    let many = ManyVcpus::new("inspect-digest", |vcpu, registers| {
        if vcpu == 7 {
            let reg = registers.iter_mut().find(|(id, _)| *id == DBGVCR).unwrap();
            reg.1 = 0x77;
        }
    });
    let digest = run(&["inspect", &many.stream]);
    let text = stdout(&digest);
    assert_eq!(digest.status.code(), Some(0), "{}", stderr(&digest));
    println!("{text}");
    let lines = text.lines().count();
    // A head, ~10 section lines, the RAM table and one list of 261 registers.
    assert!(lines < 261 + 60, "{lines} lines");
    assert!(
        text.contains("\nvcpu 0-6,8-511 (511 vcpus), section version 22: 261 registers\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "\nvcpu 7, section version 22: 261 registers, 1 differ from vcpu 0:\n  \
             0x40200000200e0380   DBGVCR                   0x77\n"
        ),
        "{text}"
    );
    assert!(text.contains("(512 sections)"), "{text}");

    let all = run(&["inspect", "--all", &many.stream]);
    let text = stdout(&all);
    assert_eq!(all.status.code(), Some(0), "{}", stderr(&all));
    assert_eq!(text.matches("\n  0x").count(), 512 * 261);
    assert!(text.contains("\ncpu 511 (section version 22): 261 registers\n"));
    println!(
        "inspect of {VCPUS} vCPUs: {lines} lines by default, {} with --all",
        text.lines().count()
    );
}
