//! The destination stand-in: accepts connections, reads and discards everything, and
//! closes its side after the peer's EOF, the way a destination QEMU ends a migration
//! without a return path. It records bytes and the instant of the last byte.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::BenchError;

/// Reads of this size, like the relays' buffers.
const READ_BUFFER: usize = 1024 * 1024;

/// One accepted connection, shared between its reader thread and the driver.
#[derive(Debug)]
pub struct Connection {
    base: Instant,
    bytes: AtomicU64,
    /// Nanoseconds after `base` at which the last read returned data (0: none yet).
    last_byte_ns: AtomicU64,
    finished: Mutex<Option<Result<(), String>>>,
    finished_changed: Condvar,
}

impl Connection {
    fn new(base: Instant) -> Self {
        Connection {
            base,
            bytes: AtomicU64::new(0),
            last_byte_ns: AtomicU64::new(0),
            finished: Mutex::new(None),
            finished_changed: Condvar::new(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    pub fn last_byte(&self) -> Option<Instant> {
        match self.last_byte_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    /// Polls until at least `want` bytes have arrived. Used to drain the RAM part before
    /// timing the tail; the poll interval does not enter any measurement.
    pub fn wait_bytes(&self, want: u64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while self.bytes() < want {
            if self.is_finished() || Instant::now() > deadline {
                return Err(format!(
                    "destination got {} of {want} bytes before {}",
                    self.bytes(),
                    if self.is_finished() {
                        "eof"
                    } else {
                        "the deadline"
                    }
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    fn is_finished(&self) -> bool {
        self.finished.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    /// Waits for the peer's EOF (or a read error) and returns the last-byte instant.
    pub fn wait_finished(&self, timeout: Duration) -> Result<Option<Instant>, String> {
        let deadline = Instant::now() + timeout;
        let mut guard = self
            .finished
            .lock()
            .map_err(|_| "receiver thread panicked".to_string())?;
        loop {
            if let Some(outcome) = guard.as_ref() {
                return outcome.clone().map(|()| self.last_byte());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no eof from the relay after {timeout:?} ({} bytes received)",
                    self.bytes()
                ));
            }
            guard = self
                .finished_changed
                .wait_timeout(guard, deadline - now)
                .map_err(|_| "receiver thread panicked".to_string())?
                .0;
        }
    }

    fn finish(&self, outcome: Result<(), String>) {
        if let Ok(mut guard) = self.finished.lock() {
            *guard = Some(outcome);
        }
        self.finished_changed.notify_all();
    }

    fn read_all(&self, mut stream: TcpStream) {
        let mut buffer = vec![0u8; READ_BUFFER];
        let outcome = loop {
            match stream.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    let at = u64::try_from(self.base.elapsed().as_nanos())
                        .unwrap_or(u64::MAX)
                        .max(1);
                    self.bytes.fetch_add(n as u64, Ordering::AcqRel);
                    self.last_byte_ns.store(at, Ordering::Release);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(format!("destination read: {e}")),
            }
        };
        // Close our side only now, like a destination that has loaded everything.
        drop(stream);
        self.finish(outcome);
    }
}

/// The listening destination. Connections are handed to the driver in accept order.
pub struct Receiver {
    port: u16,
    accepted: mpsc::Receiver<Arc<Connection>>,
}

impl Receiver {
    pub fn start() -> Result<Receiver, BenchError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("bind receiver"))?;
        let port = listener
            .local_addr()
            .map_err(BenchError::io("receiver address"))?
            .port();
        let (tx, rx) = mpsc::channel();
        let base = Instant::now();
        std::thread::Builder::new()
            .name("receiver-accept".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let connection = Arc::new(Connection::new(base));
                    let reader = Arc::clone(&connection);
                    let spawned = std::thread::Builder::new()
                        .name("receiver-read".into())
                        .spawn(move || reader.read_all(stream));
                    if spawned.is_err() || tx.send(connection).is_err() {
                        break;
                    }
                }
            })
            .map_err(BenchError::io("spawn receiver"))?;
        Ok(Receiver { port, accepted: rx })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next connection the relay (or the sender, directly) opened.
    pub fn next_connection(&self, timeout: Duration) -> Result<Arc<Connection>, String> {
        self.accepted
            .recv_timeout(timeout)
            .map_err(|_| format!("no connection reached the destination within {timeout:?}"))
    }

    /// Connections nobody asked for (left over from a failed run); returns how many.
    pub fn discard_stray(&self) -> usize {
        self.accepted.try_iter().count()
    }
}
