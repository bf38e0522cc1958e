//! Damaged streams: a real QEMU 10.0 -> 7.2 a64fx migration whose main channel is damaged in
//! flight between the source and migproxy (a byte flipped, a byte lost, the connection cut).
//! migproxy must fail the migration closed, saying where; the source keeps the guest running and
//! the destination never runs it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use anyhow::{bail, Context};
use migproxy_integration_tests::flows::{
    assert_destination_untouched, expect_summary, start_proxy, Pair, Setup,
};
use migproxy_integration_tests::migproxy::event_field;
use migproxy_integration_tests::qemu::Version::{V10, V72};
use migproxy_integration_tests::scenario::{self, a64fx};

/// What happens to the source's bytes on their way to the proxy.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// The byte at this stream offset becomes 0x42, a record type QEMU never sends.
    Flip(u64),
    /// The byte at this stream offset is lost.
    Drop(u64),
    /// The connection is cut (both ways) after this many bytes.
    Cut(u64),
}

/// Stream offset of the first record after the header and the configuration of a `virt-7.2`
/// stream: `QEVM` v3 (8), `07` + be32 len + "virt-7.2" (13), the target-page-bits subsection
/// (1 + 1 + 30 + 4 + 4 = 40).
const FIRST_RECORD: u64 = 61;

/// Accept one connection on `listener`, connect to `upstream`, and copy source -> upstream with
/// `damage` applied; the reverse direction is copied unchanged.
fn damaging_relay(listener: TcpListener, upstream: u16, damage: Damage) {
    let Ok((source, _)) = listener.accept() else {
        return;
    };
    let Ok(proxy) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    if let (Ok(mut back_from), Ok(mut back_to)) = (proxy.try_clone(), source.try_clone()) {
        thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(Shutdown::Write);
        });
    }
    let (mut from, mut to) = (source, proxy);
    let mut offset: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = buf[..n].to_vec();
        let end = offset + n as u64;
        match damage {
            Damage::Flip(at) if (offset..end).contains(&at) => {
                chunk[(at - offset) as usize] = 0x42;
            }
            Damage::Drop(at) if (offset..end).contains(&at) => {
                chunk.remove((at - offset) as usize);
            }
            Damage::Cut(at) if end >= at => {
                let keep = (at - offset) as usize;
                let _ = to.write_all(&chunk[..keep]);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            _ => {}
        }
        if to.write_all(&chunk).is_err() {
            break;
        }
        offset = end;
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Source -> damaging relay -> migproxy (both profiles) -> destination. Return-path on, so the
/// source learns of the failure whenever it happens.
fn damaged_migration_fails_closed(name: &str, damage: Damage, reason_has: &str) {
    scenario::run(name, |s| {
        let setup = Setup::new(a64fx(V10), a64fx(V72)).return_path();
        let profiles = s.profile_args(&setup.source, &setup.dest)?;
        let mut pair = Pair::start(s, &setup, "")?;
        let daemon = start_proxy(s, pair.dest_port, &profiles)?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the damaging relay")?;
        let relay_port = listener.local_addr()?.port();
        let proxy_port = daemon.listen_port;
        let relay = thread::spawn(move || damaging_relay(listener, proxy_port, damage));
        scenario::migrate(&mut pair.source, relay_port)?;
        scenario::assert_source_kept_running(&mut pair.source)?;
        let summary = expect_summary(&daemon, "failed")?;
        let reason = event_field(&summary, "reason");
        if !reason.contains(reason_has) {
            bail!("the failure reason does not say {reason_has:?}: {reason}");
        }
        let _ = pair.dest.wait_exit(scenario::LIVENESS_TIMEOUT);
        assert_destination_untouched(&mut pair.dest)?;
        let _ = relay.join();
        Ok(())
    });
}

#[test]
fn damaged_flipped_record_type_fails_closed_at_its_offset() {
    damaged_migration_fails_closed(
        "damaged_flipped_record_type",
        Damage::Flip(FIRST_RECORD),
        &format!("byte {FIRST_RECORD}"),
    );
}

#[test]
fn damaged_lost_byte_in_the_ram_phase_fails_closed() {
    damaged_migration_fails_closed("damaged_lost_byte", Damage::Drop(20_000), "byte");
}

#[test]
fn damaged_connection_cut_mid_stream_fails_closed() {
    damaged_migration_fails_closed("damaged_cut_mid_stream", Damage::Cut(100_000), "");
}
