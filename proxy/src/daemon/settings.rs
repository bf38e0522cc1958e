//! The settings of `migproxy run`: the whole configuration (flags, environment, `--config` file)
//! validated into one `RunConfig` before anything is bound.
//!
//! Precedence: a `--config` file defines its `[[listener]]`s; `--listen` adds listeners made of the
//! listener flags (`--upstream`, `--dest-profile`, `--source-profile`, policy flags). With neither,
//! the embedded default listens on `tcp:127.0.0.1:4444` and forwards to `tcp:127.0.0.1:4445`
//! (the listener flags still apply to it). Daemon-wide settings: flag, else file, else default.
//! Everything is checked before the first socket is bound; the first problem is reported as one
//! line and the exit code is 2.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use migproxy_codec::Limits;
use migproxy_config::file::{ListenerFile, RunFile};
use migproxy_config::Policy;

use crate::cli::policy::{policy_from_args, policy_from_file};
use crate::cli::RunArgs;
use crate::cli::UnreferencedDevicePhase;
use crate::error::ProxyError;
use crate::migration::admission::Budgets;
use crate::migration::postcopy::UnrecoverablePostcopy;
use crate::migration::profile_source::{ProfileSource, RewriteConfig};
use crate::migration::source_reference::SourceReference;
use crate::net::addr::{Address, ListenSpec, Upstream};
use crate::net::http_client::{FetchBudget, DEFAULT_FETCH_TIMEOUT_MS, DEFAULT_MAX_BODY_BYTES};
use crate::net::relay::RawRelay;
use crate::net::tls::{admin_server, pinned_client, ListenerTls, TlsSettings};
use tokio_rustls::TlsConnector;

pub const DEFAULT_LISTEN: &str = "tcp:127.0.0.1:4444";
pub const DEFAULT_UPSTREAM: &str = "tcp:127.0.0.1:4445";
pub const DEFAULT_ADMIN: &str = "tcp:127.0.0.1:9444";
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_DESCRIPTION_TIMEOUT_MS: u64 = 2000;
pub const DEFAULT_IDENTIFY_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_MAX_ADMIN_CONNECTIONS: usize = 64;
pub const DEFAULT_ADMIN_HEADER_TIMEOUT_MS: u64 = 5000;
pub const DEFAULT_WRITE_STALL_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_DIAL_TIMEOUT_MS: u64 = 10_000;

/// The validated configuration of the daemon.
#[derive(Debug)]
pub struct RunConfig {
    pub listeners: Vec<ListenerConfig>,
    pub admin: Option<Address>,
    pub served_profiles: BTreeMap<String, PathBuf>,
    pub drain_timeout: Duration,
    pub description_timeout: Duration,
    pub identify_timeout: Duration,
    /// How long a write to a peer may make no progress before the migration is given up.
    pub write_stall_timeout: Duration,
    /// How long connecting to the destination (and its TLS handshake) may take.
    pub dial_timeout: Duration,
    pub log_json: bool,
    pub limits: Limits,
    pub unrecoverable_postcopy: UnrecoverablePostcopy,
    pub raw_relay: RawRelay,
    /// Rewriting listeners without a source reference: refuse their migrations or not.
    pub unreferenced_device_phase: UnreferencedDevicePhase,
    pub budgets: Budgets,
    pub admin_limits: AdminLimits,
}

/// What an admin client may hold (README, "Budgets").
#[derive(Debug, Clone)]
pub struct AdminLimits {
    /// Open admin connections; further ones are closed at once.
    pub max_connections: usize,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// Serve the admin address over TLS (`--admin-tls-creds`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

#[derive(Debug)]
pub struct ListenerConfig {
    pub listen: ListenSpec,
    pub upstream: Upstream,
    pub rewrite: RewriteConfig,
    pub tls: Option<Arc<ListenerTls>>,
}

impl RunConfig {
    pub fn from_args(args: &RunArgs) -> Result<RunConfig, ProxyError> {
        let file = match &args.config {
            Some(path) => Some(RunFile::load(path)?),
            None => None,
        };
        let profile_ca = args.profile_ca.clone().or_else(|| {
            file.as_ref()
                .and_then(|f| f.profile_ca.clone().map(PathBuf::from))
        });
        let trust = profile_ca.as_deref().map(pinned_client).transpose()?;
        let listener_flags =
            args.upstream.is_some() || args.dest_profile.is_some() || args.source_profile.is_some();
        let mut listeners = Vec::new();
        if let Some(file) = &file {
            if args.listen.is_empty() && listener_flags {
                return Err(ProxyError::InvalidConfig(
                    "--upstream/--dest-profile/--source-profile need --listen when --config is given (or put them in a [[listener]])".into(),
                ));
            }
            for (index, listener) in file.listeners.iter().enumerate() {
                listeners.push(ListenerConfig::from_file(listener, trust.as_ref()).map_err(
                    |source| ProxyError::Listener {
                        index: index.saturating_add(1),
                        source: Box::new(source),
                    },
                )?);
            }
        }
        let cli_listens: Vec<String> = if !args.listen.is_empty() {
            args.listen.clone()
        } else if file.is_none() {
            vec![DEFAULT_LISTEN.to_owned()]
        } else {
            Vec::new()
        };
        for listen in &cli_listens {
            let upstream = match (&args.upstream, args.listen.is_empty()) {
                (Some(upstream), _) => upstream.as_str(),
                (None, true) => DEFAULT_UPSTREAM,
                (None, false) => {
                    return Err(ProxyError::Usage(format!(
                        "--listen {listen} needs --upstream"
                    )))
                }
            };
            let tls = args.tls_creds.as_ref().map(|dir| TlsSettings {
                dir: dir.clone(),
                // Verified unless explicitly told not to (--tls-no-verify-peer).
                verify_peer: !args.tls_no_verify_peer,
                hostname: args.tls_hostname.clone(),
            });
            let mut listener = ListenerConfig::new(
                listen,
                upstream,
                args.dest_profile.as_deref(),
                args.source_profile.as_deref(),
                policy_from_args(&args.policy)?,
                tls.as_ref(),
                trust.as_ref(),
            )?;
            listener.rewrite.source_reference = args
                .source_reference
                .as_deref()
                .map(SourceReference::load)
                .transpose()?
                .map(Arc::new);
            listeners.push(listener.checked()?);
        }
        let file_admin = file.as_ref().and_then(|f| f.admin.clone());
        let admin_text = args
            .admin
            .clone()
            .or(file_admin)
            .unwrap_or_else(|| DEFAULT_ADMIN.to_owned());
        let admin = if admin_text == "none" {
            None
        } else {
            Some(admin_text.parse::<Address>()?)
        };
        let mut served_profiles = BTreeMap::new();
        if let Some(file) = &file {
            for (name, path) in &file.profiles {
                served_profiles.insert(name.clone(), PathBuf::from(path));
            }
        }
        for spec in &args.serve_profile {
            let Some((name, path)) = spec.split_once('=') else {
                return Err(ProxyError::InvalidConfig(format!(
                    "--serve-profile {spec:?}: expected NAME=FILE"
                )));
            };
            served_profiles.insert(name.to_owned(), PathBuf::from(path));
        }
        for (name, path) in &served_profiles {
            if name.is_empty() || name.contains('/') {
                return Err(ProxyError::InvalidConfig(format!(
                    "served profile name {name:?} must be non-empty and without '/'"
                )));
            }
            migproxy_config::Profile::load(path).map_err(|source| ProxyError::ServedProfile {
                name: name.clone(),
                path: path.clone(),
                source,
            })?;
        }
        if admin.is_none() && !served_profiles.is_empty() {
            return Err(ProxyError::InvalidConfig(
                "profiles are served on the admin address, which is disabled (--admin none)".into(),
            ));
        }
        let pick = |flag: Option<u64>, from_file: Option<u64>, default: u64| {
            flag.or(from_file).unwrap_or(default)
        };
        let description_ms = pick(
            args.description_timeout,
            file.as_ref().and_then(|f| f.description_timeout_ms),
            DEFAULT_DESCRIPTION_TIMEOUT_MS,
        );
        let identify_ms = pick(
            args.identify_timeout,
            file.as_ref().and_then(|f| f.identify_timeout_ms),
            DEFAULT_IDENTIFY_TIMEOUT_MS,
        );
        let write_stall_ms = pick(
            args.write_stall_timeout,
            file.as_ref().and_then(|f| f.write_stall_timeout_ms),
            DEFAULT_WRITE_STALL_TIMEOUT_MS,
        );
        let dial_ms = pick(
            args.dial_timeout,
            file.as_ref().and_then(|f| f.dial_timeout_ms),
            DEFAULT_DIAL_TIMEOUT_MS,
        );
        if description_ms == 0 || identify_ms == 0 || write_stall_ms == 0 || dial_ms == 0 {
            return Err(ProxyError::InvalidConfig(
                "description, identify, write stall and dial timeouts must be at least 1 ms".into(),
            ));
        }
        let defaults = Limits::default();
        let limit =
            |flag: Option<usize>, from_file: Option<usize>, default: usize, name: &str| match flag
                .or(from_file)
            {
                Some(0) => Err(ProxyError::InvalidConfig(format!(
                    "{name} must be at least 1"
                ))),
                other => Ok(other.unwrap_or(default)),
            };
        let limits = Limits {
            max_record: limit(
                args.max_record,
                file.as_ref().and_then(|f| f.max_record_bytes),
                defaults.max_record,
                "max_record",
            )?,
            max_device_state: limit(
                args.max_device_state,
                file.as_ref().and_then(|f| f.max_device_state_bytes),
                defaults.max_device_state,
                "max_device_state",
            )?,
            max_description: limit(
                args.max_description,
                file.as_ref().and_then(|f| f.max_description_bytes),
                defaults.max_description,
                "max_description",
            )?,
            max_packaged: limit(
                args.max_packaged,
                file.as_ref().and_then(|f| f.max_packaged_bytes),
                defaults.max_packaged,
                "max_packaged",
            )?,
            max_cpus: limit(
                args.max_cpus,
                file.as_ref().and_then(|f| f.max_cpus),
                defaults.max_cpus,
                "max_cpus",
            )?,
            max_cpregs: limit(
                args.max_cpregs,
                file.as_ref().and_then(|f| f.max_cpregs),
                defaults.max_cpregs,
                "max_cpregs",
            )?,
            max_rewrite_output: limit(
                args.max_rewrite_output,
                file.as_ref().and_then(|f| f.max_rewrite_output_bytes),
                defaults.max_rewrite_output,
                "max_rewrite_output",
            )?,
            max_sections: limit(
                args.max_sections,
                file.as_ref().and_then(|f| f.max_sections),
                defaults.max_sections,
                "max_sections",
            )?,
        };
        let unrecoverable_postcopy = flag_or_file_word(
            args.unrecoverable_postcopy,
            file.as_ref()
                .and_then(|f| f.unrecoverable_postcopy.as_deref()),
            "unrecoverable_postcopy",
        )?;
        let unreferenced_device_phase = flag_or_file_word(
            args.unreferenced_device_phase,
            file.as_ref()
                .and_then(|f| f.unreferenced_device_phase.as_deref()),
            "unreferenced_device_phase",
        )?;
        let raw_relay = flag_or_file_word(
            args.raw_relay,
            file.as_ref().and_then(|f| f.raw_relay.as_deref()),
            "raw_relay",
        )?;
        let count =
            |flag: Option<usize>, from_file: Option<usize>, default: usize, name: &str| match flag
                .or(from_file)
            {
                Some(0) => Err(ProxyError::InvalidConfig(format!(
                    "{name} must be at least 1"
                ))),
                other => Ok(other.unwrap_or(default)),
            };
        let defaults = Budgets::default();
        let budgets = Budgets {
            max_migrations: count(
                args.max_migrations,
                file.as_ref().and_then(|f| f.max_migrations),
                defaults.max_migrations,
                "max_migrations",
            )?,
            max_connections_per_source: count(
                args.max_connections_per_source,
                file.as_ref().and_then(|f| f.max_connections_per_source),
                defaults.max_connections_per_source,
                "max_connections_per_source",
            )?,
            max_connections: count(
                args.max_connections,
                file.as_ref().and_then(|f| f.max_connections),
                defaults.max_connections,
                "max_connections",
            )?,
        };
        let header_ms = pick(
            args.admin_header_timeout,
            file.as_ref().and_then(|f| f.admin_header_timeout_ms),
            DEFAULT_ADMIN_HEADER_TIMEOUT_MS,
        );
        if header_ms == 0 {
            return Err(ProxyError::InvalidConfig(
                "admin_header_timeout must be at least 1 ms".into(),
            ));
        }
        let fetch_ms = pick(
            args.profile_fetch_timeout,
            file.as_ref().and_then(|f| f.profile_fetch_timeout_ms),
            DEFAULT_FETCH_TIMEOUT_MS,
        );
        if fetch_ms == 0 {
            return Err(ProxyError::InvalidConfig(
                "profile_fetch_timeout must be at least 1 ms".into(),
            ));
        }
        let fetch = FetchBudget {
            timeout: Duration::from_millis(fetch_ms),
            max_body: count(
                args.max_profile,
                file.as_ref().and_then(|f| f.max_profile_bytes),
                DEFAULT_MAX_BODY_BYTES,
                "max_profile",
            )?,
        };
        for listener in &mut listeners {
            listener.rewrite.fetch = fetch;
        }
        let admin_tls_dir = args.admin_tls_creds.clone().or_else(|| {
            file.as_ref()
                .and_then(|f| f.admin_tls_creds.clone().map(PathBuf::from))
        });
        let admin_limits = AdminLimits {
            max_connections: count(
                args.max_admin_connections,
                file.as_ref().and_then(|f| f.max_admin_connections),
                DEFAULT_MAX_ADMIN_CONNECTIONS,
                "max_admin_connections",
            )?,
            header_timeout: Duration::from_millis(header_ms),
            tls: admin_tls_dir.as_deref().map(admin_server).transpose()?,
        };
        Ok(RunConfig {
            limits,
            unrecoverable_postcopy,
            raw_relay,
            unreferenced_device_phase,
            budgets,
            admin_limits,
            listeners,
            admin,
            served_profiles,
            drain_timeout: Duration::from_secs(pick(
                args.drain_timeout,
                file.as_ref().and_then(|f| f.drain_timeout_secs),
                DEFAULT_DRAIN_TIMEOUT_SECS,
            )),
            description_timeout: Duration::from_millis(description_ms),
            identify_timeout: Duration::from_millis(identify_ms),
            write_stall_timeout: Duration::from_millis(write_stall_ms),
            dial_timeout: Duration::from_millis(dial_ms),
            log_json: args.log_json || file.as_ref().and_then(|f| f.log_json).unwrap_or(false),
        })
    }
}

/// A `refuse|allow` setting: the flag wins over the file's word, absent both the default.
fn flag_or_file_word<T: clap::ValueEnum + Default>(
    flag: Option<T>,
    word: Option<&str>,
    key: &str,
) -> Result<T, ProxyError> {
    match (flag, word) {
        (Some(flag), _) => Ok(flag),
        (None, Some(word)) => T::from_str(word, false).map_err(|_| {
            let expected: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value())
                .map(|v| v.get_name().to_owned())
                .collect();
            ProxyError::InvalidConfig(format!(
                "{key} = {word:?}: expected {}",
                expected.join(" or ")
            ))
        }),
        (None, None) => Ok(T::default()),
    }
}

impl ListenerConfig {
    fn new(
        listen: &str,
        upstream: &str,
        dest_profile: Option<&str>,
        source_profile: Option<&str>,
        policy: Policy,
        tls: Option<&TlsSettings>,
        trust: Option<&TlsConnector>,
    ) -> Result<ListenerConfig, ProxyError> {
        let listen: ListenSpec = listen.parse()?;
        let upstream: Upstream = upstream.parse()?;
        match (&listen, &upstream) {
            (
                ListenSpec::Unix(_),
                Upstream::PortRange { .. } | Upstream::OriginalDst | Upstream::Tproxy,
            ) => {
                return Err(ProxyError::InvalidConfig(format!(
                    "upstream {upstream} needs a tcp listener, not {listen}"
                )));
            }
            (
                ListenSpec::Tcp { first, last, .. },
                Upstream::PortRange {
                    first: up_first,
                    last: up_last,
                    ..
                },
            ) if first < up_first || last > up_last => {
                return Err(ProxyError::InvalidConfig(format!(
                    "listen ports {first}-{last} are not all inside the upstream range {up_first}-{up_last}"
                )));
            }
            _ => {}
        }
        if dest_profile.is_none() && source_profile.is_some() {
            return Err(ProxyError::InvalidConfig(
                "a source profile without a destination profile does nothing".into(),
            ));
        }
        let dest = dest_profile
            .map(|spec| ProfileSource::open(spec, trust))
            .transpose()?;
        let source = source_profile
            .map(|spec| ProfileSource::open(spec, trust))
            .transpose()?;
        let tls = tls.map(ListenerTls::load).transpose()?.map(Arc::new);
        Ok(ListenerConfig {
            listen,
            upstream,
            tls,
            rewrite: RewriteConfig {
                dest,
                source,
                source_reference: None,
                policy,
                fetch: FetchBudget::default(),
            },
        })
    }

    fn from_file(
        file: &ListenerFile,
        trust: Option<&TlsConnector>,
    ) -> Result<ListenerConfig, ProxyError> {
        let mut listener = ListenerConfig::new(
            &file.listen,
            &file.upstream,
            file.dest_profile.as_deref(),
            file.source_profile.as_deref(),
            policy_from_file(&file.policy)?,
            file.tls_creds
                .as_ref()
                .map(|dir| TlsSettings {
                    dir: PathBuf::from(dir),
                    verify_peer: file.tls_verify_peer.unwrap_or(true),
                    hostname: file.tls_hostname.clone(),
                })
                .as_ref(),
            trust,
        )?;
        listener.rewrite.source_reference = file
            .source_reference
            .as_deref()
            .map(|path| SourceReference::load(std::path::Path::new(path)))
            .transpose()?
            .map(Arc::new);
        listener.checked()
    }

    /// A source reference only serves a rewrite.
    fn checked(self) -> Result<ListenerConfig, ProxyError> {
        if self.rewrite.dest.is_none() && self.rewrite.source_reference.is_some() {
            return Err(ProxyError::InvalidConfig(
                "a source reference without a destination profile does nothing".into(),
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn run_config(toml: &str, flags: &[&str]) -> Result<RunConfig, ProxyError> {
        // Each call its own directory: tests run in parallel, and the file goes with the test.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let listener =
            "[[listener]]\nlisten = \"tcp:127.0.0.1:0\"\nupstream = \"tcp:127.0.0.1:1\"\n";
        std::fs::write(&path, format!("{toml}{listener}")).unwrap();
        let path = path.display().to_string();
        let mut argv = vec!["migproxy", "run", "--config", &path, "--admin", "none"];
        argv.extend_from_slice(flags);
        let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not a run command");
        };
        RunConfig::from_args(&args)
    }

    #[test]
    fn the_unreferenced_device_phase_refuses_by_default_and_the_file_or_flag_allows_it() {
        let defaulted = run_config("", &[]).unwrap();
        assert_eq!(
            defaulted.unreferenced_device_phase,
            UnreferencedDevicePhase::Refuse
        );
        let allowed = run_config("unreferenced_device_phase = \"allow\"\n", &[]).unwrap();
        assert_eq!(
            allowed.unreferenced_device_phase,
            UnreferencedDevicePhase::Allow
        );
        // The flag wins over the file.
        let flagged = run_config(
            "unreferenced_device_phase = \"allow\"\n",
            &["--unreferenced-device-phase", "refuse"],
        )
        .unwrap();
        assert_eq!(
            flagged.unreferenced_device_phase,
            UnreferencedDevicePhase::Refuse
        );
        let wrong = run_config("unreferenced_device_phase = \"maybe\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            wrong.contains("unreferenced_device_phase = \"maybe\": expected refuse or allow"),
            "{wrong}"
        );
    }
}
