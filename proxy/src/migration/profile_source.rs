//! Where a listener's register profiles come from: a file read (and validated) at startup, or an
//! `https://` (pinned CA) or `http://` URL - typically another migproxy's `/profiles/NAME` -
//! fetched when each migration starts, so the destination host advertises its current register
//! list. The fetch happens only once a main channel has identified itself and its upstream has
//! been checked against our own listeners, so no loop can make it repeat per hop.

use std::sync::Arc;

use migproxy_config::{Policy, Profile};

use crate::error::{Abort, HttpFailure, ProfileRole, ProxyError};
use crate::migration::source_reference::SourceReference;
use crate::net::http_client::{self, FetchBudget};
use tokio_rustls::TlsConnector;

#[derive(Clone)]
pub enum ProfileSource {
    File {
        path: String,
        profile: Arc<Profile>,
    },
    /// `trust`: the pinned CA's connector, for `https://` (None for `http://`).
    Url {
        url: String,
        trust: Option<TlsConnector>,
    },
}

impl std::fmt::Debug for ProfileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProfileSource::File { path, .. } => f.debug_struct("File").field("path", path).finish(),
            ProfileSource::Url { url, trust } => f
                .debug_struct("Url")
                .field("url", url)
                .field("pinned_ca", &trust.is_some())
                .finish(),
        }
    }
}

impl ProfileSource {
    /// A file is loaded now (configuration errors surface before binding); a URL is only checked.
    /// An `https://` URL needs `trust` (the pinned CA); an `http://` URL is refused when a CA is
    /// pinned (the operator asked for authenticated profiles) and otherwise accepted with a
    /// warning, since anyone on the path can then choose the registers.
    pub fn open(spec: &str, trust: Option<&TlsConnector>) -> Result<ProfileSource, ProxyError> {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            let parsed =
                http_client::HttpUrl::parse(spec).map_err(|failure| ProxyError::ProfileUrl {
                    url: spec.to_owned(),
                    failure,
                })?;
            if parsed.tls_host.is_some() && trust.is_none() {
                return Err(ProxyError::ProfileUrl {
                    url: spec.to_owned(),
                    failure: HttpFailure::HttpsWithoutCa,
                });
            }
            if parsed.tls_host.is_none() && trust.is_some() {
                // A pinned CA says profiles must be authenticated: never fetch one without it.
                return Err(ProxyError::ProfileUrl {
                    url: spec.to_owned(),
                    failure: HttpFailure::PlainHttpWithCa,
                });
            }
            if parsed.tls_host.is_none() {
                tracing::warn!(url = spec, "profile fetched over plain http: anyone on the path can choose which registers are dropped or filled (serve the admin address with --admin-tls-creds and use https:// with --profile-ca)");
            }
            return Ok(ProfileSource::Url {
                url: spec.to_owned(),
                trust: parsed.tls_host.and(trust.cloned()),
            });
        }
        if spec.contains("://") {
            return Err(ProxyError::InvalidConfig(format!(
                "profile {spec:?}: only files, https:// and http:// URLs are supported"
            )));
        }
        let profile =
            Profile::load(std::path::Path::new(spec)).map_err(|source| ProxyError::Profile {
                spec: spec.to_owned(),
                source,
            })?;
        Ok(ProfileSource::File {
            path: spec.to_owned(),
            profile: Arc::new(profile),
        })
    }

    pub async fn get(&self, budget: FetchBudget) -> Result<Arc<Profile>, ProxyError> {
        match self {
            ProfileSource::File { profile, .. } => Ok(Arc::clone(profile)),
            ProfileSource::Url { url, trust } => {
                let failed = |failure| ProxyError::Http {
                    url: url.clone(),
                    failure,
                };
                let (status, body) = http_client::get(url, budget, trust.as_ref()).await?;
                if status != 200 {
                    return Err(failed(HttpFailure::Status(status)));
                }
                let text = std::str::from_utf8(&body).map_err(|_| failed(HttpFailure::NotUtf8))?;
                let profile =
                    Profile::from_json(text).map_err(|e| failed(HttpFailure::InvalidProfile(e)))?;
                tracing::info!(%url, "destination profile fetched");
                Ok(Arc::new(profile))
            }
        }
    }
}

/// The rewrite a listener applies (no destination profile: a checking relay).
#[derive(Debug, Clone, Default)]
pub struct RewriteConfig {
    pub dest: Option<ProfileSource>,
    pub source: Option<ProfileSource>,
    /// The description of a fresh VM of the source's configuration: the exact end of the device
    /// phase, and the layout of postcopy packages.
    pub source_reference: Option<Arc<SourceReference>>,
    pub policy: Policy,
    /// Deadline and size budget of each profile fetch (`--profile-fetch-timeout`,
    /// `--max-profile`).
    pub fetch: FetchBudget,
}

/// The profiles of one migration, resolved.
#[derive(Debug, Clone)]
pub struct RewriteSetup {
    pub dest: Arc<Profile>,
    pub source: Option<Arc<Profile>>,
    /// See `RewriteConfig::source_reference`.
    pub source_reference: Option<Arc<SourceReference>>,
    pub policy: Policy,
}

impl RewriteConfig {
    /// It rewrites without the source's reference description: the end of its device phase can
    /// only be recognised by a candidate the guest could forge.
    pub fn rewrites_unreferenced(&self) -> bool {
        self.dest.is_some() && self.source_reference.is_none()
    }

    pub async fn resolve(&self) -> Result<Option<RewriteSetup>, ProxyError> {
        let Some(dest) = &self.dest else {
            return Ok(None);
        };
        let unavailable = |role| {
            move |source| {
                ProxyError::Aborted(Abort::ProfileUnavailable {
                    role,
                    source: Box::new(source),
                })
            }
        };
        let dest = dest
            .get(self.fetch)
            .await
            .map_err(unavailable(ProfileRole::Destination))?;
        let source = match &self.source {
            Some(source) => Some(
                source
                    .get(self.fetch)
                    .await
                    .map_err(unavailable(ProfileRole::Source))?,
            ),
            None => None,
        };
        Ok(Some(RewriteSetup {
            dest,
            source,
            source_reference: self.source_reference.clone(),
            policy: self.policy.clone(),
        }))
    }
}
