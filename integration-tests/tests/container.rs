//! The container image, end to end, as deploy/README.md runs it: QEMU 10.0 -> 7.2
//! (`-M virt-7.2 -cpu a64fx -smp 2`, running guest) through `migproxy run` inside the image.
//!
//! - The register profiles are captured by the image itself (`profile capture --from-stream -`
//!   reading a fresh source stream on stdin, which also saves the source reference description
//!   with `--save-reference`; `--from-qmp` for the destination), as an operator does on each new
//!   host kernel.
//! - A "destination host" container serves the destination profile on its admin address
//!   (`--serve-profile`); the proxy container fetches it from there (`--dest-profile http://...`)
//!   and gets the source profile and the source reference as mounted files.
//! - Both run as the image's default user with host networking and podman's workarounds for this
//!   machine kind (`--runtime runc`, explicit ulimits); the image's own HEALTHCHECK is answered,
//!   the migration completes with both vCPUs rewritten, the destination keeps running the guest,
//!   and `podman stop` drains the proxy with exit code 0.
//! - Transparent mode: the source migrates to the destination's own address and port; an nftables
//!   `redirect` rule (the guide's ruleset) hands the connection to the proxy container, which
//!   forwards to the original destination (`--upstream original-dst`, SO_ORIGINAL_DST).
//!
//! The image comes from `$MIGPROXY_IMAGE` if it exists, else `scripts/container-smoke.sh
//! --build-only` builds it (offline, cached: fast when nothing changed). Needs root (podman,
//! nftables) like the rest of CI.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use migproxy_integration_tests::flows::{Pair, Setup};
use migproxy_integration_tests::migproxy::{event_field, event_message, is_listening, SUMMARY};
use migproxy_integration_tests::qemu::Version::{self, V10, V72};
use migproxy_integration_tests::qemu::{repo_root, Vm};
use migproxy_integration_tests::scenario::{self, a64fx, Scenario, LIVENESS_TIMEOUT};
use migproxy_integration_tests::{guest, ports, MIGRATION_TIMEOUT};

/// The user the image runs as (Dockerfile `USER`); the nftables rule exempts its own connections.
const IMAGE_UID: u32 = 65532;
/// Building the image from nothing (base images, toolchain import, release build) on 2 cores.
const IMAGE_BUILD_TIMEOUT: Duration = Duration::from_secs(25 * 60);
/// One podman command (run -d, exec, inspect, healthcheck run).
const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the container may take to listen and answer its health check.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// `podman stop -t`: longer than the proxy's drain timeout, so a drained exit is not a kill.
const STOP_TIMEOUT_SECS: u32 = 60;
/// The name under which the destination container serves its profile (deploy/README.md).
const PROFILE_NAME: &str = "a64fx-virt-7.2";

/// Tells apart the containers, tables and files of tests running in parallel in one process.
fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[test]
fn container_a64fx_10_to_72() {
    scenario::run("container_a64fx_10_to_72", |s| {
        through_container(s, Mode::Explicit)
    });
}

#[test]
fn container_a64fx_10_to_72_nftables_redirect() {
    scenario::run("container_a64fx_10_to_72_redirect", |s| {
        through_container(s, Mode::Redirect)
    });
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The source migrates to the proxy's address (libvirt `--migrateuri`).
    Explicit,
    /// The source migrates to the destination; nftables redirects it to the proxy.
    Redirect,
}

fn through_container(s: &mut Scenario, mode: Mode) -> Result<()> {
    let image = image(s)?;
    let (source_cfg, dest_cfg) = (a64fx(V10), a64fx(V72));

    // Profiles, captured by the image from fresh streams (what an operator runs per host kernel).
    let profiles = s.dir.join("profiles");
    std::fs::create_dir_all(&profiles).context("creating the profile directory")?;
    capture_profile_from_stream(s, &image, &profiles, "source.json", V10)?;
    capture_profile_from_qmp(s, &image, &profiles.join("dest.json"), V72)?;
    let profiles_mount = format!("{}:/profiles:ro", profiles.display());

    let setup = Setup::new(source_cfg, dest_cfg);
    let mut pair = Pair::start(s, &setup, "")?;

    // The destination host's daemon: serves its profile on its admin address.
    let dest_admin = ports::free_port()?;
    let dest_listen = ports::free_port()?;
    let dest_daemon = Container::run(
        s,
        &image,
        "dest",
        &[
            "-v".into(),
            profiles_mount.clone(),
            "-e".into(),
            format!("MIGPROXY_HEALTHCHECK_URL=http://127.0.0.1:{dest_admin}/healthz"),
        ],
        &[
            "run".into(),
            "--listen".into(),
            ports::tcp_uri(dest_listen),
            "--upstream".into(),
            ports::tcp_uri(pair.dest_port),
            "--admin".into(),
            ports::tcp_uri(dest_admin),
            "--serve-profile".into(),
            format!("{PROFILE_NAME}=/profiles/dest.json"),
        ],
    )?;
    dest_daemon.wait_healthy(dest_listen)?;

    // The proxy the migration goes through, configured through the environment like the guide.
    let listen = ports::free_port()?;
    let admin = ports::free_port()?;
    let upstream = match mode {
        Mode::Explicit => ports::tcp_uri(pair.dest_port),
        Mode::Redirect => "original-dst".to_owned(),
    };
    let proxy = Container::run(
        s,
        &image,
        "proxy",
        &[
            "-v".into(),
            profiles_mount,
            "-e".into(),
            format!("MIGPROXY_UPSTREAM={upstream}"),
            "-e".into(),
            format!("MIGPROXY_DEST_PROFILE=http://127.0.0.1:{dest_admin}/profiles/{PROFILE_NAME}"),
            "-e".into(),
            "MIGPROXY_SOURCE_PROFILE=/profiles/source.json".into(),
            "-e".into(),
            "MIGPROXY_SOURCE_REFERENCE=/profiles/source-reference.json".into(),
            "-e".into(),
            format!("MIGPROXY_HEALTHCHECK_URL=http://127.0.0.1:{admin}/healthz"),
        ],
        &[
            "run".into(),
            "--log-json".into(),
            "--listen".into(),
            ports::tcp_uri(listen),
            "--admin".into(),
            ports::tcp_uri(admin),
        ],
    )?;
    proxy.wait_healthy(listen)?;
    proxy.exec_ok(&[
        "/migproxy",
        "healthcheck",
        "--url",
        &format!("http://127.0.0.1:{admin}/readyz"),
    ])?;

    let _redirect;
    let target = match mode {
        Mode::Explicit => listen,
        Mode::Redirect => {
            _redirect = NftRedirect::install(s, pair.dest_port, listen)?;
            pair.dest_port
        }
    };
    scenario::migrate(&mut pair.source, target)?;
    scenario::assert_migrated(&mut pair.source, &mut pair.dest)?;

    let summary = proxy.wait_summary()?;
    eprintln!(
        "  migproxy (container): outcome={} channels={} cpus_rewritten={} dropped=[{}] filled=[{}]",
        event_field(&summary, "outcome"),
        event_field(&summary, "channels"),
        event_field(&summary, "cpus_rewritten"),
        event_field(&summary, "dropped"),
        event_field(&summary, "filled"),
    );
    if event_field(&summary, "outcome") != "completed" {
        bail!("migproxy in the container summarised {summary}");
    }
    let smp = setup.source.smp.to_string();
    if event_field(&summary, "cpus_rewritten") != smp {
        bail!(
            "migproxy rewrote {} vCPU(s), expected {smp}",
            event_field(&summary, "cpus_rewritten")
        );
    }
    if !proxy.logs()?.contains("destination profile fetched") {
        bail!("the proxy never fetched the destination profile from the destination daemon");
    }

    proxy.stop_drained()?;
    dest_daemon.stop_drained()?;
    // The guest lives on without any proxy.
    let counter = guest::assert_running(&mut pair.dest, LIVENESS_TIMEOUT)?;
    eprintln!("  containers stopped with exit 0; destination guest still counting ({counter})");
    Ok(())
}

/// The image under test: `$MIGPROXY_IMAGE` when it exists, else built by the smoke script.
fn image(s: &Scenario) -> Result<String> {
    static IMAGE: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let log = s.dir.join("image-build.log");
    IMAGE
        .get_or_init(|| find_or_build_image(&log).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("{e}"))
}

fn find_or_build_image(log: &Path) -> Result<String> {
    if let Ok(image) = std::env::var("MIGPROXY_IMAGE") {
        let exists = Command::new("podman")
            .args(["image", "exists", &image])
            .status()
            .context("running podman (scripts/provision.sh installs it)")?;
        if exists.success() {
            return Ok(image);
        }
    }
    let script = repo_root().join("scripts/container-smoke.sh");
    eprintln!(
        "  building the image: {} --build-only (log: {})",
        script.display(),
        log.display()
    );
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("--build-only")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", script.display()))?;
    let status = wait_child(&mut child, IMAGE_BUILD_TIMEOUT, "the image build")?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if !status.success() {
        bail!("{} --build-only failed ({status})", script.display());
    }
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("IMAGE="))
        .map(|i| i.trim().to_owned())
        .ok_or_else(|| anyhow!("{} printed no IMAGE= line", script.display()))
}

/// `podman run --rm -i IMAGE profile capture --from-stream - --save-reference
/// /profiles/source-reference.json < fresh.stream > PROFILE`, the stream saved from a fresh,
/// never-started VM of `version` (the source: its reference description goes next to the
/// profiles, written as uid 0 into the mounted directory).
fn capture_profile_from_stream(
    s: &Scenario,
    image: &str,
    profiles: &Path,
    profile: &str,
    version: Version,
) -> Result<()> {
    let stream = s.dir.join(&format!("fresh-{}.stream", version.tag()));
    scenario::save_fresh_stream(&a64fx(version), &stream)?;
    let stdin = File::open(&stream).with_context(|| format!("opening {}", stream.display()))?;
    let mount = format!("{}:/profiles", profiles.display());
    let podman_args = [
        "run",
        "--rm",
        "-i",
        "--network",
        "none",
        "--user",
        "0",
        "-v",
        &mount,
    ];
    let command = [
        image,
        "profile",
        "capture",
        "--from-stream",
        "-",
        "--save-reference",
        "/profiles/source-reference.json",
    ];
    capture_in_container(
        s,
        &podman_args,
        &command,
        stdin,
        &profiles.join(profile),
        version,
    )?;
    if !profiles.join("source-reference.json").is_file() {
        bail!("profile capture --save-reference wrote no source-reference.json");
    }
    Ok(())
}

/// deploy/README.md section 3: a throwaway `-S` QEMU of `version` with a QMP socket in a directory
/// mounted at the same path in the container (TMPDIR too: migproxy opens the socket QEMU migrates
/// into there), and the image's `profile capture --from-qmp` as uid 0 (root's QMP socket).
fn capture_profile_from_qmp(
    s: &Scenario,
    image: &str,
    profile: &Path,
    version: Version,
) -> Result<()> {
    let dir = s.dir.join("capture");
    std::fs::create_dir_all(&dir).context("creating the capture directory")?;
    let qmp = dir.join("qmp.sock");
    let mut fresh = a64fx(version);
    fresh.paused = true;
    // The harness holds the VM's first QMP socket; QEMU serves one client per socket.
    fresh.extra_args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    let vm = Vm::spawn(&s.dir, &format!("capture-{}", version.tag()), &fresh)?;
    let mount = format!("{0}:{0}", dir.display());
    let tmpdir = format!("TMPDIR={}", dir.display());
    let qmp_arg = qmp.display().to_string();
    let podman_args = [
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        "0",
        "-v",
        &mount,
        "-e",
        &tmpdir,
    ];
    let command = [image, "profile", "capture", "--from-qmp", &qmp_arg];
    capture_in_container(s, &podman_args, &command, Stdio::null(), profile, version)?;
    // Done: that QEMU now sits in postmigrate (deploy/README.md: kill it).
    drop(vm);
    Ok(())
}

fn capture_in_container(
    s: &Scenario,
    podman_args: &[&str],
    command: &[&str],
    stdin: impl Into<Stdio>,
    profile: &Path,
    version: Version,
) -> Result<()> {
    let stderr_log = s.dir.join(&format!("capture-{}-podman.log", version.tag()));
    let mut child = podman()
        .args(podman_args)
        .args(ulimits())
        .args(command)
        .stdin(stdin)
        .stdout(File::create(profile).with_context(|| format!("creating {}", profile.display()))?)
        .stderr(File::create(&stderr_log)?)
        .spawn()
        .context("starting podman run ... profile capture")?;
    let status = wait_child(
        &mut child,
        PODMAN_TIMEOUT,
        "profile capture in the container",
    )?;
    if !status.success() {
        bail!(
            "podman {} {} failed ({status}): {}",
            podman_args.join(" "),
            command.join(" "),
            std::fs::read_to_string(&stderr_log)
                .unwrap_or_default()
                .trim()
        );
    }
    let text = std::fs::read_to_string(profile).unwrap_or_default();
    if !text.contains("\"registers\"") {
        bail!("podman {} wrote no profile: {text:?}", command.join(" "));
    }
    Ok(())
}

/// A detached container, removed on drop; its logs land in the scenario directory on failure.
struct Container {
    name: String,
    log_path: PathBuf,
}

impl Container {
    fn run(
        s: &Scenario,
        image: &str,
        role: &str,
        podman_args: &[String],
        args: &[String],
    ) -> Result<Container> {
        let name = unique(&format!("migproxy-it-{role}"));
        // A leftover of an earlier, killed run would hold the name.
        let _ = podman_output(&["rm", "-f", "-t", "0", &name]);
        let mut run: Vec<String> = ["run", "-d", "--name", &name, "--network", "host"]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        run.extend(ulimits().iter().map(|a| (*a).to_owned()));
        run.extend(podman_args.iter().cloned());
        run.push(image.to_owned());
        run.extend(args.iter().cloned());
        let refs: Vec<&str> = run.iter().map(String::as_str).collect();
        let out = podman_output(&refs)?;
        let container = Container {
            name,
            log_path: s.dir.join(&format!("container-{role}.log")),
        };
        if !out.status.success() {
            bail!(
                "podman {} failed: {}",
                run.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(container)
    }

    /// Listening on `port` (checked without connecting: a probe would be a stray connection) and
    /// the image's own HEALTHCHECK passes.
    fn wait_healthy(&self, port: u16) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let state = self.inspect("{{.State.Status}}")?;
            if state != "running" {
                bail!("container {} is {state}: {}", self.name, self.logs()?);
            }
            if is_listening(port)
                && podman_output(&["healthcheck", "run", &self.name])?
                    .status
                    .success()
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "container {} not healthy after {START_TIMEOUT:?}: {}",
                    self.name,
                    self.logs()?
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        let health = self.inspect("{{.State.Health.Status}}")?;
        if health != "healthy" {
            bail!("podman reports container {} as {health:?}", self.name);
        }
        Ok(())
    }

    fn exec_ok(&self, command: &[&str]) -> Result<()> {
        let mut args = vec!["exec", self.name.as_str()];
        args.extend_from_slice(command);
        let out = podman_output(&args)?;
        if !out.status.success() {
            bail!(
                "podman exec {} {} failed ({}): {}",
                self.name,
                command.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn inspect(&self, format: &str) -> Result<String> {
        let out = podman_output(&["inspect", "--format", format, &self.name])?;
        if !out.status.success() {
            bail!(
                "podman inspect {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Everything the container logged so far (also written to its log file in the scenario dir).
    fn logs(&self) -> Result<String> {
        let out = podman_output(&["logs", &self.name])?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let _ = std::fs::write(&self.log_path, &text);
        Ok(text)
    }

    /// The proxy's one end-of-migration summary event.
    fn wait_summary(&self) -> Result<Value> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let summaries: Vec<Value> = self
                .logs()?
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|event| event_message(event) == SUMMARY)
                .collect();
            match summaries.as_slice() {
                [summary] => return Ok(summary.clone()),
                [] if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
                [] => bail!("the proxy in {} logged no migration summary", self.name),
                many => bail!(
                    "expected one migration, the proxy summarised {}",
                    many.len()
                ),
            }
        }
    }

    /// `podman stop` sends the image's STOPSIGNAL (SIGTERM); migproxy drains and exits 0.
    fn stop_drained(&self) -> Result<()> {
        let timeout = STOP_TIMEOUT_SECS.to_string();
        let out = podman_output(&["stop", "-t", &timeout, &self.name])?;
        if !out.status.success() {
            bail!(
                "podman stop {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let code = self.inspect("{{.State.ExitCode}}")?;
        let logs = self.logs()?;
        if code != "0" {
            bail!(
                "container {} exited with {code} after podman stop, expected 0: {logs}",
                self.name
            );
        }
        if !logs.contains("shutting down") {
            bail!(
                "container {} exited 0 without logging its drain: {logs}",
                self.name
            );
        }
        Ok(())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.logs();
        let _ = podman_output(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// The guide's nftables `redirect` ruleset for one destination port, in a table of its own,
/// deleted on drop. QEMU's connection to 127.0.0.1:DEST_PORT goes to the proxy's port instead;
/// the proxy's own connection (uid 65532) is left alone, or it would loop back to itself.
struct NftRedirect {
    table: String,
}

impl NftRedirect {
    fn install(s: &Scenario, dest_port: u16, proxy_port: u16) -> Result<NftRedirect> {
        let table = unique("migproxy_it").replace('-', "_");
        let ruleset = redirect_ruleset(&table, dest_port, proxy_port)?;
        let path = s.dir.join("redirect.nft");
        std::fs::write(&path, &ruleset).context("writing the nftables ruleset")?;
        let out = Command::new("nft")
            .arg("-f")
            .arg(&path)
            .output()
            .context("running nft (scripts/provision.sh installs nftables)")?;
        if !out.status.success() {
            bail!(
                "nft -f {} failed: {}\n{ruleset}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        eprintln!("  nftables: 127.0.0.1:{dest_port} redirected to the proxy on :{proxy_port}");
        Ok(NftRedirect { table })
    }
}

impl Drop for NftRedirect {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// deploy/nftables/redirect.nft - the guide's ruleset, loaded as is - with the test's values for its
/// defines (this host's loopback as the "upgraded host", the destination QEMU's port as the migration
/// port range, the proxy's port) and a table name of its own.
fn redirect_ruleset(table: &str, dest_port: u16, proxy_port: u16) -> Result<String> {
    let path = repo_root().join("deploy/nftables/redirect.nft");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut replaced = Vec::new();
    let mut ruleset = String::new();
    for line in text.lines() {
        let line = if let Some(name) = line
            .strip_prefix("define ")
            .and_then(|rest| rest.split_once(" = "))
            .map(|(name, _)| name.trim())
        {
            let value = match name {
                "MIGPROXY_UID" => IMAGE_UID.to_string(),
                "MIGPROXY_PORT" => proxy_port.to_string(),
                "MIGRATION_PORTS" => dest_port.to_string(),
                "UPGRADED_HOSTS" => "{ 127.0.0.1 }".to_owned(),
                other => bail!("{}: unexpected define {other}", path.display()),
            };
            replaced.push(name.to_owned());
            format!("define {name} = {value}")
        } else if line.starts_with("table inet migproxy ") {
            replaced.push("table".to_owned());
            format!("table inet {table} {{")
        } else {
            line.to_owned()
        };
        ruleset.push_str(&line);
        ruleset.push('\n');
    }
    replaced.sort();
    let expected = [
        "MIGPROXY_PORT",
        "MIGPROXY_UID",
        "MIGRATION_PORTS",
        "UPGRADED_HOSTS",
        "table",
    ];
    if replaced != expected {
        bail!(
            "{}: expected the defines and table {expected:?}, found {replaced:?}",
            path.display()
        );
    }
    Ok(ruleset)
}

fn podman() -> Command {
    let mut command = Command::new("podman");
    // crun fails on this machine kind's hybrid cgroups; runc works (deploy/README.md).
    command.args(["--runtime", "runc"]);
    command
}

fn ulimits() -> [&'static str; 4] {
    // setrlimit is denied in these VMs unless the limits are explicit.
    [
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ]
}

/// Run one podman command to completion with a deadline; output captured in files (never a pipe
/// that could fill up while we wait).
fn podman_output(args: &[&str]) -> Result<std::process::Output> {
    let base = std::env::temp_dir().join(unique("migproxy-it-podman"));
    let out_path = base.with_extension("out");
    let err_path = base.with_extension("err");
    let mut child = podman()
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .context("starting podman")?;
    let status = wait_child(
        &mut child,
        PODMAN_TIMEOUT,
        &format!("podman {}", args.join(" ")),
    )?;
    let stdout = std::fs::read(&out_path).unwrap_or_default();
    let stderr = std::fs::read(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
    what: &str,
) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}
