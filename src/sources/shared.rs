//! What every source shares, beneath the dispatch in `mod.rs`: the error of a mint
//! ([`MintError`]), what a mint may use ([`MintContext`]) and start from ([`Presented`]), the
//! checks a credential passes before it is written (`checked`, and its lifetime from a JWT or an
//! `expires_in`), and endpoint validation.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;

use crate::cluster::KubeError;
use crate::core::credential::{Credential, Sensitive};
use crate::core::jwt;
use crate::http;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("TokenRequest for ServiceAccount {namespace}/{service_account} failed: {source}")]
    TokenRequest {
        namespace: String,
        service_account: String,
        #[source]
        source: KubeError,
    },
    #[error("TokenRequest for ServiceAccount {namespace}/{service_account} failed: reading the ServiceAccount: {source}")]
    ServiceAccount {
        namespace: String,
        service_account: String,
        #[source]
        source: KubeError,
    },
    #[error("reading the service-account token file {path} failed: {message}")]
    TokenFile { path: String, message: String },
    #[error("{source_name} returned an unusable credential: {reason}")]
    Unusable {
        source_name: &'static str,
        reason: String,
    },
    /// No answer: connection refused, TLS failure, timeout.
    #[error("{source_name}: {endpoint} failed: {message}")]
    Transport {
        source_name: &'static str,
        endpoint: String,
        message: String,
    },
    /// An answer other than 2xx; `detail` is the server's text, redacted and cut short.
    #[error("{source_name}: {endpoint} answered {status}: {detail}")]
    Refused {
        source_name: &'static str,
        endpoint: String,
        status: u16,
        detail: String,
    },
    /// Settings that are neither in the config nor on the ServiceAccount.
    #[error("{source_name}: {message}")]
    Settings {
        source_name: &'static str,
        message: String,
    },
}

/// A call out that failed is a failed mint, told the same way.
impl From<http::CallError> for MintError {
    fn from(e: http::CallError) -> Self {
        match e {
            http::CallError::Transport {
                source_name,
                endpoint,
                message,
            } => Self::Transport {
                source_name,
                endpoint,
                message,
            },
            http::CallError::Refused {
                source_name,
                endpoint,
                status,
                detail,
            } => Self::Refused {
                source_name,
                endpoint,
                status,
                detail,
            },
            http::CallError::Unusable {
                source_name,
                reason,
            } => Self::Unusable {
                source_name,
                reason,
            },
        }
    }
}

/// What checking a source's settings needs from the rest of the config.
#[derive(Clone, Copy, Debug, Default)]
pub struct Checks {
    /// `refresh.renewBefore`, which a lifetime must exceed.
    pub renew_before: Option<Duration>,
    /// `http.allowPlainHttp`: whether `http://` endpoints are accepted.
    pub allow_plain_http: bool,
}

/// What a mint may use: the API server (TokenRequests, ServiceAccounts), the HTTP client for
/// token endpoints, and the namespace whose identity is minted.
#[derive(Clone, Copy)]
pub struct MintContext<'a> {
    pub kube: &'a kube::Client,
    pub http: &'a http::HttpClient,
    pub namespace: &'a str,
    /// With `identityScope: serviceAccount`: the ServiceAccount minted for, instead of the one
    /// the source's config names.
    pub service_account: Option<&'a str>,
}

/// The identity an exchange starts from: a service-account token with the source's audience
/// ([`super::TokenSourceConfig::token_audience`]), whose it is, and the annotations of its
/// ServiceAccount that the source reads ([`super::TokenSourceConfig::annotation_keys`]).
#[derive(Clone, Copy, Debug)]
pub struct Presented<'a> {
    pub token: &'a Sensitive,
    pub namespace: &'a str,
    /// Unknown for a token read from a file.
    pub service_account: Option<&'a str>,
    pub annotations: &'a BTreeMap<String, String>,
}

impl Presented<'_> {
    /// `the ServiceAccount ns/sa` or `the token's ServiceAccount`, for messages.
    pub(crate) fn whose(&self) -> String {
        match self.service_account {
            Some(sa) => format!("ServiceAccount {}/{sa}", self.namespace),
            None => "the token's ServiceAccount".into(),
        }
    }

    /// The configured value, else the ServiceAccount's annotation `key`.
    pub(crate) fn setting(
        &self,
        source_name: &'static str,
        configured: &Option<String>,
        key: &str,
        field: &str,
    ) -> Result<String, MintError> {
        configured
            .clone()
            .or_else(|| self.annotations.get(key).cloned())
            .ok_or_else(|| MintError::Settings {
                source_name,
                message: format!(
                    "{} has no {key} annotation and the config sets no {field}",
                    self.whose()
                ),
            })
    }
}

/// A credential whose password is a JWT: its lifetime is the token's own `exp`.
pub(crate) fn from_jwt(
    source_name: &'static str,
    username: String,
    token: String,
) -> Result<Credential, MintError> {
    let expires_at = jwt::expiry(&token).map_err(|reason| MintError::Unusable {
        source_name,
        reason,
    })?;
    checked(source_name, username, Sensitive::new(token), expires_at)
}

/// A credential that lasts `expires_in` seconds from now, as OAuth answers say.
pub(crate) fn from_expires_in(
    source_name: &'static str,
    username: String,
    token: String,
    expires_in: i64,
) -> Result<Credential, MintError> {
    let expires_at = Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(expires_in))
        .map_err(|_| MintError::Unusable {
            source_name,
            reason: format!("expires_in {expires_in} is out of range"),
        })?;
    checked(source_name, username, Sensitive::new(token), expires_at)
}

/// Refuses empty or already expired credentials: writing one would only break pulls.
pub(crate) fn checked(
    source_name: &'static str,
    username: String,
    password: Sensitive,
    expires_at: Timestamp,
) -> Result<Credential, MintError> {
    let issued_at = Timestamp::now();
    if password.expose().is_empty() {
        return Err(MintError::Unusable {
            source_name,
            reason: "the token is empty".into(),
        });
    }
    if expires_at <= issued_at {
        return Err(MintError::Unusable {
            source_name,
            reason: format!("the token expired at {expires_at}, before it was used"),
        });
    }
    Ok(Credential {
        username,
        password,
        issued_at,
        expires_at,
    })
}

/// Endpoints are https; plain http only where `http.allowPlainHttp` says so.
pub fn validate_endpoint(
    path: &str,
    url: &str,
    allow_plain_http: bool,
    err: &mut impl FnMut(&str, String),
) {
    match reqwest::Url::parse(url) {
        Ok(u) if u.host_str().is_none() => err(path, format!("{url:?} has no host")),
        Ok(u) if u.scheme() == "https" => {}
        Ok(u) if u.scheme() == "http" && allow_plain_http => {}
        Ok(u) if u.scheme() == "http" => err(
            path,
            format!("{url:?} is plain http: use https, or set http.allowPlainHttp: true"),
        ),
        Ok(_) => err(path, format!("{url:?} must be an https URL")),
        Err(e) => err(path, format!("{url:?} is not a URL: {e}")),
    }
}

/// Trims a trailing `/` so that paths can be appended.
pub(crate) fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}
