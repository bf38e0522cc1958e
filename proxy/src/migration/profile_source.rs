//! Where a listener's register profiles come from: a file read (and validated) at startup, or an
//! `http://` URL - typically another migproxy's `/profiles/NAME` - fetched when each migration
//! starts, so the destination host advertises its current register list.

use std::sync::Arc;
use std::time::Duration;

use migproxy_config::{Policy, Profile};

use crate::error::{Abort, HttpFailure, ProfileRole, ProxyError};
use crate::net::http_client;

#[derive(Debug, Clone)]
pub enum ProfileSource {
    File { path: String, profile: Arc<Profile> },
    Url(String),
}

impl ProfileSource {
    /// A file is loaded now (configuration errors surface before binding); a URL is only checked.
    pub fn open(spec: &str) -> Result<ProfileSource, ProxyError> {
        if spec.starts_with("http://") {
            http_client::HttpUrl::parse(spec).map_err(|failure| ProxyError::ProfileUrl {
                url: spec.to_owned(),
                failure,
            })?;
            return Ok(ProfileSource::Url(spec.to_owned()));
        }
        if spec.contains("://") {
            return Err(ProxyError::InvalidConfig(format!(
                "profile {spec:?}: only files and http:// URLs are supported"
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

    pub async fn get(&self, timeout: Duration) -> Result<Arc<Profile>, ProxyError> {
        match self {
            ProfileSource::File { profile, .. } => Ok(Arc::clone(profile)),
            ProfileSource::Url(url) => {
                let failed = |failure| ProxyError::Http {
                    url: url.clone(),
                    failure,
                };
                let (status, body) = http_client::get(url, timeout).await?;
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
    pub policy: Policy,
    pub fetch_timeout: Duration,
}

/// The profiles of one migration, resolved.
#[derive(Debug, Clone)]
pub struct RewriteSetup {
    pub dest: Arc<Profile>,
    pub source: Option<Arc<Profile>>,
    pub policy: Policy,
}

impl RewriteConfig {
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
            .get(self.fetch_timeout)
            .await
            .map_err(unavailable(ProfileRole::Destination))?;
        let source = match &self.source {
            Some(source) => Some(
                source
                    .get(self.fetch_timeout)
                    .await
                    .map_err(unavailable(ProfileRole::Source))?,
            ),
            None => None,
        };
        Ok(Some(RewriteSetup {
            dest,
            source,
            policy: self.policy.clone(),
        }))
    }
}
