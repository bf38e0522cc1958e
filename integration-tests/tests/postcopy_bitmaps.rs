//! Postcopy without `postcopy-ram`: block dirty bitmaps migrated in postcopy (capability
//! `dirty-bitmaps` alone, as libvirt sets it for disks with persistent bitmaps), through migproxy.
//!
//! Each VM has a qcow2 disk (made by `qemu-img` in the scenario's directory; source and
//! destination each have their own, the bitmap travels in the migration stream, not in the file)
//! on `virtio-blk-device`. The source gets a persistent bitmap with 128 KiB marked dirty, the
//! migration is switched to postcopy once the source has sent its RAM (a running guest dirties
//! it meanwhile; when QEMU switches without `postcopy-ram`: see [`DISK_SIZE`]), and:
//! - the source really went through `postcopy-active` (its `MIGRATION` events);
//! - the proxy saw the package and says how it ended: `postcopy_start` writes `PING 3` only with
//!   `postcopy-ram`, so a 10.0 or 7.2 source ends it with RUN alone, an 11.1 source with a return
//!   path with `PING 0x42` RUN (the shapes the codec walks since the fuzzer found the first);
//! - the migration completes, the guest runs on the destination, and the destination has the
//!   bitmap with the same dirty count (its bits are sent after the package, in postcopy).
//!
//! RAM is not postcopiable without `postcopy-ram`: the source sends the rest of it in the main
//! stream before the package, so no page is sent in `postcopy-active`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use migproxy_integration_tests::flows::{
    allow_unrecoverable_postcopy_args, check_channels, expect_summary, start_proxy,
    switch_to_postcopy_once, Pair, Setup,
};
use migproxy_integration_tests::migproxy::{event_field, Daemon};
use migproxy_integration_tests::qemu::Version::{self, V10, V111, V72};
use migproxy_integration_tests::qemu::Vm;
use migproxy_integration_tests::qmp::migration_status;
use migproxy_integration_tests::scenario::{self, a64fx, Scenario};
use serde_json::{json, Value};

/// The disk's block node on both sides (the bitmap is migrated by node name).
const NODE: &str = "disk0";
/// The guest device on it (`qemu-io -d` writes through the device's own block backend, since the
/// device does not share write permission with a second user of the node).
const DEVICE: &str = "vdisk0";
/// The bitmap the source records and the destination must have afterwards.
const BITMAP: &str = "bitmap0";
/// Bitmap granularity: one bit per 512 bytes (the finest QEMU allows; see [`DISK_SIZE`]).
const GRANULARITY: u64 = 512;
/// What the source writes to the disk before the migration: two granules, so a count of 128 KiB.
const DIRTY_BYTES: u64 = 128 << 10;
/// Each disk's virtual size (sparse: the files stay small). A source switches to postcopy only
/// while what is left to send does not fit the downtime limit but what postcopy cannot send does
/// (`migration_iteration_run`). Without `postcopy-ram` only the bitmaps can be sent in postcopy,
/// and QEMU counts a bitmap's pending work as its number of granules not yet sent: 64 GiB at
/// 512 bytes is 128 Mi, far above the limit, so the migration can neither complete in precopy
/// nor miss the switch, while the bitmap itself (mostly zero chunks) is small on the wire.
const DISK_SIZE: &str = "64G";
/// Source bandwidth limit, bytes/s: the guest's dirty window (2 MiB) fits the downtime limit.
const BANDWIDTH: u64 = 4 << 20;
/// Source downtime limit, ms: the limit the RAM must fit is about `BANDWIDTH` times this
/// (8 MiB), above the guest's dirty window and far below the bitmap's pending count.
const DOWNTIME_LIMIT_MS: u64 = 2000;
/// How long the destination may take to finish the bitmap after the migration completed.
const BITMAP_TIMEOUT: Duration = Duration::from_secs(30);
/// The proxy's log line for a package a checking relay forwarded.
const RELAYED: &str = "postcopy package relayed as received";
/// The proxy's log line for a package it walked and rewrote.
const REWRITTEN: &str = "postcopy package rewritten with the source reference description";

/// `qemu-img create -f qcow2 DIR/NAME 16M`: an empty qcow2 image (version 3, which keeps bitmaps).
fn qcow2_disk(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(DISK_SIZE)
        .stdin(Stdio::null())
        .output()
        .context(
            "running qemu-img (package qemu-utils, installed by scripts/provision.sh from \
             scripts/debian-packages.txt)",
        )?;
    if !out.status.success() {
        bail!(
            "qemu-img create {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(path.display().to_string())
}

/// The qcow2 node and the guest device that uses it.
fn disk_args(image: &str) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!("driver=qcow2,node-name={NODE},file.driver=file,file.filename={image}"),
        "-device".into(),
        format!("virtio-blk-device,drive={NODE},id={DEVICE}"),
    ]
}

/// `from` -> `to` (a64fx, 2 vCPUs), each with its own qcow2 disk; `dirty-bitmaps` and `events`
/// on both sides, the return path on the source, no `postcopy-ram`; the RAM fits the downtime
/// limit, the bitmap does not (see [`DISK_SIZE`]), so the migration waits for the switch.
fn bitmap_setup(s: &Scenario, from: Version, to: Version) -> Result<Setup> {
    let mut source = a64fx(from);
    source.extra_args = disk_args(&qcow2_disk(s.dir.path(), "source.qcow2")?);
    let mut dest = a64fx(to);
    dest.extra_args = disk_args(&qcow2_disk(s.dir.path(), "dest.qcow2")?);
    let mut setup = Setup::new(source, dest).return_path();
    setup.params_source =
        json!({ "max-bandwidth": BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS });
    setup.caps_both.push(("dirty-bitmaps", true));
    setup.caps_both.push(("events", true));
    Ok(setup)
}

/// The persistent bitmap on the source with [`DIRTY_BYTES`] marked (written through the block
/// layer, as a guest write would mark them).
fn add_dirty_bitmap(source: &mut Vm) -> Result<()> {
    source.qmp.execute(
        "block-dirty-bitmap-add",
        json!({ "node": NODE, "name": BITMAP, "persistent": true, "granularity": GRANULARITY }),
    )?;
    let out = source
        .qmp
        .hmp(&format!("qemu-io -d {DEVICE} \"write 0 {DIRTY_BYTES}\""))?;
    // qemu-io prints its result on QEMU's stdout; the monitor answers only an error.
    if !out.trim().is_empty() {
        bail!("qemu-io write on the source disk: {out}");
    }
    let bitmap = find_bitmap(source)?
        .with_context(|| format!("the source has no bitmap {BITMAP} on {NODE}"))?;
    let count = bitmap.get("count").and_then(Value::as_u64);
    if count != Some(DIRTY_BYTES) {
        bail!("the source's bitmap counts {count:?} dirty bytes, expected {DIRTY_BYTES}: {bitmap}");
    }
    Ok(())
}

/// [`BITMAP`] on [`NODE`] from `query-named-block-nodes`, if the node has it.
fn find_bitmap(vm: &mut Vm) -> Result<Option<Value>> {
    let nodes = vm
        .qmp
        .execute("query-named-block-nodes", json!({ "flat": true }))?;
    let node = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|node| node.get("node-name").and_then(Value::as_str) == Some(NODE))
        .with_context(|| format!("{}: no block node {NODE}: {nodes}", vm.name))?;
    Ok(node
        .get("dirty-bitmaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|bitmap| bitmap.get("name").and_then(Value::as_str) == Some(BITMAP))
        .cloned())
}

/// The destination completed the incoming migration and has the bitmap, no longer in use by it,
/// with the source's dirty count.
fn assert_bitmap_arrived(dest: &mut Vm) -> Result<()> {
    let info = dest.qmp.wait_migration(&[], BITMAP_TIMEOUT)?;
    if migration_status(&info) != "completed" {
        bail!(
            "destination migration ended {}: {info}",
            migration_status(&info)
        );
    }
    let deadline = Instant::now() + BITMAP_TIMEOUT;
    loop {
        let found = find_bitmap(dest)?;
        let done = found.as_ref().is_some_and(|bitmap| {
            bitmap.get("busy").and_then(Value::as_bool) != Some(true)
                && bitmap.get("count").and_then(Value::as_u64) == Some(DIRTY_BYTES)
        });
        if done {
            eprintln!("  destination bitmap: {}", found.unwrap_or_default());
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "after {BITMAP_TIMEOUT:?} the destination's {NODE} has {found:?} for bitmap \
                 {BITMAP}, expected one counting {DIRTY_BYTES} dirty bytes"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until the source has sent its RAM once, then switch it to postcopy. Returns the bytes
/// sent in precopy. The end of the first pass shows differently: 10.0 and 7.2 sync the dirty
/// log again only when the rest would fit the downtime limit (never here: the bitmap does not),
/// so nothing remains until the switch; 11.1 syncs again at once, so a second sync shows it.
fn switch_after_first_pass(source: &mut Vm) -> Result<u64> {
    switch_to_postcopy_once(source, "the first RAM pass", |info| {
        let ram = |field: &str| {
            info.pointer(&format!("/ram/{field}"))
                .and_then(Value::as_u64)
        };
        ram("transferred").unwrap_or(0) > 0
            && (ram("remaining") == Some(0) || ram("dirty-sync-count").unwrap_or(0) >= 2)
    })
}

/// The source's `MIGRATION` events went through `postcopy-active` (it switched; RAM cannot show
/// it: none is sent in postcopy without `postcopy-ram`).
fn assert_source_entered_postcopy(source: &Vm) -> Result<()> {
    let seen = source.qmp.migration_events();
    if !seen.iter().any(|status| status == "postcopy-active") {
        bail!("the source never reported postcopy-active; its MIGRATION events: {seen:?}");
    }
    eprintln!("  source MIGRATION events: {}", seen.join(" -> "));
    Ok(())
}

/// The proxy logged `message` once, for a package ending exactly with `ending`.
fn assert_package_logged(daemon: &Daemon, message: &str, ending: &str) -> Result<()> {
    let events = daemon.events_named(message);
    let [event] = events.as_slice() else {
        bail!(
            "expected one {message:?} in the migproxy log, found {}:\n{}",
            events.len(),
            daemon.log()
        );
    };
    let found = event_field(event, "ending");
    if found != ending {
        bail!("the package ended {found:?}, expected {ending:?}: {event}");
    }
    eprintln!(
        "  migproxy: package of {} bytes, ending {found}",
        event_field(event, "bytes")
    );
    Ok(())
}

/// Source -> `migproxy run` with `proxy_args` -> destination, the bitmap added, switched to
/// postcopy after the first RAM pass: the source went through `postcopy-active`, the migration
/// completed, the guest runs on the destination, which has the bitmap. Returns the summary
/// (outcome `completed`, postcopy `outlook`, the channels as set up) and the daemon.
fn switched_with_bitmap(
    s: &mut Scenario,
    setup: &Setup,
    proxy_args: &[String],
    outlook: &str,
) -> Result<(Value, Daemon)> {
    let mut pair = Pair::start(s, setup, "")?;
    add_dirty_bitmap(&mut pair.source)?;
    let daemon = start_proxy(s, pair.dest_port, proxy_args)?;
    scenario::migrate(&mut pair.source, daemon.listen_port)?;
    let precopy = switch_after_first_pass(&mut pair.source)?;
    eprintln!("  switched after {precopy} precopy bytes");
    scenario::assert_migrated(&mut pair.source, &mut pair.dest)?;
    assert_source_entered_postcopy(&pair.source)?;
    assert_bitmap_arrived(&mut pair.dest)?;
    let summary = expect_summary(&daemon, "completed")?;
    check_channels(&summary, setup)?;
    let found = event_field(&summary, "postcopy");
    if found != outlook {
        bail!("summary postcopy={found}, expected {outlook}: {summary}");
    }
    eprintln!("  migproxy: postcopy={found}");
    Ok((summary, daemon))
}

/// Through a rewriting proxy (both profiles, the source reference, and `extra`): the package was
/// walked with the reference and every vCPU in it rewritten.
fn switched_rewritten(
    s: &mut Scenario,
    from: Version,
    to: Version,
    extra: &[String],
    outlook: &str,
    ending: &str,
) -> Result<()> {
    let setup = bitmap_setup(s, from, to)?;
    let mut args = s.profile_args(&setup.source, &setup.dest)?;
    args.extend(extra.iter().cloned());
    let (summary, daemon) = switched_with_bitmap(s, &setup, &args, outlook)?;
    assert_package_logged(&daemon, REWRITTEN, ending)?;
    let rewritten = event_field(&summary, "cpus_rewritten");
    if rewritten != setup.source.smp.to_string() {
        bail!(
            "migproxy rewrote {rewritten} vCPU(s) in the package, expected all {}",
            setup.source.smp
        );
    }
    Ok(())
}

/// A checking relay (no profile): the package passes as received.
#[test]
fn postcopy_bitmaps_10_to_10_checking_relay() {
    scenario::run("postcopy_bitmaps_10_to_10_checking_relay", |s| {
        let setup = bitmap_setup(s, V10, V10)?;
        let (_, daemon) = switched_with_bitmap(s, &setup, &[], "relayed")?;
        assert_package_logged(&daemon, RELAYED, "RUN")
    });
}

/// 10.0 cannot take its guest back after a switch: the proxy goes on only with
/// `--unrecoverable-postcopy allow`, and rewrites the package.
#[test]
fn postcopy_bitmaps_10_to_72_package_rewritten() {
    scenario::run("postcopy_bitmaps_10_to_72_package_rewritten", |s| {
        switched_rewritten(
            s,
            V10,
            V72,
            &allow_unrecoverable_postcopy_args(),
            "unrecoverable",
            "RUN",
        )
    });
}

/// 11.1 with a return path ends the package with `PING 0x42` (and no `PING 3`): recoverable by
/// default, rewritten.
#[test]
fn postcopy_bitmaps_111_to_10_package_rewritten() {
    scenario::run("postcopy_bitmaps_111_to_10_package_rewritten", |s| {
        switched_rewritten(s, V111, V10, &[], "recoverable", "PING 0x42, RUN")
    });
}

/// The other direction: a 7.2 source, `--unrecoverable-postcopy allow`, rewritten.
#[test]
fn postcopy_bitmaps_72_to_10_package_rewritten() {
    scenario::run("postcopy_bitmaps_72_to_10_package_rewritten", |s| {
        switched_rewritten(
            s,
            V72,
            V10,
            &allow_unrecoverable_postcopy_args(),
            "unrecoverable",
            "RUN",
        )
    });
}
