//! `ProxyError`: every way a subcommand can fail, and the exit code it maps to.
//!
//! Exit codes (interface contract): 0 success; 1 runtime or input error; 2 usage or
//! configuration error (nothing was started); 3 refused by policy.
//!
//! Variants carry their causes as types (an `io::Error`, a `ConfigError`, a [`Refusal`], an
//! [`HttpFailure`] ...), never as text to be taken apart again; a cause nested in a located error
//! (`[[listener]] #2: ...`) is boxed, not formatted. This module sits below every wing, so the
//! cause types live here rather than next to the code that raises them.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use migproxy_codec::DecodeError;
use migproxy_config::ConfigError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A malformed or unsupported migration stream.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Invalid configuration or profile: nothing was started.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Reading or writing a file or socket failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The command line was wrong in a way clap cannot express.
    #[error("{0}")]
    Usage(String),
    /// A `run` setting (flag, environment variable or configuration file) is invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// One `[[listener]]` of the configuration file is invalid (counted from 1).
    #[error("[[listener]] #{index}: {source}")]
    Listener {
        index: usize,
        #[source]
        source: Box<ProxyError>,
    },
    /// A profile named on the command line or in the file cannot be loaded.
    #[error("invalid configuration: profile {spec}: {source}")]
    Profile {
        spec: String,
        #[source]
        source: ConfigError,
    },
    /// A profile to serve on the admin address cannot be loaded.
    #[error("invalid configuration: served profile {name} ({}): {source}", path.display())]
    ServedProfile {
        name: String,
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    /// A register named by `allow-drop` is not a register.
    #[error("invalid configuration: allow-drop {name:?}: {source}")]
    AllowDrop {
        name: String,
        #[source]
        source: ConfigError,
    },
    /// A TLS credential file is missing or unusable.
    #[error("invalid configuration: tls {}: {source}", path.display())]
    TlsCredentials {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    /// A profile URL cannot be used.
    #[error("invalid configuration: profile {url}: {failure}")]
    ProfileUrl { url: String, failure: HttpFailure },
    /// An address is not in QEMU's syntax (`tcp:HOST:PORT`, `tcp:[IPV6]:PORT`, `unix:PATH`).
    #[error("invalid address {text:?}: {problem}")]
    Address {
        text: String,
        problem: AddressProblem,
    },
    /// An accepted connection has no destination under the listener's upstream mode.
    #[error("{0}")]
    NoUpstream(NoUpstream),
    /// The name to check in the destination's certificate is not a valid server name.
    #[error("invalid tls server name {0:?}")]
    TlsServerName(String),
    /// The migration would lose guest state or cannot load.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// A migration could not be carried on, and every connection of it was closed.
    #[error("migration aborted: {0}")]
    Aborted(Abort),
    /// The destination's end of the main channel says its load failed.
    #[error("{0}")]
    Destination(DestinationVerdict),
    /// The same, when the destination's exit also failed what migproxy was doing with the main
    /// channel (a write that met its reset): the verdict is what an operator acts on, the error
    /// is kept to say where the stream was.
    #[error("{verdict} (meanwhile {cause})")]
    DestinationMeanwhile {
        verdict: DestinationVerdict,
        #[source]
        cause: Box<ProxyError>,
    },
    /// An HTTP exchange (health check, profile fetch) failed.
    #[error("http {url}: {failure}")]
    Http { url: String, failure: HttpFailure },
    /// A saved stream has no device state with a description to take registers from.
    #[error("{origin}: no device state with a description in the stream (a postcopy stream, or a source with suppress-vmdesc, carries none and cannot be used)")]
    NoDeviceState { origin: String },
    /// A saved stream's device state has no `cpu` section.
    #[error("{origin}: the device state has no cpu section")]
    NoCpuSection { origin: String },
    /// QEMU's monitor answered something other than what the capture needs.
    #[error("qmp {socket}: {problem}")]
    Qmp { socket: String, problem: String },
    /// The JSON output could not be produced.
    #[error("json output: {0}")]
    JsonOutput(#[source] serde_json::Error),
}

/// Why a migration is refused (exit code 3 offline; outcome `refused` in the daemon).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The rewrite refused registers: one summary per refused vCPU, each naming it and them.
    #[error("{}", .0.join(" | "))]
    Registers(Vec<String>),
    /// Postcopy advised by a source that could not take its guest back after a refused switch
    /// (DESIGN.md, "Postcopy").
    #[error("postcopy advised at byte {offset}: {outlook}; refused now, while the source still runs its guest (migrate without postcopy-ram, or start migproxy with --unrecoverable-postcopy allow if switches are rare and you accept that risk)")]
    PostcopyUnrecoverable { offset: u64, outlook: String },
    /// A rewriting proxy without the source's reference description (DESIGN.md, "How the end of
    /// the phase is recognised"): refused at the main channel's first bytes, before the
    /// destination is contacted.
    #[error("this proxy rewrites but has no reference description of the source, so a guest could end the device phase early with bytes forged in its own state; refused before the destination was contacted, the source keeps running its guest (give --source-reference FILE, file key source_reference, made with `migproxy profile capture --save-reference FILE`; or accept that risk with --unreferenced-device-phase allow)")]
    UnreferencedDevicePhase,
    /// The source switched to postcopy and its package cannot go through: why, and what the
    /// source does now.
    #[error("postcopy package at byte {offset}: {why}; {outcome}")]
    PostcopyPackage {
        offset: u64,
        why: String,
        outcome: String,
    },
    /// `cpu` subsections the destination cannot load and migproxy cannot remove: one summary per
    /// vCPU, each naming it and them (docs/profiles.md, "Subsections").
    #[error("{}", .0.join(" | "))]
    Subsections(Vec<String>),
    /// The device-state phase did not end with a verified description within its deadline,
    /// counted from the phase's first byte (not from the last byte: trickling does not extend it).
    /// `last_candidate`: why the last apparent ending did not verify (a source reference of
    /// another configuration names the device or vmstate here), if there was one.
    #[error("at byte {offset}: no verified description within {} ms of the start of the device-state phase (suppress-vmdesc, a description over --max-description, or a source trickling bytes?); device sections cannot be delimited (--description-timeout){}", .waited.as_millis(), .last_candidate.as_ref().map(|why| format!("; the last apparent ending did not verify: {why}")).unwrap_or_default())]
    NoDescription {
        offset: u64,
        waited: Duration,
        last_candidate: Option<String>,
    },
}

/// Why a migration was given up (not a policy refusal).
#[derive(Debug, thiserror::Error)]
pub enum Abort {
    #[error("main channel gone")]
    MainChannelGone,
    /// A peer took no bytes for the whole stall deadline.
    #[error("{what}: the peer took no bytes for {} ms (--write-stall-timeout)", .waited.as_millis())]
    WriteStalled { what: String, waited: Duration },
    /// The destination did not accept the connection (and complete its TLS handshake) in time.
    #[error("connecting to {upstream}: not connected within {} ms (--dial-timeout)", .waited.as_millis())]
    DialTimeout { upstream: String, waited: Duration },
    /// A profile fetched when the migration starts could not be had.
    #[error("{role} profile unavailable: {source}")]
    ProfileUnavailable {
        role: ProfileRole,
        #[source]
        source: Box<ProxyError>,
    },
}

/// How the destination ended its main channel when that end means a failed migration
/// (`migration/destination_end.rs` decides which ends do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DestinationVerdict {
    /// Its return path said so: `MIG_RP_MSG_SHUT` with a non-zero value.
    #[error("destination reported a failed load (return path SHUT {0})")]
    FailedLoad(u32),
    /// It reset the connection after the whole stream went through, without a clean `SHUT 0`
    /// first (a QEMU that exits with part of the stream unread resets).
    #[error("destination reset the connection after the stream ended")]
    ResetAfterEnd,
    #[error("destination reset the connection before the stream ended")]
    ResetBeforeEnd,
    /// It closed while the stream was incomplete: it cannot have loaded it.
    #[error("destination closed the connection before the stream ended")]
    ClosedBeforeEnd,
    /// The source opened a return path, and the destination closed it without its `SHUT`
    /// (QEMU always sends one when it ends an incoming migration it is still running).
    #[error("destination closed the connection without the return path's SHUT")]
    ClosedWithoutShut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileRole {
    Destination,
    Source,
}

impl std::fmt::Display for ProfileRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProfileRole::Destination => "destination",
            ProfileRole::Source => "source",
        })
    }
}

/// What went wrong in an HTTP exchange.
#[derive(Debug, thiserror::Error)]
pub enum HttpFailure {
    #[error("only http:// and https:// URLs are supported")]
    NotHttp,
    #[error("an https:// URL needs a pinned CA (--profile-ca, or profile_ca in the file)")]
    HttpsWithoutCa,
    #[error("tls: {0}")]
    Tls(#[source] io::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("missing host")]
    MissingHost,
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("request: {0}")]
    BuildRequest(#[source] hyper::http::Error),
    #[error("request: {0}")]
    Request(#[source] hyper::Error),
    #[error("body: {0}")]
    Body(#[source] BoxError),
    #[error("body larger than {0} bytes (--max-profile)")]
    BodyTooLarge(usize),
    #[error("plain http:// while --profile-ca pins a CA for profile URLs: anyone on the path could choose the registers; use https://")]
    PlainHttpWithCa,
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("status {0}")]
    Status(u16),
    #[error("profile is not UTF-8")]
    NotUtf8,
    #[error("invalid profile: {0}")]
    InvalidProfile(#[source] ConfigError),
}

/// What is wrong with an address's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressProblem {
    #[error("a port range is not allowed here")]
    PortRangeNotAllowed,
    #[error("empty unix socket path")]
    EmptyUnixPath,
    #[error("expected tcp:HOST:PORT, tcp:[IPV6]:PORT or unix:PATH")]
    UnknownForm,
    #[error("missing ']' after the IPv6 address")]
    UnclosedBracket,
    #[error("missing ':PORT' after ']'")]
    MissingPortAfterBracket,
    #[error("missing ':PORT'")]
    MissingPort,
    #[error("an IPv6 address must be written in brackets: tcp:[ADDR]:PORT")]
    UnbracketedIpv6,
    #[error("empty host")]
    EmptyHost,
    #[error("invalid port {0:?}")]
    InvalidPort(String),
    #[error("port range {first}-{last} is empty")]
    EmptyPortRange { first: u16, last: u16 },
}

/// Why an accepted connection has no destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoUpstream {
    #[error("a port-range upstream needs a tcp listener")]
    PortRangeNeedsTcp,
    #[error("accepted on port {port}, outside the upstream range {first}-{last}")]
    OutsidePortRange { port: u16, first: u16, last: u16 },
    #[error("no original destination (SO_ORIGINAL_DST) on this connection: is it redirected by nftables?")]
    NoOriginalDst,
    #[error("tproxy needs a tcp listener")]
    TproxyNeedsTcp,
}

impl ProxyError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        ProxyError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn address(text: &str, problem: AddressProblem) -> Self {
        ProxyError::Address {
            text: text.to_owned(),
            problem,
        }
    }

    pub fn tls_credentials(path: &std::path::Path, source: impl Into<BoxError>) -> Self {
        ProxyError::TlsCredentials {
            path: path.to_path_buf(),
            source: source.into(),
        }
    }

    /// Whether this is a refusal by policy rather than a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ProxyError::Refused(_))
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            ProxyError::Decode(_)
            | ProxyError::Io { .. }
            | ProxyError::NoUpstream(_)
            | ProxyError::TlsServerName(_)
            | ProxyError::Aborted(_)
            | ProxyError::Destination(_)
            | ProxyError::DestinationMeanwhile { .. }
            | ProxyError::Http { .. }
            | ProxyError::NoDeviceState { .. }
            | ProxyError::NoCpuSection { .. }
            | ProxyError::Qmp { .. }
            | ProxyError::JsonOutput(_) => 1,
            ProxyError::Config(_)
            | ProxyError::Usage(_)
            | ProxyError::InvalidConfig(_)
            | ProxyError::Profile { .. }
            | ProxyError::ServedProfile { .. }
            | ProxyError::AllowDrop { .. }
            | ProxyError::TlsCredentials { .. }
            | ProxyError::ProfileUrl { .. }
            | ProxyError::Address { .. } => 2,
            ProxyError::Listener { source, .. } => source.exit_code(),
            ProxyError::Refused(_) => 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_located_error_keeps_its_cause_and_exit_code() {
        let err = ProxyError::Listener {
            index: 2,
            source: Box::new(ProxyError::address("tcp:host", AddressProblem::MissingPort)),
        };
        assert_eq!(
            err.to_string(),
            "[[listener]] #2: invalid address \"tcp:host\": missing ':PORT'"
        );
        assert_eq!(err.exit_code(), 2);
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(
            cause.as_deref(),
            Some("invalid address \"tcp:host\": missing ':PORT'")
        );
    }

    #[test]
    fn refusals_exit_3_and_name_every_vcpu() {
        let err = ProxyError::Refused(Refusal::Registers(vec![
            "vcpu 0: A".into(),
            "vcpu 1: B".into(),
        ]));
        assert_eq!(err.to_string(), "refused: vcpu 0: A | vcpu 1: B");
        assert_eq!(err.exit_code(), 3);
        assert!(err.is_refusal());
    }
}
