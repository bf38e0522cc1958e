//! Test helpers: the real `migproxy` binary as a child process (JSON logs parsed from stderr), a
//! destination made of a plain TCP listener, and the codec's test vectors.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The path of one of the codec's test vectors (real QEMU captures).
pub fn vector_path(name: &str) -> String {
    format!(
        "{}/../codec/tests/vectors/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

pub fn vector(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../codec/tests/vectors")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The migproxy binary under test: this build's, or `MIGPROXY_TEST_BINARY` (to replay a test
/// against another build, e.g. the one before a fix).
pub fn binary() -> String {
    std::env::var("MIGPROXY_TEST_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_migproxy").to_owned())
}

/// Poll `check` until it returns Some, or fail after `deadline`.
pub fn wait_until<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A running `migproxy run`, killed on drop.
pub struct Daemon {
    child: Child,
    logs: Arc<(Mutex<Vec<Value>>, Condvar)>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl Daemon {
    /// A daemon forwarding to `destination`: `--upstream DESTINATION ARGS...`.
    pub fn to(destination: &Destination, args: &[&str]) -> Daemon {
        let upstream = destination.upstream();
        let mut all = vec!["--upstream", upstream.as_str()];
        all.extend_from_slice(args);
        Daemon::start(&all)
    }

    /// `migproxy run --listen tcp:127.0.0.1:0 --admin tcp:127.0.0.1:0 --log-json ARGS...`
    pub fn start(args: &[&str]) -> Daemon {
        let mut all = vec!["--listen", "tcp:127.0.0.1:0", "--admin", "tcp:127.0.0.1:0"];
        all.extend_from_slice(args);
        Daemon::start_raw(&all)
    }

    /// `migproxy run --log-json ARGS...`: ARGS must configure a tcp listener and a tcp admin address.
    pub fn start_raw(args: &[&str]) -> Daemon {
        let mut child = Command::new(binary())
            .arg("run")
            .arg("--log-json")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning migproxy");
        let stderr = child.stderr.take().expect("stderr piped");
        let logs: Arc<(Mutex<Vec<Value>>, Condvar)> = Arc::default();
        let sink = Arc::clone(&logs);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("daemon: {line}");
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                let (lock, cond) = &*sink;
                lock.lock().expect("log lock").push(value);
                cond.notify_all();
            }
        });
        let mut daemon = Daemon {
            child,
            logs,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let listening = daemon.wait_event("listening", Duration::from_secs(20), |event| {
            event["fields"]["listen"]
                .as_str()
                .is_some_and(|l| l.starts_with("tcp:"))
        });
        daemon.listen = tcp_field(&listening, "listen");
        let admin = daemon.wait_log("admin listening", Duration::from_secs(20));
        daemon.admin = tcp_field(&admin, "admin");
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first log event whose message is `message`.
    pub fn wait_log(&self, message: &str, deadline: Duration) -> Value {
        self.wait_event(message, deadline, |_| true)
    }

    pub fn wait_event(
        &self,
        message: &str,
        deadline: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> Value {
        let (lock, cond) = &*self.logs;
        let start = Instant::now();
        let mut logs = lock.lock().expect("log lock");
        loop {
            if let Some(found) = logs
                .iter()
                .find(|v| v["fields"]["message"] == message && accept(v))
            {
                return found.clone();
            }
            let left = deadline.checked_sub(start.elapsed()).unwrap_or_else(|| {
                panic!("no {message:?} log within {deadline:?}; logs: {logs:#?}")
            });
            logs = cond.wait_timeout(logs, left).expect("log lock").0;
        }
    }

    /// Every log event so far.
    pub fn events(&self) -> Vec<Value> {
        self.logs.0.lock().expect("log lock").clone()
    }

    /// How many log events named `message` the daemon has written so far.
    pub fn count_logs(&self, message: &str) -> usize {
        let logs = self.logs.0.lock().expect("log lock");
        logs.iter()
            .filter(|v| v["fields"]["message"] == message)
            .count()
    }

    /// How many log lines the daemon has written so far.
    pub fn log_count(&self) -> usize {
        self.logs.0.lock().expect("log lock").len()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        wait_until("daemon exit", deadline, || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// Peak resident memory of the daemon, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// `migproxy_turned_away_total{reason="REASON"}`.
    pub fn turned_away(&self, reason: &str) -> Option<u64> {
        self.metric(&format!(
            "migproxy_turned_away_total{{reason=\"{reason}\"}}"
        ))
    }

    pub fn metric(&self, sample: &str) -> Option<u64> {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tcp_field(event: &Value, field: &str) -> SocketAddr {
    let text = event["fields"][field].as_str().unwrap_or_default();
    text.strip_prefix("tcp:")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{field} is not a tcp address: {event}"))
}

/// A minimal HTTP/1.0 GET.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect admin");
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("write request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The flags of a rewriting daemon: the destination's profile, the source's profile and the
/// source's reference description (a saved stream of its configuration, or `--save-reference`
/// JSON).
pub fn rewriting_args<'a>(
    dest_profile: &'a str,
    source_profile: &'a str,
    source_reference: &'a str,
) -> Vec<&'a str> {
    vec![
        "--dest-profile",
        dest_profile,
        "--source-profile",
        source_profile,
        "--source-reference",
        source_reference,
    ]
}

/// The return path's last message, as a destination QEMU sends it: `SHUT status`.
pub fn shut(status: u8) -> Vec<u8> {
    vec![0, 1, 0, 4, 0, 0, 0, status]
}

/// What the fake destination does with one accepted connection.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Read to EOF, then write `reply` (a return path) and close.
    ReadAll { reply: Vec<u8> },
    /// Read this many bytes, then close without a shutdown, the rest unread (a destination QEMU
    /// that died: its kernel resets the connection).
    DieAfter(usize),
    /// Read to EOF, write `reply`, then reset the connection (SO_LINGER 0): the end of a
    /// destination QEMU that exits with part of the stream unread.
    ReadAllThenReset { reply: Vec<u8> },
    /// Wait for `gate` before reading anything, then read to EOF.
    Gated(Arc<(Mutex<bool>, Condvar)>),
    /// Read `read` bytes and stop reading; once `gate` opens, write `reply` (a failed load's
    /// `SHUT 1`) and reset the connection with the rest of the stream unread: a destination QEMU
    /// whose load failed mid-stream, which says so on its return path and exits.
    FailLoadAfter {
        read: usize,
        reply: Vec<u8>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    },
}

/// Block until `gate` is opened.
pub fn wait_gate(gate: &(Mutex<bool>, Condvar)) {
    let (lock, cond) = gate;
    let mut open = lock.lock().expect("gate");
    while !*open {
        open = cond.wait(open).expect("gate");
    }
}

/// Open `gate` for whoever waits on it.
pub fn open_gate(gate: &(Mutex<bool>, Condvar)) {
    *gate.0.lock().expect("gate") = true;
    gate.1.notify_all();
}

/// A destination: accepts connections and records what each received.
pub struct Destination {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
}

impl Destination {
    /// A destination that reads everything and answers nothing.
    pub fn reading() -> Destination {
        Destination::start(vec![Behaviour::ReadAll { reply: Vec::new() }])
    }

    /// A destination QEMU with a return path whose load worked: its main channel (the first
    /// connection) reads everything and answers `SHUT 0`; later connections just read.
    pub fn loading() -> Destination {
        Destination::start(vec![
            Behaviour::ReadAll { reply: shut(0) },
            Behaviour::ReadAll { reply: Vec::new() },
        ])
    }

    /// Connections get `behaviours` in order; later ones get the last.
    pub fn start(behaviours: Vec<Behaviour>) -> Destination {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind destination");
        let addr = listener.local_addr().expect("destination address");
        let received: Arc<Mutex<Vec<Option<Vec<u8>>>>> = Arc::default();
        let record = Arc::clone(&received);
        thread::spawn(move || {
            for (index, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { break };
                let behaviour = behaviours
                    .get(index)
                    .or(behaviours.last())
                    .cloned()
                    .unwrap_or(Behaviour::ReadAll { reply: Vec::new() });
                record.lock().expect("lock").push(None);
                let record = Arc::clone(&record);
                thread::spawn(move || {
                    let mut data = Vec::new();
                    match behaviour {
                        Behaviour::ReadAll { reply } => {
                            let _ = conn.read_to_end(&mut data);
                            let _ = conn.write_all(&reply);
                        }
                        Behaviour::ReadAllThenReset { reply } => {
                            let _ = conn.read_to_end(&mut data);
                            let _ = conn.write_all(&reply);
                            // Let the reply reach the proxy before the reset discards it.
                            thread::sleep(Duration::from_millis(200));
                            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                            if let Some(slot) = record.lock().expect("lock").get_mut(index) {
                                *slot = Some(data);
                            }
                            // Dropped without a shutdown: the close sends a reset.
                            return;
                        }
                        Behaviour::DieAfter(n) => {
                            data.resize(n, 0);
                            let got = conn.read(&mut data).unwrap_or(0);
                            let mut total = got;
                            while total < n {
                                match conn.read(&mut data[total..]) {
                                    Ok(0) | Err(_) => break,
                                    Ok(k) => total += k,
                                }
                            }
                            data.truncate(total);
                            if let Some(slot) = record.lock().expect("lock").get_mut(index) {
                                *slot = Some(data);
                            }
                            // Dropped without a shutdown, like the socket of a process that exits.
                            return;
                        }
                        Behaviour::Gated(gate) => {
                            wait_gate(&gate);
                            let _ = conn.read_to_end(&mut data);
                        }
                        Behaviour::FailLoadAfter { read, reply, gate } => {
                            data.resize(read, 0);
                            let _ = conn.read_exact(&mut data);
                            wait_gate(&gate);
                            let _ = conn.write_all(&reply);
                            // Let the reply reach the proxy's socket before the reset.
                            thread::sleep(Duration::from_millis(100));
                            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                            drop(conn);
                            if let Some(slot) = record.lock().expect("lock").get_mut(index) {
                                *slot = Some(data);
                            }
                            return;
                        }
                    }
                    let _ = conn.shutdown(Shutdown::Both);
                    if let Some(slot) = record.lock().expect("lock").get_mut(index) {
                        *slot = Some(data);
                    }
                });
            }
        });
        Destination { addr, received }
    }

    pub fn upstream(&self) -> String {
        format!("tcp:{}", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    /// What connection `index` received, once it has finished.
    pub fn wait_received(&self, index: usize, deadline: Duration) -> Vec<u8> {
        wait_until("destination connection to finish", deadline, || {
            self.received
                .lock()
                .expect("lock")
                .get(index)
                .cloned()
                .flatten()
        })
    }
}

/// Connect as a source.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to migproxy");
    stream.set_read_timeout(Some(Duration::from_secs(20))).ok();
    stream
}

/// Read until the proxy closes this connection; returns what arrived.
pub fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return data,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("connection not closed by the proxy within the read timeout")
            }
            Err(_) => return data, // reset: closed as well
        }
    }
}

/// The offset of the description record (QEMU_VM_VMDESCRIPTION, 0x06 + be32 length + JSON) that
/// ends a precopy stream.
pub fn description_offset(stream: &[u8]) -> usize {
    (0..stream.len().saturating_sub(5))
        .rev()
        .find(|&pos| {
            stream[pos] == 0x06
                && u32::from_be_bytes([
                    stream[pos + 1],
                    stream[pos + 2],
                    stream[pos + 3],
                    stream[pos + 4],
                ]) as usize
                    == stream.len() - pos - 5
                && stream.get(pos + 5) == Some(&b'{')
        })
        .expect("stream ends with a description")
}

/// Wait for the migration summary: its outcome must be `outcome` and its reason mention
/// `reason_has`.
pub fn assert_summary(daemon: &Daemon, outcome: &str, reason_has: &str) {
    let summary = daemon.wait_log("migration summary", Duration::from_secs(20));
    assert_eq!(summary["fields"]["outcome"], outcome, "{summary}");
    let reason = summary["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(reason_has), "{reason}");
}

/// Push a whole stream as a source, half-close, and return what came back on the return path.
pub fn migrate(daemon: &Daemon, stream: &[u8]) -> Vec<u8> {
    let mut source = connect(daemon.listen);
    source.write_all(stream).expect("source write");
    source.shutdown(Shutdown::Write).expect("half-close");
    read_until_closed(&mut source)
}

/// The same for a migration the daemon may end early (a refusal closes the source): a failed
/// write is part of the outcome.
pub fn migrate_refusable(daemon: &Daemon, stream: &[u8]) -> Vec<u8> {
    let mut source = connect(daemon.listen);
    let _ = source.write_all(stream);
    let _ = source.shutdown(Shutdown::Write);
    read_until_closed(&mut source)
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("migproxy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `migproxy profile capture --from-stream STREAM [EXTRA...] -o PROFILE`.
pub fn capture_profile(stream: &str, extra: &[&str], profile: &str) {
    let mut args = vec!["profile", "capture", "--from-stream", stream];
    args.extend_from_slice(extra);
    args.extend(["-o", profile]);
    migproxy(&args);
}

/// `capture_profile` of the test vector `vector` into `dir` as `name`; returns its path.
pub fn vector_profile(dir: &TempDir, vector: &str, extra: &[&str], name: &str) -> String {
    let profile = dir.file(name);
    capture_profile(&vector_path(vector), extra, &profile);
    profile
}

/// Run the migproxy binary to completion; panics unless it exits 0.
pub fn migproxy(args: &[&str]) {
    let output = Command::new(binary())
        .args(args)
        .output()
        .expect("running migproxy");
    assert!(
        output.status.success(),
        "migproxy {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `stream` with `pages` extra RAM pages inserted as `ram` PART sections before its first PART:
/// a large, valid stream made from a real one.
pub fn with_extra_pages(stream: &[u8], pages: usize) -> Vec<u8> {
    use migproxy_codec::{offline, DecodeError, Frame, Limits, RecordKind, StreamDecoder};
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut offset = 0usize;
    let mut ram_id = None;
    let mut insert_at = None;
    offline::decode_reader(
        stream,
        &mut decoder,
        |_, frame| -> Result<(), DecodeError> {
            if let Frame::Verbatim {
                kind, section_id, ..
            } = &frame
            {
                match kind {
                    RecordKind::SectionStart { idstr, .. } if idstr == "ram" => {
                        ram_id = *section_id
                    }
                    RecordKind::SectionPart if insert_at.is_none() && *section_id == ram_id => {
                        insert_at = Some(offset)
                    }
                    _ => {}
                }
            }
            offset += frame.wire_len();
            Ok(())
        },
    )
    .expect("decoding the vector");
    let (ram_id, insert_at) = (ram_id.expect("ram section"), insert_at.expect("a ram part"));
    const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
    const RAM_SAVE_FLAG_EOS: u64 = 0x10;
    const QEMU_VM_SECTION_PART: u8 = 0x02;
    const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;
    let block = b"mach-virt.ram";
    let mut extra = Vec::with_capacity(pages * 4200);
    for chunk in 0..pages.div_ceil(256) {
        extra.push(QEMU_VM_SECTION_PART);
        extra.extend_from_slice(&ram_id.to_be_bytes());
        for page in 0..256.min(pages - chunk * 256) {
            let index = ((chunk * 256 + page) % 2048) as u64;
            extra.extend_from_slice(&((index * 4096) | RAM_SAVE_FLAG_PAGE).to_be_bytes());
            extra.push(block.len() as u8);
            extra.extend_from_slice(block);
            extra.extend(std::iter::repeat_n((page % 251) as u8, 4096));
        }
        extra.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        extra.push(QEMU_VM_SECTION_FOOTER);
        extra.extend_from_slice(&ram_id.to_be_bytes());
    }
    let mut out = Vec::with_capacity(stream.len() + extra.len());
    out.extend_from_slice(&stream[..insert_at]);
    out.extend_from_slice(&extra);
    out.extend_from_slice(&stream[insert_at..]);
    out
}

/// A stream of `vcpus` vCPUs, each with vCPU 0's registers of the real capture `stream`
/// (edited by `change` per vCPU), on the capture's machine type: a many-vCPU stream whose
/// registers a real QEMU sent.
pub fn repeated_vcpu(
    stream: &[u8],
    vcpus: u32,
    change: impl Fn(u32, &mut Vec<(u64, u64)>),
) -> Vec<u8> {
    use migproxy_codec::testing::{RamRecord, StreamBuilder};
    use migproxy_codec::{offline, DecodeError, Frame, Limits, StreamDecoder};
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut registers = None;
    offline::decode_reader(
        stream,
        &mut decoder,
        |_, frame| -> Result<(), DecodeError> {
            if let Frame::DeviceState(state) = frame {
                registers = state.cpus().into_iter().next().map(|cpu| cpu.registers);
            }
            Ok(())
        },
    )
    .expect("decoding the vector");
    let registers = registers.expect("a vCPU in the vector");
    let machine = decoder.info().machine.clone().expect("a machine type");
    let mut builder = StreamBuilder::new(&machine);
    builder.ram_start(1 << 20);
    builder.ram_section(true, &[RamRecord::Zero]);
    for vcpu in 0..vcpus {
        let mut own = registers.clone();
        change(vcpu, &mut own);
        builder.cpu(vcpu, &own, 0x11);
    }
    builder.finish()
}
