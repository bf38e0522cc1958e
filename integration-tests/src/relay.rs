//! A recording TCP relay: every connection is relayed to one upstream address and both of its
//! directions are written to files (`cN.s2d`, `cN.d2s`, N = accept order from 0).
//!
//! Upstream connections are opened synchronously in accept order, because a QEMU 7.2 destination
//! (and 10.0 with postcopy or TLS) takes the first connection as the main channel, and multifd
//! channels can connect before the main channel sends its first byte.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

#[derive(Debug)]
pub struct RecordingRelay {
    port: u16,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    copiers: Arc<Mutex<Vec<JoinHandle<std::io::Result<u64>>>>>,
    accepted: Arc<Mutex<usize>>,
    dir: PathBuf,
}

impl RecordingRelay {
    /// Listen on a free loopback port and relay to `upstream`, recording into `dir`.
    pub fn start(upstream: SocketAddr, dir: &Path) -> Result<RecordingRelay> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("relay: binding")?;
        let port = listener
            .local_addr()
            .context("relay: local address")?
            .port();
        listener
            .set_nonblocking(true)
            .context("relay: nonblocking listener")?;
        let stop = Arc::new(AtomicBool::new(false));
        let copiers = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(0usize));
        let acceptor = {
            let stop = Arc::clone(&stop);
            let copiers = Arc::clone(&copiers);
            let accepted = Arc::clone(&accepted);
            let dir = dir.to_path_buf();
            thread::spawn(move || {
                accept_loop(&listener, upstream, &dir, &stop, &copiers, &accepted);
            })
        };
        Ok(RecordingRelay {
            port,
            stop,
            acceptor: Some(acceptor),
            copiers,
            accepted,
            dir: dir.to_path_buf(),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The file holding direction `dir` (`s2d` or `d2s`) of connection `n`.
    pub fn recording(&self, n: usize, direction: &str) -> PathBuf {
        self.dir.join(format!("c{n}.{direction}"))
    }

    pub fn accepted(&self) -> usize {
        self.accepted.lock().map(|n| *n).unwrap_or(0)
    }

    /// Stop accepting and wait until every relayed connection has closed in both directions.
    pub fn finish(mut self, timeout: Duration) -> Result<usize> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            acceptor
                .join()
                .map_err(|_| anyhow!("relay: acceptor panicked"))?;
        }
        let deadline = Instant::now() + timeout;
        let handles: Vec<_> = match self.copiers.lock() {
            Ok(mut guard) => guard.drain(..).collect(),
            Err(_) => bail!("relay: copier list poisoned"),
        };
        for handle in handles {
            while !handle.is_finished() {
                if Instant::now() >= deadline {
                    bail!("relay: connections still open after {timeout:?}");
                }
                thread::sleep(Duration::from_millis(20));
            }
            handle
                .join()
                .map_err(|_| anyhow!("relay: copier panicked"))?
                .context("relay: copying")?;
        }
        Ok(self.accepted())
    }
}

impl Drop for RecordingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: &TcpListener,
    upstream: SocketAddr,
    dir: &Path,
    stop: &AtomicBool,
    copiers: &Mutex<Vec<JoinHandle<std::io::Result<u64>>>>,
    accepted: &Mutex<usize>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let n = match accepted.lock() {
                    Ok(mut count) => {
                        *count += 1;
                        *count - 1
                    }
                    Err(_) => return,
                };
                if let Ok(handles) = relay_one(client, upstream, dir, n) {
                    if let Ok(mut list) = copiers.lock() {
                        list.extend(handles);
                    }
                }
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
}

fn relay_one(
    client: TcpStream,
    upstream: SocketAddr,
    dir: &Path,
    n: usize,
) -> std::io::Result<[JoinHandle<std::io::Result<u64>>; 2]> {
    client.set_nonblocking(false)?;
    // Connect before accepting the next connection: keeps destination order = source order.
    let server = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let s2d_file = File::create(dir.join(format!("c{n}.s2d")))?;
    let d2s_file = File::create(dir.join(format!("c{n}.d2s")))?;
    let forward = spawn_copy(client.try_clone()?, server.try_clone()?, s2d_file);
    let backward = spawn_copy(server, client, d2s_file);
    Ok([forward, backward])
}

fn spawn_copy(
    mut from: TcpStream,
    to: TcpStream,
    mut record: File,
) -> JoinHandle<std::io::Result<u64>> {
    thread::spawn(move || {
        let mut to = to;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                // A reset from one side ends the relay of that direction like an EOF would.
                Err(err) if err.kind() == ErrorKind::ConnectionReset => break,
                Err(err) => return Err(err),
            };
            let chunk = buf.get(..n).unwrap_or_default();
            record.write_all(chunk)?;
            if to.write_all(chunk).is_err() {
                break;
            }
            total += n as u64;
        }
        // EOF is propagated per direction: the source still reads the return path after its last byte.
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
        record.flush()?;
        Ok(total)
    })
}
