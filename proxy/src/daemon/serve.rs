//! `migproxy run`: bind every listener and the admin address, serve until SIGTERM, drain, exit 0.

use std::sync::Arc;
use std::time::Duration;

use migproxy_codec::DescriptionCache;

use crate::cli::RunArgs;
use crate::cli::UnreferencedDevicePhase;
use crate::daemon::accept;
use crate::daemon::admin::{self, AdminState};
use crate::daemon::settings::RunConfig;
use crate::daemon::shutdown::{self, Shutdown};
use crate::error::ProxyError;
use crate::migration::admission::Admission;
use crate::migration::connection::ListenerCtx;
use crate::migration::log_budget::TurnedAwayLog;
use crate::migration::metrics::Metrics;
use crate::migration::profile_source::ProfileSource;
use crate::migration::pump::ChannelSettings;
use crate::migration::read_buffers::ReadBuffers;
use crate::migration::registry::Registry;
use crate::net::addr::{Address, Upstream};
use crate::net::listener::{BoundListener, Interception};
use crate::net::own_addresses::OwnAddresses;

pub fn main(args: RunArgs) -> Result<(), ProxyError> {
    let config = RunConfig::from_args(&args)?;
    init_logging(config.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ProxyError::io("starting the runtime", e))?;
    runtime.block_on(serve(config))
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless: the first subscriber stays.
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Bind everything, serve until SIGTERM/SIGINT, drain, return.
pub async fn serve(config: RunConfig) -> Result<(), ProxyError> {
    // Installed first: a signal arriving during startup must drain, not kill.
    let mut signals = shutdown::Signals::install()?;
    let shutdown = Shutdown::default();
    let metrics = Arc::new(Metrics::default());
    let started = start(&config, &shutdown, &metrics).await?;
    let name = signals.recv().await;
    tracing::info!(signal = name, "shutting down: no new migrations accepted");
    shutdown.drain(&metrics, config.drain_timeout).await;
    // Let closed migrations log their summaries before the runtime goes away.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while metrics.active() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(started);
    tracing::info!("stopped");
    Ok(())
}

/// Handles of a started daemon (for tests: the bound addresses).
#[derive(Debug)]
pub struct Started {
    pub listeners: Vec<Address>,
    pub admin: Option<Address>,
}

/// Bind every listener and the admin address, then spawn their tasks.
pub async fn start(
    config: &RunConfig,
    shutdown: &Shutdown,
    metrics: &Arc<Metrics>,
) -> Result<Started, ProxyError> {
    let admission = Admission::new(config.budgets);
    let own = Arc::new(OwnAddresses::default());
    let mut bound = Vec::new();
    for listener in &config.listeners {
        let description_cache = DescriptionCache::new();
        if let Some(reference) = &listener.rewrite.source_reference {
            // A rewriting relay's source normally sends the reference's own description: its
            // first migration already reuses the parse (and the check against the reference).
            description_cache
                .seed(&reference.description, &reference.layout)
                .map_err(|mismatch| {
                    ProxyError::InvalidConfig(format!(
                        "source reference of listener {}: {mismatch}",
                        listener.listen
                    ))
                })?;
        }
        let ctx = Arc::new(ListenerCtx {
            listen: listener.listen.to_string(),
            upstream: listener.upstream.clone(),
            rewrite: listener.rewrite.clone(),
            channel: ChannelSettings {
                limits: config.limits.clone(),
                description_timeout: config.description_timeout,
                unrecoverable_postcopy: config.unrecoverable_postcopy,
                write_stall_timeout: config.write_stall_timeout,
                dial_timeout: config.dial_timeout,
                unreferenced_device_phase: config.unreferenced_device_phase,
                description_cache,
                read_buffers: ReadBuffers::default(),
            },
            identify_timeout: config.identify_timeout,
            raw_relay: config.raw_relay,
            metrics: Arc::clone(metrics),
            close_all: shutdown.close_all.clone(),
            registry: Registry::default(),
            tls: listener.tls.clone(),
            admission: Arc::clone(&admission),
            own: Arc::clone(&own),
            turned_away_log: TurnedAwayLog::default(),
        });
        let interception = match listener.upstream {
            Upstream::Tproxy => Interception::Tproxy,
            Upstream::OriginalDst => Interception::Redirect,
            Upstream::Fixed(_) | Upstream::PortRange { .. } => Interception::None,
        };
        for addr in listener.listen.addresses() {
            bound.push((
                BoundListener::bind_with(&addr, interception).await?,
                Arc::clone(&ctx),
            ));
        }
    }
    // Every listener is bound (real ports known): no upstream may be one of them.
    own.set(
        bound
            .iter()
            .filter_map(|(socket, _): &(BoundListener, _)| socket.local_address())
            .collect(),
    );
    for (_, ctx) in &bound {
        if let Upstream::Fixed(upstream) = &ctx.upstream {
            for resolved in resolve_fixed(upstream).await {
                if own.contains(&resolved) {
                    return Err(ProxyError::InvalidConfig(format!(
                        "upstream {upstream} of listener {} is one of migproxy's own listeners: it would forward to itself",
                        ctx.listen
                    )));
                }
            }
        }
    }
    let admin = match &config.admin {
        Some(addr) => Some(BoundListener::bind(addr).await?),
        None => None,
    };
    let mut started = Started {
        listeners: Vec::new(),
        admin: None,
    };
    for (socket, ctx) in bound {
        let local = socket.local_address();
        let mode = match &ctx.rewrite.dest {
            _ if ctx.tls.is_some() && ctx.rewrite.dest.is_none() => {
                "checking relay, tls".to_owned()
            }
            None => "checking relay".to_owned(),
            Some(ProfileSource::File { path, .. }) => format!("rewrite to profile {path}"),
            Some(ProfileSource::Url { url, .. }) => format!("rewrite to profile {url}"),
        };
        if ctx.tls.as_ref().is_some_and(|tls| !tls.verify_peer) {
            tracing::warn!(listen = %ctx.listen, "tls without --tls-verify-peer: any client that completes a handshake and sends QEVM reaches the destination authenticated as migproxy");
        }
        if ctx.rewrite.rewrites_unreferenced() {
            match ctx.channel.unreferenced_device_phase {
                UnreferencedDevicePhase::Refuse => {
                    tracing::warn!(listen = %ctx.listen, "rewriting without --source-reference: every migration on this listener is refused at its first bytes (a guest could end the device phase early); give --source-reference FILE (made with `migproxy profile capture --save-reference FILE`) or --unreferenced-device-phase allow")
                }
                UnreferencedDevicePhase::Allow => {
                    tracing::warn!(listen = %ctx.listen, "rewriting without --source-reference (--unreferenced-device-phase allow): a guest that forges the end of the device phase in its own state can fail its own migration; nothing corrupt reaches the destination")
                }
            }
        }
        if let Some(local) = &local {
            tracing::info!(listen = %local, upstream = %ctx.upstream, %mode, "listening");
            started.listeners.push(local.clone());
        }
        tokio::spawn(accept::run(socket, ctx, shutdown.clone()));
    }
    if let Some(socket) = admin {
        let local = socket.local_address();
        if let Some(local) = &local {
            tracing::info!(admin = %local, profiles = config.served_profiles.len(), "admin listening");
            started.admin = Some(local.clone());
        }
        let state = Arc::new(AdminState {
            metrics: Arc::clone(metrics),
            shutdown: shutdown.clone(),
            profiles: config.served_profiles.clone(),
            limits: config.admin_limits.clone(),
        });
        tokio::spawn(admin::run(socket, state));
    }
    Ok(started)
}

/// The addresses a fixed upstream names (a host name may resolve to several); unresolvable names
/// are left to fail when dialed.
async fn resolve_fixed(upstream: &Address) -> Vec<Address> {
    match upstream {
        Address::Tcp { host, port } => {
            match tokio::net::lookup_host(Address::host_port(host, *port)).await {
                Ok(found) => found.map(Address::from_socket_addr).collect(),
                Err(_) => vec![upstream.clone()],
            }
        }
        Address::Unix(_) => vec![upstream.clone()],
    }
}
