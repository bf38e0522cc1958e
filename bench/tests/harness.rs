//! The harness end to end: a stream file through the real `tokio-relay` binary and
//! directly, checking that every byte arrives and that the relay's CPU and memory are seen.

use std::path::PathBuf;

use migproxy_bench::relay_process::RelaySpec;
use migproxy_bench::{multifd, switchover, throughput};

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("migbench-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok();
    dir
}

#[test]
fn switchover_samples_name_their_round() -> Result<(), Box<dyn std::error::Error>> {
    // A real capture from the repository: the switchover part needs a device-state tail.
    let stream =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../codec/tests/vectors/q10-a64fx.bin");
    let dir = scratch_dir("switchover");
    let tokio_relay = env!("CARGO_BIN_EXE_tokio-relay");
    let relays: Vec<RelaySpec> = vec![
        "direct".parse()?,
        format!(
            "tokio={tokio_relay} --listen 127.0.0.1:{{listen}} --upstream 127.0.0.1:{{upstream}}"
        )
        .parse()?,
    ];
    let report = switchover::run(&stream, 4, 1, &relays, &dir.join("logs"))?;
    std::fs::remove_dir_all(&dir).ok();

    assert_eq!(report.vcpus, 2);
    for result in &report.relays {
        assert!(
            result.errors.is_empty(),
            "{}: {:?}",
            result.relay.name,
            result.errors
        );
        // Every relay ran once per round, so the report can pair direct's sample of a round
        // with each relay's.
        assert_eq!(result.rounds, vec![0, 1, 2, 3], "{}", result.relay.name);
        assert_eq!(result.from_tail_start_us.len(), 4);
        assert_eq!(result.samples_us.len(), 4);
        assert!(result.from_tail_start_us.iter().all(|us| *us > 0.0));
    }
    Ok(())
}

#[test]
fn tokio_relay_and_direct_deliver_every_byte() -> Result<(), Box<dyn std::error::Error>> {
    let dir = scratch_dir("throughput");
    let stream = dir.join("stream.bin");
    // 24 MiB of varied bytes: not a QEMU stream, which neither of these relays needs.
    let data: Vec<u8> = (0..24u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&stream, &data)?;
    let tokio_relay = env!("CARGO_BIN_EXE_tokio-relay");
    let relays: Vec<RelaySpec> = vec![
        "direct".parse()?,
        format!(
            "tokio={tokio_relay} --listen 127.0.0.1:{{listen}} --upstream 127.0.0.1:{{upstream}}"
        )
        .parse()?,
    ];
    let report = throughput::run(&stream, 2, 1, &relays, &dir.join("logs"))?;
    std::fs::remove_dir_all(&dir).ok();

    assert_eq!(report.stream_bytes, data.len() as u64);
    let [direct, tokio] = report.relays.as_slice() else {
        panic!("two relays expected, got {}", report.relays.len());
    };
    for result in [direct, tokio] {
        assert!(
            result.errors.is_empty(),
            "{}: {:?}",
            result.relay.name,
            result.errors
        );
        assert_eq!(result.runs.len(), 2);
        for run in &result.runs {
            assert_eq!(run.bytes_received, data.len() as u64);
            assert!(run.gib_per_s > 0.0);
        }
    }
    assert!(direct.runs.iter().all(|r| r.relay_cpu_s.is_none()));
    for run in &tokio.runs {
        // A live tokio process has a few MiB resident; a zero would mean we read the wrong pid.
        assert!(
            run.peak_rss_kib.unwrap_or(0) > 1024,
            "peak rss {:?}",
            run.peak_rss_kib
        );
        assert!(run.relay_cpu_s.is_some());
    }
    Ok(())
}

#[test]
fn a_relay_that_never_listens_is_reported() -> Result<(), Box<dyn std::error::Error>> {
    let dir = scratch_dir("broken");
    let stream = dir.join("stream.bin");
    std::fs::write(&stream, vec![1u8; 4096])?;
    let relays: Vec<RelaySpec> = vec!["broken=false".parse()?];
    let report = throughput::run(&stream, 1, 0, &relays, &dir.join("logs"))?;
    std::fs::remove_dir_all(&dir).ok();
    let broken = report.relays.first().ok_or("no result")?;
    assert!(broken.runs.is_empty());
    assert_eq!(broken.errors.len(), 1);
    assert!(
        broken.errors.iter().all(|e| e.contains("before listening")),
        "{:?}",
        broken.errors
    );
    Ok(())
}

#[test]
fn multifd_relay_delivers_the_main_stream_and_every_channel(
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = scratch_dir("multifd");
    let stream =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../codec/tests/vectors/q72-mfd-main.bin");
    let payload = dir.join("payload.bin");
    let data: Vec<u8> = (0..3u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&payload, &data)?;
    // tokio-relay dials in accept order, and the main channel reaches the destination before
    // any multifd channel is opened: the same order migproxy needs.
    let tokio_relay = env!("CARGO_BIN_EXE_tokio-relay");
    let relays: Vec<RelaySpec> = vec![format!(
        "tokio={tokio_relay} --listen 127.0.0.1:{{listen}} --upstream 127.0.0.1:{{upstream}}"
    )
    .parse()?];
    let logs = dir.join("logs");
    let plan = multifd::Plan {
        stream: &stream,
        payload: &payload,
        channels: 2,
        channel_bytes: 8 << 20, // more than the payload: it is sent again from its start
        log_dir: &logs,
        warmup: 0,
    };
    let report = multifd::run(&plan, 2, &relays)?;
    std::fs::remove_dir_all(&dir).ok();
    let [tokio] = report.relays.as_slice() else {
        panic!("one relay expected, got {}", report.relays.len());
    };
    assert!(tokio.errors.is_empty(), "{:?}", tokio.errors);
    assert_eq!(tokio.runs.len(), 2);
    let stream_len = std::fs::metadata(&stream)?.len();
    for run in &tokio.runs {
        assert_eq!(run.bytes_received, stream_len + 2 * ((8 << 20) + 64));
        assert!(run.peak_rss_kib > 1024, "peak rss {}", run.peak_rss_kib);
        assert!(run.multifd_gib_per_s > 0.0);
    }
    Ok(())
}

#[test]
fn cachegrind_counts_the_instructions_of_relaying() -> Result<(), Box<dyn std::error::Error>> {
    use migproxy_bench::instructions::{self, Counter};
    let dir = scratch_dir("instructions");
    let stream = dir.join("stream.bin");
    let data: Vec<u8> = (0..16u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&stream, &data)?;
    let tokio_relay = env!("CARGO_BIN_EXE_tokio-relay");
    let relays: Vec<RelaySpec> = vec![format!(
        "tokio={tokio_relay} --listen 127.0.0.1:{{listen}} --upstream 127.0.0.1:{{upstream}}"
    )
    .parse()?];
    let report = instructions::run(&stream, 1, Counter::Cachegrind, &relays, &dir.join("logs"))?;
    std::fs::remove_dir_all(&dir).ok();
    let tokio = report.relays.first().ok_or("no result")?;
    assert!(tokio.errors.is_empty(), "{:?}", tokio.errors);
    let (idle, loaded) = (tokio.idle.first(), tokio.loaded.first());
    let (Some(&idle), Some(&loaded)) = (idle, loaded) else {
        panic!("one idle and one loaded count expected: {tokio:?}");
    };
    // Start-up alone runs a runtime: hundreds of thousands of instructions at least; relaying
    // 16 MiB through 1 MiB buffers adds work on top of it.
    assert!(idle > 100_000, "idle count {idle}");
    assert!(loaded > idle, "loaded {loaded} <= idle {idle}");
    assert!(tokio.per_gib.first().is_some_and(|&v| v > 0.0));
    Ok(())
}
