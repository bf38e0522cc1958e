//! The `migproxy run` configuration file (TOML): one or more listeners, each with its upstream,
//! profiles and policy, plus daemon-wide settings.
//!
//! ```toml
//! admin = "tcp:127.0.0.1:9444"        # /metrics, /healthz, /readyz, /profiles/NAME
//! drain_timeout_secs = 60             # after SIGTERM, how long live migrations may go on
//! description_timeout_ms = 2000       # silence allowed while the device state waits for its description
//! identify_timeout_ms = 1000          # a new connection must identify itself within this
//! write_stall_timeout_ms = 60000      # a peer that takes no bytes this long closes the migration
//! dial_timeout_ms = 10000             # connecting to the destination, tls handshake included
//! log_json = false
//! max_device_state_bytes = 268435456 # decoder limits: max_record_bytes, max_device_state_bytes,
//!                                     # max_description_bytes, max_packaged_bytes
//! raw_relay = "splice"                # or "copy": how multifd/preempt/return-path channels are
//!                                     # relayed (splice applies to plain TCP on both sides)
//! unrecoverable_postcopy = "refuse"   # or "allow": postcopy from a source that cannot take its
//!                                     # guest back after a refused switch
//! unreferenced_device_phase = "refuse"  # or "allow": a rewriting listener without
//!                                     # source_reference recognises the end of the device phase
//!                                     # without it (a guest can then fail its own migration)
//! max_migrations = 16                 # budgets: migrations in progress at once,
//! max_connections_per_source = 64     # open connections from one source host,
//! max_connections = 1024              # open migration connections in all,
//! max_admin_connections = 64          # open admin connections,
//! admin_header_timeout_ms = 5000      # time an admin client has to send its request headers
//! admin_tls_creds = "/etc/migproxy/admin-tls"  # optional: serve the admin address over https
//! profile_ca = "/etc/migproxy/profile-ca.pem"  # the only CA trusted for https:// profile URLs
//!                                     # (then http:// profile URLs are refused)
//! profile_fetch_timeout_ms = 5000     # a profile URL must answer in full within this
//! max_profile_bytes = 16777216        # largest profile body fetched from a URL
//! max_cpus = 512                      # stream budgets: max_cpus, max_cpregs (per vCPU),
//!                                     # max_rewrite_output_bytes, max_sections
//!
//! [profiles]                          # served on the admin address as /profiles/NAME
//! a64fx-7.2 = "/etc/migproxy/a64fx-7.2.json"
//!
//! [[listener]]
//! listen = "tcp:0.0.0.0:4444"
//! upstream = "tcp:dest.example:4444"  # or tcp:HOST:FIRST-LAST, original-dst, tproxy
//! dest_profile = "https://dest.example:9444/profiles/a64fx-7.2"  # a file, https:// or http:// URL
//! source_profile = "/etc/migproxy/a64fx-10.0.json"              # optional
//! source_reference = "/etc/migproxy/a64fx-10.0-reference.json"  # needed with dest_profile: the
//!                                     # source's reference description (or a saved fresh stream)
//! tls_creds = "/etc/pki/qemu"         # optional: TLS on both legs, QEMU's credential layout
//! tls_verify_peer = true              # default: require the source's client certificate
//! tls_hostname = "dest.example"       # optional: name in the destination's certificate
//!
//! [listener.policy]                   # same words as the command-line policy flags
//! on_extra = "drop-unused"
//! allow_drop = ["KVM_REG_ARM_VENDOR_HYP_BMAP_2"]
//! fill_missing = "auto"
//! on_id_mismatch = "auto"
//! ```
//!
//! This module only reads and shape-checks the file (unknown keys are errors, so a typo cannot
//! silently disable a setting); the daemon validates addresses, profiles and policy words before
//! it binds anything.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::ConfigError;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// Admin HTTP address (QEMU address syntax).
    pub admin: Option<String>,
    pub drain_timeout_secs: Option<u64>,
    pub description_timeout_ms: Option<u64>,
    pub identify_timeout_ms: Option<u64>,
    /// A write to a peer that makes no progress this long closes the migration.
    pub write_stall_timeout_ms: Option<u64>,
    /// Connecting to the destination, TLS handshake included.
    pub dial_timeout_ms: Option<u64>,
    pub log_json: Option<bool>,
    /// Decoder limits in bytes (DESIGN.md, "Everything else streams"); absent: the codec's defaults.
    pub max_record_bytes: Option<usize>,
    pub max_device_state_bytes: Option<usize>,
    pub max_description_bytes: Option<usize>,
    pub max_packaged_bytes: Option<usize>,
    /// `splice` or `copy`, as `--raw-relay` spells it.
    pub raw_relay: Option<String>,
    /// `refuse` or `allow`, as `--unrecoverable-postcopy` spells it.
    pub unrecoverable_postcopy: Option<String>,
    /// `refuse` or `allow`, as `--unreferenced-device-phase` spells it.
    pub unreferenced_device_phase: Option<String>,
    /// Budgets (README, "Budgets"); absent: the daemon's defaults.
    pub max_migrations: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_admin_connections: Option<usize>,
    pub admin_header_timeout_ms: Option<u64>,
    /// TLS on the admin address: a directory with `server-cert.pem` and `server-key.pem`.
    pub admin_tls_creds: Option<String>,
    /// The only CA trusted for `https://` profile URLs.
    pub profile_ca: Option<String>,
    /// Deadline and size budget of one profile fetch from a URL.
    pub profile_fetch_timeout_ms: Option<u64>,
    pub max_profile_bytes: Option<usize>,
    /// Budgets (counts and bytes; DESIGN.md, "Everything else streams"); absent: the codec's
    /// defaults.
    pub max_cpus: Option<usize>,
    pub max_cpregs: Option<usize>,
    pub max_rewrite_output_bytes: Option<usize>,
    pub max_sections: Option<usize>,
    /// Profiles advertised on the admin address: name -> file.
    #[serde(default)]
    pub profiles: BTreeMap<String, String>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerFile>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub listen: String,
    pub upstream: String,
    /// A profile file or an `https://` or `http://` URL.
    pub dest_profile: Option<String>,
    /// A profile file or an `https://` or `http://` URL.
    pub source_profile: Option<String>,
    /// The source's reference description (JSON) or a saved stream of a fresh VM of the
    /// source's configuration: the exact end of the device phase, and postcopy packages.
    pub source_reference: Option<String>,
    /// TLS on both legs: a QEMU-style credential directory.
    pub tls_creds: Option<String>,
    /// Require the source's client certificate (QEMU's verify-peer); absent: true.
    pub tls_verify_peer: Option<bool>,
    /// Name expected in the destination's certificate (default: the upstream host).
    pub tls_hostname: Option<String>,
    #[serde(default)]
    pub policy: PolicyFile,
}

/// Policy words exactly as the command-line flags spell them (`drop-unused`, `auto`, ...).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub on_extra: Option<String>,
    #[serde(default)]
    pub allow_drop: Vec<String>,
    pub fill_missing: Option<String>,
    pub on_id_mismatch: Option<String>,
}

impl RunFile {
    /// Parse a configuration text; `origin` names it in the error.
    pub fn from_toml(text: &str, origin: &str) -> Result<RunFile, ConfigError> {
        let file: RunFile = toml::from_str(text).map_err(|err| {
            // toml's message spans several lines (it quotes the source); one line is the contract.
            // The message itself may span lines too ("invalid string\nexpected ..."), found by
            // fuzz/fuzz_targets/config_toml.rs.
            let message = err.message().trim().lines().collect::<Vec<_>>().join("; ");
            let location = err
                .span()
                .map(|span| {
                    let line = text
                        .get(..span.start)
                        .map(|before| before.matches('\n').count().saturating_add(1))
                        .unwrap_or(0);
                    format!(" at line {line}")
                })
                .unwrap_or_default();
            ConfigError::Invalid(format!("{origin}{location}: {message}"))
        })?;
        if file.listeners.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{origin}: no [[listener]] table"
            )));
        }
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<RunFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::Invalid(format!("reading {}: {err}", path.display())))?;
        RunFile::from_toml(&text, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_example() {
        let text = r#"
admin = "tcp:127.0.0.1:9444"
drain_timeout_secs = 60
[profiles]
a64fx-7_2 = "/etc/p.json"
[[listener]]
listen = "tcp:0.0.0.0:4444"
upstream = "tcp:dest:4444"
dest_profile = "http://dest:9444/profiles/a64fx-7_2"
[listener.policy]
on_extra = "drop-unused"
allow_drop = ["TCR2_EL1"]
[[listener]]
listen = "unix:/run/m.sock"
upstream = "original-dst"
"#;
        let file = RunFile::from_toml(text, "test.toml").unwrap_or_default();
        assert_eq!(file.listeners.len(), 2);
        assert_eq!(file.drain_timeout_secs, Some(60));
        assert_eq!(
            file.listeners[0].policy.allow_drop,
            vec!["TCR2_EL1".to_owned()]
        );
        assert_eq!(file.profiles.len(), 1);
    }

    #[test]
    fn unknown_keys_fail_with_one_line() {
        let text = "[[listener]]\nlisten = \"tcp:a:1\"\nupstream = \"tcp:b:2\"\nupstraem = 1\n";
        let err = RunFile::from_toml(text, "bad.toml")
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("bad.toml at line 4"), "{err}");
        assert!(err.contains("upstraem"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(RunFile::from_toml("admin = \"tcp:a:1\"\n", "x").is_err());
    }

    #[test]
    fn a_broken_string_fails_with_one_line() {
        // toml reports "invalid string\nexpected ..." (found by the config_toml fuzz target).
        let err = RunFile::from_toml("admin = \"tcp:a:1\nx = 1\n", "bad.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("bad.toml at line 1"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn budgets_are_read() {
        let text = "max_cpus = 8\nmax_cpregs = 600\nmax_rewrite_output_bytes = 1048576\nmax_sections = 16\n[[listener]]\nlisten = \"tcp:a:1\"\nupstream = \"tcp:b:2\"\n";
        let file = RunFile::from_toml(text, "budgets.toml").unwrap_or_default();
        assert_eq!(file.max_cpus, Some(8));
        assert_eq!(file.max_cpregs, Some(600));
        assert_eq!(file.max_rewrite_output_bytes, Some(1 << 20));
        assert_eq!(file.max_sections, Some(16));
    }

    #[test]
    fn deadlines_and_the_profile_budget_are_read() {
        let text = "write_stall_timeout_ms = 30000\ndial_timeout_ms = 2000\nprofile_fetch_timeout_ms = 1500\nmax_profile_bytes = 65536\n[[listener]]\nlisten = \"tcp:a:1\"\nupstream = \"tcp:b:2\"\n";
        let file = RunFile::from_toml(text, "deadlines.toml").unwrap_or_default();
        assert_eq!(file.write_stall_timeout_ms, Some(30000));
        assert_eq!(file.dial_timeout_ms, Some(2000));
        assert_eq!(file.profile_fetch_timeout_ms, Some(1500));
        assert_eq!(file.max_profile_bytes, Some(65536));
    }
}
