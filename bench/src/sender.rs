//! The source stand-in: replays a captured stream file into a TCP connection.
//!
//! `std::io::copy` from a `File` (or `Take<File>`) into a `TcpStream` uses `sendfile(2)`
//! on Linux, so the sender costs little CPU and does not compete with the relay for
//! memory bandwidth more than QEMU would.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Longest a single write may block.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(120);

fn connect_bound(source: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    if source == Ipv4Addr::LOCALHOST {
        return TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    }
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    Ok(socket.into())
}

/// One source connection.
pub struct Sender {
    stream: TcpStream,
    file: File,
    write_closed: bool,
}

impl Sender {
    pub fn connect(port: u16, path: &Path) -> Result<Sender, String> {
        Self::connect_from(Ipv4Addr::LOCALHOST, port, path)
    }

    /// Connects from `source` (any address of 127.0.0.0/8 is loopback): concurrent
    /// migrations through migproxy must come from different source hosts, as they do in
    /// production, because it refuses a second migration from one host to one destination.
    pub fn connect_from(source: Ipv4Addr, port: u16, path: &Path) -> Result<Sender, String> {
        let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
        let stream = connect_bound(source, port)
            .map_err(|e| format!("connect {source} -> 127.0.0.1:{port}: {e}"))?;
        // A relay that stops reading must fail the run, not hang the benchmark.
        stream
            .set_write_timeout(Some(WRITE_STALL_TIMEOUT))
            .map_err(|e| format!("set write timeout: {e}"))?;
        Ok(Sender {
            stream,
            file,
            write_closed: false,
        })
    }

    /// Sends `len` bytes of the file starting at `offset`.
    pub fn send_range(&mut self, offset: u64, len: u64) -> Result<(), String> {
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| format!("seek stream file: {e}"))?;
        let mut part = (&self.file).take(len);
        let sent = std::io::copy(&mut part, &mut self.stream).map_err(|e| format!("send: {e}"))?;
        if sent != len {
            return Err(format!("sent {sent} of {len} bytes (stream file shorter?)"));
        }
        Ok(())
    }

    /// Writes bytes already in memory (the device-state tail, for exact timing).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("send: {e}"))
    }

    /// Half-closes like QEMU at the end of a migration, then waits for the peer to close
    /// (reading and discarding anything it sends back).
    pub fn finish(mut self, timeout: Duration) -> Result<(), String> {
        self.shutdown_write()?;
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("set read timeout: {e}"))?;
        let mut sink = [0u8; 4096];
        let mut stream = self.stream;
        loop {
            match stream.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The relay may reset instead of closing after the destination went away.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(format!("waiting for the relay to close: {e}")),
            }
        }
    }

    /// Half-close only (for the tail timing: the close is part of the stream's end).
    pub fn shutdown_write(&mut self) -> Result<(), String> {
        if !self.write_closed {
            self.stream
                .shutdown(Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            self.write_closed = true;
        }
        Ok(())
    }
}
