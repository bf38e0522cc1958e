//! A small synchronous QMP client over a unix socket or TCP (the KVM lab's inner QEMUs).
//!
//! QMP sends one JSON object per line: a greeting, then replies (`return` / `error`) and
//! asynchronous events (`event`), which this client skips except for the statuses of `MIGRATION`
//! events (with the `events` capability), which it keeps in order. Every read has a deadline, so
//! a QEMU that hangs fails the scenario instead of the test run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// How long one QMP command may take to answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `query-*` polling asks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Most `MIGRATION` event statuses one connection keeps (a migration passes a handful).
const MAX_MIGRATION_EVENTS: usize = 256;

/// The socket a QMP connection runs over.
#[derive(Debug)]
enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    fn try_clone(&self) -> std::io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(timeout),
            Socket::Tcp(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Socket::Unix(s) => s.flush(),
            Socket::Tcp(s) => s.flush(),
        }
    }
}

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<Socket>,
    writer: Socket,
    next_id: u64,
    /// The `status` of every `MIGRATION` event read so far, oldest first.
    migration_events: Vec<String>,
}

impl Qmp {
    /// Connect to an established socket and leave capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("connecting to qmp socket {}", path.display()))?;
        Qmp::handshake(Socket::Unix(stream))
    }

    /// Connect to a QMP server on TCP (`-qmp tcp:...,server=on`) and leave negotiation mode.
    pub fn connect_tcp(addr: std::net::SocketAddr) -> Result<Qmp> {
        let stream = TcpStream::connect_timeout(&addr, COMMAND_TIMEOUT)
            .with_context(|| format!("connecting to qmp at {addr}"))?;
        Qmp::handshake(Socket::Tcp(stream))
    }

    fn handshake(stream: Socket) -> Result<Qmp> {
        let writer = stream.try_clone().context("cloning the qmp socket")?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            next_id: 0,
            migration_events: Vec::new(),
        };
        let greeting = qmp.read_message(Instant::now() + COMMAND_TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            bail!("qmp: expected a greeting, got {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Run a command, returning its `return` value or its `error.desc` as an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.execute_with_timeout(command, arguments, COMMAND_TIMEOUT)
    }

    pub fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .with_context(|| format!("qmp: sending {command}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let message = self
                .read_message(deadline)
                .with_context(|| format!("qmp: waiting for the reply to {command}"))?;
            if let Some(event) = message.get("event") {
                self.note_event(event, &message);
                continue;
            }
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            let desc = message
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("(no description)");
            bail!("qmp: {command} failed: {desc}");
        }
    }

    /// Keep a `MIGRATION` event's status (the source passes `postcopy-active` only briefly, so
    /// polling `query-migrate` can miss it; the event cannot be missed).
    fn note_event(&mut self, event: &Value, message: &Value) {
        if event.as_str() != Some("MIGRATION")
            || self.migration_events.len() >= MAX_MIGRATION_EVENTS
        {
            return;
        }
        if let Some(status) = message.pointer("/data/status").and_then(Value::as_str) {
            self.migration_events.push(status.to_owned());
        }
    }

    /// The statuses of the `MIGRATION` events read so far (needs the `events` capability).
    pub fn migration_events(&self) -> &[String] {
        &self.migration_events
    }

    /// A human monitor command (QEMU's HMP), e.g. `xp /1xg 0x40100000`.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let out = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        out.as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("qmp: human-monitor-command returned {out}"))
    }

    /// `query-status` -> the run state (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub fn status(&mut self) -> Result<String> {
        let out = self.execute("query-status", json!({}))?;
        out.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("qmp: query-status returned {out}"))
    }

    /// `query-migrate` as returned (the `status` field is absent before any migration).
    pub fn query_migrate(&mut self) -> Result<Value> {
        self.execute("query-migrate", json!({}))
    }

    /// Poll `query-migrate` until its status is one of `wanted` or a terminal one
    /// (`completed`, `failed`, `cancelled`), and return that last reply.
    pub fn wait_migration(&mut self, wanted: &[&str], timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
            if wanted.contains(&status) || matches!(status, "completed" | "failed" | "cancelled") {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                bail!("migration still {status} after {timeout:?}: {info}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Poll `query-migrate` until `ready(info)` holds.
    pub fn wait_migrate_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            if ready(&info) {
                return Ok(info);
            }
            let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
            if matches!(status, "completed" | "failed" | "cancelled") {
                bail!("migration ended ({status}) before {what}: {info}");
            }
            if Instant::now() >= deadline {
                bail!("no {what} after {timeout:?}: {info}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Poll `query-status` until the run state is `wanted`.
    pub fn wait_status(&mut self, wanted: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            if status == wanted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("run state still {status} after {timeout:?}, wanted {wanted}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Set migration capabilities, e.g. `&[("return-path", true)]`.
    pub fn set_capabilities(&mut self, capabilities: &[(&str, bool)]) -> Result<()> {
        if capabilities.is_empty() {
            return Ok(());
        }
        let list: Vec<Value> = capabilities
            .iter()
            .map(|(name, state)| json!({ "capability": name, "state": state }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))?;
        Ok(())
    }

    /// Set migration parameters, e.g. `json!({"multifd-channels": 3})`.
    pub fn set_parameters(&mut self, parameters: Value) -> Result<()> {
        if parameters.as_object().is_some_and(|p| p.is_empty()) {
            return Ok(());
        }
        self.execute("migrate-set-parameters", parameters)?;
        Ok(())
    }

    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("qmp: no message before the deadline");
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .context("qmp: setting the read timeout")?;
            line.clear();
            let n = match self.reader.read_line(&mut line) {
                Ok(n) => n,
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("qmp: no message before the deadline")
                }
                Err(err) => return Err(err).context("qmp: reading"),
            };
            if n == 0 {
                bail!("qmp: connection closed (did QEMU exit?)");
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim())
                .with_context(|| format!("qmp: not json: {}", line.trim()));
        }
    }
}

/// `status` of a `query-migrate` reply, `none` when absent.
pub fn migration_status(info: &Value) -> &str {
    info.get("status").and_then(Value::as_str).unwrap_or("none")
}
