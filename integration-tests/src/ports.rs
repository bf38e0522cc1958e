//! Free loopback ports, chosen by the kernel (bind port 0), never guessed.

use std::net::{Ipv4Addr, TcpListener};

use anyhow::{Context, Result};

/// A loopback TCP port that was free a moment ago.
///
/// The listener is closed before returning, so another process may take the port in between; the
/// kernel hands out ephemeral ports round-robin, which makes that window practically harmless for
/// tests that bind the port right away.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a loopback port")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}

/// `tcp:127.0.0.1:PORT`, the address form both QEMU and migproxy take.
pub fn tcp_uri(port: u16) -> String {
    format!("tcp:127.0.0.1:{port}")
}
