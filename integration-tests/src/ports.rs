//! Free loopback ports, chosen by the kernel (bind port 0), never guessed.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context, Result};

/// Every port this test process has handed out. The kernel picks a port for bind(0) at a random
/// place in the ephemeral range and may pick the same one again as soon as the probing listener is
/// closed, so two calls in a row (a daemon's listen port, then its admin port) could otherwise get
/// the same number and the second bind would fail with "Address already in use".
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// How many kernel picks to try before giving up (each collision with an earlier port is one).
const PICKS: usize = 64;

/// A loopback TCP port that was free a moment ago and that no earlier call in this process
/// returned.
///
/// The listener is closed before returning, so another process may take the port in between;
/// tests bind it right away, which keeps that window small.
pub fn free_port() -> Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..PICKS {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a loopback port")?;
        let port = listener
            .local_addr()
            .context("reading the bound port")?
            .port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!("the kernel offered {PICKS} loopback ports in a row that this test process had already handed out")
}

/// `tcp:127.0.0.1:PORT`, the address form both QEMU and migproxy take.
pub fn tcp_uri(port: u16) -> String {
    format!("tcp:127.0.0.1:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_handed_out_are_never_repeated() -> Result<()> {
        let mut seen = HashSet::new();
        for _ in 0..500 {
            let port = free_port()?;
            assert!(seen.insert(port), "port {port} handed out twice");
        }
        Ok(())
    }
}
