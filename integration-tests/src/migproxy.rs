//! The `migproxy` binary under test: `profile capture` and a guarded `run` daemon.
//!
//! The binary is not a dependency of this crate (Cargo only exposes `CARGO_BIN_EXE_*` to tests of
//! the same package), so it is located in the workspace target directory, after
//! `cargo build -p migproxy` (scripts/test-all.sh does that), or taken from `MIGPROXY_BIN`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::qemu::repo_root;
use crate::workdir::WorkDir;

/// The `migproxy` binary: `$MIGPROXY_BIN`, else `target/debug/migproxy`, else `target/release/migproxy`.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MIGPROXY_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("MIGPROXY_BIN={} is not a file", path.display());
        }
        return Ok(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    for profile in ["debug", "release"] {
        let path = target.join(profile).join("migproxy");
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "no migproxy binary in {}/{{debug,release}}: run `cargo build -p migproxy` first \
         (scripts/test-all.sh does) or set MIGPROXY_BIN",
        target.display()
    )
}

/// Run `migproxy ARGS` to completion with a deadline.
pub fn run_command(args: &[&str], timeout: Duration) -> Result<Output> {
    let binary = binary()?;
    let mut child = Command::new(&binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} {}", binary.display(), args.join(" ")))?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return child
                .wait_with_output()
                .context("collecting migproxy output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("migproxy {} did not finish in {timeout:?}", args.join(" "));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `migproxy profile capture --from-stream STREAM --qemu-version VERSION -o PROFILE
/// [--save-reference REFERENCE]`.
pub fn capture_profile(
    stream: &Path,
    qemu_version: &str,
    profile: &Path,
    reference: Option<&Path>,
) -> Result<()> {
    let stream_arg = stream.display().to_string();
    let profile_arg = profile.display().to_string();
    let reference_arg = reference.map(|path| path.display().to_string());
    let mut args = vec![
        "profile",
        "capture",
        "--from-stream",
        &stream_arg,
        "--qemu-version",
        qemu_version,
        "-o",
        &profile_arg,
    ];
    if let Some(reference) = &reference_arg {
        args.extend(["--save-reference", reference.as_str()]);
    }
    let out = run_command(&args, Duration::from_secs(60))?;
    if !out.status.success() {
        bail!(
            "migproxy profile capture --from-stream {stream_arg} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !profile.is_file() {
        bail!("migproxy profile capture wrote no {profile_arg}");
    }
    Ok(())
}

/// A running `migproxy run`, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log_path: PathBuf,
    pub listen_port: u16,
    command_line: String,
}

impl Daemon {
    /// `migproxy run --log-json --listen tcp:127.0.0.1:LISTEN --upstream UPSTREAM EXTRA...`.
    pub fn spawn(
        workdir: &WorkDir,
        name: &str,
        listen_port: u16,
        upstream: &str,
        extra: &[String],
    ) -> Result<Daemon> {
        let mut args = vec![
            "--listen".to_owned(),
            crate::ports::tcp_uri(listen_port),
            "--upstream".to_owned(),
            upstream.to_owned(),
        ];
        args.extend(extra.iter().cloned());
        Daemon::spawn_args(workdir, name, &args, &[listen_port])
    }

    /// `migproxy run --log-json ARGS...`; returns once every port in `listen_ports` has a
    /// listening socket (checked in /proc/net/tcp, so no probe connection is made: a probe would
    /// itself be a stray connection). JSON logs make the daemon's events parseable.
    pub fn spawn_args(
        workdir: &WorkDir,
        name: &str,
        run_args: &[String],
        listen_ports: &[u16],
    ) -> Result<Daemon> {
        Daemon::spawn_wrapped(workdir, name, &[], run_args, listen_ports)
    }

    /// [`Daemon::spawn_args`] run through `wrapper` (a command that ends by exec'ing its
    /// arguments, such as `ip netns exec NS` or `setpriv ...`), so the child's id is the daemon's
    /// own and its listening sockets are read from its network namespace.
    pub fn spawn_wrapped(
        workdir: &WorkDir,
        name: &str,
        wrapper: &[String],
        run_args: &[String],
        listen_ports: &[u16],
    ) -> Result<Daemon> {
        let binary = binary()?;
        let log_path = workdir.join(&format!("{name}.log"));
        let mut args = vec!["run".to_owned(), "--log-json".to_owned()];
        let admin_port = crate::ports::free_port()?;
        if !run_args.iter().any(|a| a == "--admin" || a == "--config") {
            // The admin address has a fixed default; a free port keeps parallel daemons apart.
            args.extend(["--admin".to_owned(), crate::ports::tcp_uri(admin_port)]);
        }
        args.extend(run_args.iter().cloned());
        let command_line = format!(
            "{}{} {}",
            wrapper.iter().map(|w| format!("{w} ")).collect::<String>(),
            binary.display(),
            args.join(" ")
        );
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let child = command
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the log file")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {command_line}"))?;
        let real_binary = std::fs::canonicalize(&binary).unwrap_or_else(|_| binary.clone());
        let mut daemon = Daemon {
            child,
            log_path,
            listen_port: listen_ports.first().copied().unwrap_or(0),
            command_line,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "{} exited at start-up ({status}): {}",
                    daemon.command_line,
                    daemon.log().trim()
                );
            }
            let pid = daemon.child.id();
            // Until the wrapper has exec'd migproxy (after `ip netns exec` switched namespaces),
            // /proc/PID/net shows the wrapper's namespace, where some other daemon may listen.
            let is_daemon = wrapper.is_empty()
                || std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe == real_binary);
            if is_daemon && listen_ports.iter().all(|p| is_listening_in(pid, *p)) {
                return Ok(daemon);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} is not listening on ports {listen_ports:?} after 20 s: {}",
                    daemon.command_line,
                    daemon.log().trim()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every JSON log event so far (lines that are not JSON are skipped).
    pub fn events(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .collect()
    }

    /// Events whose message is `message`.
    pub fn events_named(&self, message: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| event_message(e) == message)
            .collect()
    }

    /// Wait until at least `count` events named `message` were logged; returns them.
    pub fn wait_events(
        &self,
        message: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.events_named(message);
            if found.len() >= count {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                bail!(
                    "migproxy logged {} {message:?} event(s) within {timeout:?}, wanted {count}",
                    found.len()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the daemon's end-of-migration summary (`migration summary`), the only one.
    pub fn wait_summary(&self, timeout: Duration) -> Result<Value> {
        let mut all = self.wait_events(SUMMARY, 1, timeout)?;
        if all.len() > 1 {
            bail!("expected one migration, migproxy summarised {}", all.len());
        }
        all.pop().ok_or_else(|| anyhow::anyhow!("no summary"))
    }

    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Wait until the log contains `needle` (case-insensitive).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let lower = needle.to_lowercase();
        loop {
            let log = self.log();
            if log.to_lowercase().contains(&lower) {
                return Ok(log);
            }
            if Instant::now() >= deadline {
                bail!("migproxy never logged {needle:?} within {timeout:?}; log:\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `Some(status)` once the daemon has exited.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.child.try_wait().context("checking migproxy")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The message of the daemon's one-per-migration summary event.
pub const SUMMARY: &str = "migration summary";

/// `fields.message` of a tracing JSON event.
pub fn event_message(event: &Value) -> &str {
    event
        .pointer("/fields/message")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `fields.NAME` of a tracing JSON event, as text (strings unquoted).
pub fn event_field(event: &Value, name: &str) -> String {
    match event.get("fields").and_then(|f| f.get(name)) {
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// Whether some socket listens on loopback/any TCP `port` (IPv4 or IPv6), per /proc/net/tcp{,6}.
pub fn is_listening(port: u16) -> bool {
    listening_in_tables(&["/proc/net/tcp".into(), "/proc/net/tcp6".into()], port)
}

/// Whether some socket listens on TCP `port` in the network namespace of process `pid`.
pub fn is_listening_in(pid: u32, port: u16) -> bool {
    listening_in_tables(
        &[
            format!("/proc/{pid}/net/tcp"),
            format!("/proc/{pid}/net/tcp6"),
        ],
        port,
    )
}

fn listening_in_tables(tables: &[String], port: u16) -> bool {
    const TCP_LISTEN: &str = "0A";
    let wanted = format!(":{port:04X}");
    tables.iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let mut cols = line.split_whitespace();
                let local = cols.nth(1).unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                local.ends_with(&wanted) && state == TCP_LISTEN
            })
    })
}
