//! The command line, as fixed by the interface contract (flag names, env vars).
//!
//! Every long flag of `run` can also be given as `MIGPROXY_<FLAG>`.

pub mod policy;

use std::path::PathBuf;

use crate::net::relay::RawRelay;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "migproxy",
    version,
    about = "Live-migration proxy that repairs ARM64 cpreg lists between QEMU builds"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode a saved migration stream and summarise it.
    Inspect(InspectArgs),
    /// Capture and manage destination register profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Show what a rewrite would drop, fill and refuse, before any migration.
    Plan(PlanArgs),
    /// Rewrite a saved stream offline.
    Rewrite(RewriteArgs),
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Ask a running proxy whether it is healthy (for container health checks).
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The stream file, or `-` for standard input.
    pub file: PathBuf,
    /// Print JSON instead of a readable summary (complete: every register of every vCPU).
    #[arg(long)]
    pub json: bool,
    /// Print every section and every register of every vCPU; by default alike sections share a
    /// line, alike vCPUs one register list, and other vCPUs show only where they differ.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Capture a destination profile.
    Capture(CaptureArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("capture_source").required(true).args(["from_stream", "from_qmp", "from_kvm"])))]
pub struct CaptureArgs {
    /// A migration stream produced on the destination (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    pub from_stream: Option<PathBuf>,
    /// The QMP socket of a throwaway QEMU started with `-S` on the destination host.
    #[arg(long, value_name = "SOCKET")]
    pub from_qmp: Option<PathBuf>,
    /// Read the register list from KVM directly (aarch64 hosts only).
    #[arg(long)]
    pub from_kvm: bool,
    /// Where to write the profile (`-` or absent: standard output).
    #[arg(short, long, value_name = "PROFILE")]
    pub output: Option<PathBuf>,
    /// Override the accelerator the profile describes.
    #[arg(long, value_enum)]
    pub accel: Option<AccelArg>,
    /// Record the destination's QEMU version (`11.1.3`): decides which `cpu` subsections it can
    /// load. `--from-qmp` reads it from QEMU; a stream does not carry it.
    #[arg(long, value_name = "VERSION")]
    pub qemu_version: Option<String>,
    /// Also write the stream's device-state description to FILE: captured from a fresh VM of
    /// the *source's* configuration, it is the `--source-reference` a rewriting `migproxy run`
    /// needs (with --from-stream or --from-qmp).
    #[arg(long, value_name = "FILE")]
    pub save_reference: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    Tcg,
    Kvm,
}

/// The policy knobs, shared by `plan`, `rewrite` and `run`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// What to do with registers the destination lacks.
    #[arg(
        long,
        value_enum,
        default_value = "drop-unused",
        env = "MIGPROXY_ON_EXTRA"
    )]
    pub on_extra: OnExtraArg,
    /// Allow dropping this register whatever its value (a name or a hex id; repeatable).
    #[arg(
        long = "allow-drop",
        value_name = "REG",
        env = "MIGPROXY_ALLOW_DROP",
        value_delimiter = ','
    )]
    pub allow_drop: Vec<String>,
    /// Whether to fill registers the source lacks with destination defaults.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        env = "MIGPROXY_FILL_MISSING"
    )]
    pub fill_missing: FillMissingArg,
    /// What to do when an identification register differs.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        env = "MIGPROXY_ON_ID_MISMATCH"
    )]
    pub on_id_mismatch: OnIdMismatchArg,
}

/// What a rewriting proxy does with a migration whose source could not take its guest back
/// after a failed switch (`--unrecoverable-postcopy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum UnrecoverablePostcopy {
    /// Refuse at ADVISE: the source keeps running its guest.
    #[default]
    Refuse,
    /// Let it go on; a switch would then be refused at the package and lose the guest.
    Allow,
}

/// What a rewriting proxy without a source reference does (`--unreferenced-device-phase`).
/// Without the source's reference description the end of the device phase is only a candidate
/// the guest could have forged inside its own state (DESIGN.md, "How the end of the phase is
/// recognised").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum UnreferencedDevicePhase {
    /// Refuse every migration at its first bytes, before the destination is contacted.
    #[default]
    Refuse,
    /// End the phase at the first verified candidate: a guest can fail (not corrupt) its own
    /// migration.
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnExtraArg {
    DropUnused,
    Drop,
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FillMissingArg {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnIdMismatchArg {
    Auto,
    Refuse,
    Warn,
    UseDestination,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The source: a saved stream or a profile.
    #[arg(long, value_name = "STREAM|PROFILE")]
    pub source: PathBuf,
    /// The destination's register profile.
    #[arg(long, value_name = "PROFILE")]
    pub dest_profile: PathBuf,
    /// A profile of a fresh VM with the source's configuration.
    #[arg(long, value_name = "PROFILE")]
    pub source_profile: Option<PathBuf>,
    /// Print the plan as JSON (complete: every register of every vCPU).
    #[arg(long)]
    pub json: bool,
    /// Print every register of every vCPU; by default vCPUs with the same plan share one block
    /// and each list names its first registers and counts the rest.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct RewriteArgs {
    /// The saved stream, or `-` for standard input.
    pub input: PathBuf,
    /// Where to write the rewritten stream, or `-` for standard output.
    pub output: PathBuf,
    /// The destination's register profile.
    #[arg(long, value_name = "PROFILE")]
    pub dest_profile: PathBuf,
    /// A profile of a fresh VM with the source's configuration.
    #[arg(long, value_name = "PROFILE")]
    pub source_profile: Option<PathBuf>,
    /// Report every register of every vCPU; by default vCPUs rewritten alike share one block
    /// and each list names its first registers and counts the rest.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A TOML configuration file describing one or more listeners.
    #[arg(long, value_name = "FILE", env = "MIGPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to accept migrations on (`tcp:HOST:PORT`, `tcp:[IPV6]:PORT`, `tcp:HOST:FIRST-LAST`,
    /// `unix:PATH`); repeatable. Default without --config: tcp:127.0.0.1:4444.
    #[arg(
        long,
        value_name = "ADDR",
        env = "MIGPROXY_LISTEN",
        value_delimiter = ','
    )]
    pub listen: Vec<String>,
    /// Where to forward: an address, `tcp:HOST:FIRST-LAST` (same port as accepted), `original-dst`
    /// (nftables redirect) or `tproxy`. Default without --listen: tcp:127.0.0.1:4445.
    #[arg(long, value_name = "ADDR", env = "MIGPROXY_UPSTREAM")]
    pub upstream: Option<String>,
    /// The destination's register profile: a file, an `https://` URL (with --profile-ca) or an
    /// `http://` URL (unauthenticated: anyone on the path chooses the registers; refused when
    /// --profile-ca is set).
    #[arg(long, value_name = "PROFILE|URL", env = "MIGPROXY_DEST_PROFILE")]
    pub dest_profile: Option<String>,
    /// A profile of a fresh VM with the source's configuration: a file or an `https://`/`http://` URL.
    #[arg(long, value_name = "PROFILE|URL", env = "MIGPROXY_SOURCE_PROFILE")]
    pub source_profile: Option<String>,
    /// The reference description of a fresh VM with the source's configuration: a saved stream
    /// of it (the one a source profile is captured from) or the description JSON that
    /// `migproxy profile capture --save-reference FILE` writes. It makes the end of the device
    /// phase exact (a guest cannot forge it) and gives a postcopy package its layout. Needed
    /// by a rewriting proxy unless --unreferenced-device-phase allow.
    #[arg(long, value_name = "FILE", env = "MIGPROXY_SOURCE_REFERENCE")]
    pub source_reference: Option<PathBuf>,
    /// Admin address serving /metrics, /healthz, /readyz and /profiles/NAME (`none` disables it).
    /// Default: tcp:127.0.0.1:9444.
    #[arg(long, value_name = "ADDR", env = "MIGPROXY_ADMIN")]
    pub admin: Option<String>,
    /// A profile to advertise on the admin address as /profiles/NAME (`NAME=FILE`; repeatable).
    #[arg(
        long,
        value_name = "NAME=FILE",
        env = "MIGPROXY_SERVE_PROFILE",
        value_delimiter = ','
    )]
    pub serve_profile: Vec<String>,
    /// Log as JSON lines.
    #[arg(long, env = "MIGPROXY_LOG_JSON")]
    pub log_json: bool,
    /// How long live migrations may keep running after SIGTERM, in seconds (default 30).
    #[arg(long, value_name = "SECONDS", env = "MIGPROXY_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<u64>,
    /// How long the device-state phase may last, from its first byte until its description has
    /// arrived, in milliseconds (default 2000). A deadline, not a silence timer.
    #[arg(long, value_name = "MS", env = "MIGPROXY_DESCRIPTION_TIMEOUT")]
    pub description_timeout: Option<u64>,
    /// How long a new connection may take to identify itself (under TLS: to complete its
    /// handshake, and then again to send its first bytes), in milliseconds (default 1000).
    #[arg(long, value_name = "MS", env = "MIGPROXY_IDENTIFY_TIMEOUT")]
    pub identify_timeout: Option<u64>,
    /// How long a write to the source or the destination may make no progress (a peer that
    /// stopped reading), in milliseconds (default 60000); then the migration is closed.
    #[arg(long, value_name = "MS", env = "MIGPROXY_WRITE_STALL_TIMEOUT")]
    pub write_stall_timeout: Option<u64>,
    /// How long connecting to the destination, TLS handshake included, may take, in milliseconds
    /// (default 10000).
    #[arg(long, value_name = "MS", env = "MIGPROXY_DIAL_TIMEOUT")]
    pub dial_timeout: Option<u64>,
    /// Largest single non-page record accepted, in bytes (default 16 MiB).
    #[arg(long, value_name = "BYTES", env = "MIGPROXY_MAX_RECORD")]
    pub max_record: Option<usize>,
    /// Largest device-state phase (full sections and EOF, the description not counted), in
    /// bytes (default 256 MiB).
    #[arg(long, value_name = "BYTES", env = "MIGPROXY_MAX_DEVICE_STATE")]
    pub max_device_state: Option<usize>,
    /// Largest description JSON, in bytes (default 16 MiB).
    #[arg(long, value_name = "BYTES", env = "MIGPROXY_MAX_DESCRIPTION")]
    pub max_description: Option<usize>,
    /// How multifd, preempt and return-path channels are relayed: `splice` (default: splice(2)
    /// through a kernel pipe where both sides are plain TCP, the copying relay under TLS) or
    /// `copy` (always through a user-space buffer).
    #[arg(
        long,
        value_enum,
        value_name = "splice|copy",
        env = "MIGPROXY_RAW_RELAY"
    )]
    pub raw_relay: Option<RawRelay>,
    /// With a rewrite, what to do when postcopy is advised by a source that could not take its
    /// guest back after a refused switch (older than QEMU 10.2, no return path, or no source
    /// profile): `refuse` at ADVISE (default; the source keeps running its guest) or `allow`
    /// (finishes in precopy rewritten; a switch is refused and loses the guest). See DESIGN.md.
    #[arg(
        long,
        value_enum,
        value_name = "refuse|allow",
        env = "MIGPROXY_UNRECOVERABLE_POSTCOPY"
    )]
    pub unrecoverable_postcopy: Option<UnrecoverablePostcopy>,
    /// With a rewrite but no --source-reference: `refuse` every migration at its first bytes
    /// (default; the source keeps running its guest, the destination is not contacted) or
    /// `allow` the end of the device phase to be recognised without a reference. What `allow`
    /// exposes: a guest that writes a forged ending into its own registers can make the
    /// migration fail (the proxy closes both sides, the source keeps the guest); nothing
    /// corrupt reaches the destination. See DESIGN.md.
    #[arg(
        long,
        value_enum,
        value_name = "refuse|allow",
        env = "MIGPROXY_UNREFERENCED_DEVICE_PHASE"
    )]
    pub unreferenced_device_phase: Option<UnreferencedDevicePhase>,
    /// Largest postcopy PACKAGED blob (checking relay), in bytes (default 256 MiB).
    #[arg(long, value_name = "BYTES", env = "MIGPROXY_MAX_PACKAGED")]
    pub max_packaged: Option<usize>,
    /// Most vCPUs (cpu sections with cpreg arrays) in one stream (default 512).
    #[arg(long, value_name = "COUNT", env = "MIGPROXY_MAX_CPUS")]
    pub max_cpus: Option<usize>,
    /// Most cpreg registers of one vCPU, as received and as rewritten (default 4096).
    #[arg(long, value_name = "COUNT", env = "MIGPROXY_MAX_CPREGS")]
    pub max_cpregs: Option<usize>,
    /// Largest rewritten device-state phase, in bytes (default 320 MiB).
    #[arg(long, value_name = "BYTES", env = "MIGPROXY_MAX_REWRITE_OUTPUT")]
    pub max_rewrite_output: Option<usize>,
    /// Most iterable sections (ram, dirty-bitmap, block) in one stream (default 256).
    #[arg(long, value_name = "COUNT", env = "MIGPROXY_MAX_SECTIONS")]
    pub max_sections: Option<usize>,
    /// TLS on both legs for --listen listeners: a QEMU-style credential directory (ca-cert.pem,
    /// server-cert.pem/server-key.pem shown to the source, client-cert.pem/client-key.pem shown to
    /// the destination).
    #[arg(long, value_name = "DIR", env = "MIGPROXY_TLS_CREDS")]
    pub tls_creds: Option<PathBuf>,
    /// Require a client certificate from the source, signed by ca-cert.pem (QEMU's verify-peer).
    /// This is the default; the flag is kept so existing command lines stay valid.
    #[arg(long, env = "MIGPROXY_TLS_VERIFY_PEER", requires = "tls_creds")]
    pub tls_verify_peer: bool,
    /// Accept sources without a client certificate. Anyone who can reach the listener and speak
    /// TLS and `QEVM` then reaches the destination authenticated as migproxy (see README).
    #[arg(
        long,
        env = "MIGPROXY_TLS_NO_VERIFY_PEER",
        requires = "tls_creds",
        conflicts_with = "tls_verify_peer"
    )]
    pub tls_no_verify_peer: bool,
    /// The only CA trusted for `https://` profile URLs (PEM). Required by `https://` URLs: the
    /// system's roots are never used, so a profile can only come from a server this CA signed.
    #[arg(long, value_name = "FILE", env = "MIGPROXY_PROFILE_CA")]
    pub profile_ca: Option<PathBuf>,
    /// How long fetching one profile URL may take, connect to last body byte, in milliseconds
    /// (default 5000). A migration whose profile does not arrive in time is refused before the
    /// destination is contacted.
    #[arg(long, value_name = "MS", env = "MIGPROXY_PROFILE_FETCH_TIMEOUT")]
    pub profile_fetch_timeout: Option<u64>,
    /// Largest profile body fetched from a URL, in bytes (default 16 MiB).
    #[arg(long, value_name = "BYTES", env = "MIGPROXY_MAX_PROFILE")]
    pub max_profile: Option<usize>,
    /// Most migrations in progress at once, over all listeners (default 16).
    #[arg(long, value_name = "N", env = "MIGPROXY_MAX_MIGRATIONS")]
    pub max_migrations: Option<usize>,
    /// Most open connections from one source host, identified or not (default 64).
    #[arg(long, value_name = "N", env = "MIGPROXY_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
    /// Most open migration connections, over all listeners and sources (default 1024).
    #[arg(long, value_name = "N", env = "MIGPROXY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most open admin connections (default 64); further ones are closed at once.
    #[arg(long, value_name = "N", env = "MIGPROXY_MAX_ADMIN_CONNECTIONS")]
    pub max_admin_connections: Option<usize>,
    /// How long an admin client may take to send its request headers, in milliseconds
    /// (default 5000).
    #[arg(long, value_name = "MS", env = "MIGPROXY_ADMIN_HEADER_TIMEOUT")]
    pub admin_header_timeout: Option<u64>,
    /// TLS on the admin address: a directory with server-cert.pem and server-key.pem (profiles
    /// are then fetched as `https://` with `--profile-ca`).
    #[arg(long, value_name = "DIR", env = "MIGPROXY_ADMIN_TLS_CREDS")]
    pub admin_tls_creds: Option<PathBuf>,
    /// Name expected in the destination's certificate (default: the upstream host).
    #[arg(
        long,
        value_name = "NAME",
        env = "MIGPROXY_TLS_HOSTNAME",
        requires = "tls_creds"
    )]
    pub tls_hostname: Option<String>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The health URL to query.
    #[arg(
        long,
        default_value = "http://127.0.0.1:9444/healthz",
        env = "MIGPROXY_HEALTHCHECK_URL"
    )]
    pub url: String,
    /// Give up after this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub timeout_ms: u64,
    /// The CA that signed the admin address's certificate, for an `https://` URL.
    #[arg(long, value_name = "FILE", env = "MIGPROXY_HEALTHCHECK_CA")]
    pub ca: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every budget and deadline of `migproxy run` says its default in `--help` (they have no
    /// clap default: a flag overrides the file, the file the default).
    #[test]
    fn run_help_shows_every_budgets_and_deadlines_default() {
        let cli = Cli::command();
        let Some(run) = cli.find_subcommand("run") else {
            panic!("no run subcommand");
        };
        let mut checked = 0;
        for arg in run.get_arguments() {
            let names = arg.get_value_names().unwrap_or_default();
            if !names
                .iter()
                .any(|n| ["MS", "BYTES", "COUNT", "N", "SECONDS"].contains(&n.as_str()))
            {
                continue;
            }
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(
                help.contains("(default "),
                "--{} does not show its default: {help}",
                arg.get_id()
            );
            checked += 1;
        }
        // 8 stream budgets, 4 connection budgets, the profile budget, 7 deadlines.
        assert_eq!(checked, 20);
    }
}
