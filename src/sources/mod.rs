//! Where credentials come from. A token source turns a namespace's identity into a registry
//! credential; each source lives in its own module and is one variant of [`TokenSourceConfig`],
//! so adding a source touches that enum and a new module, nothing else.

pub mod acr;
pub mod chainguard;
pub mod ecr;
pub mod exchange;
pub mod gcp;
pub mod http;
pub mod jwt;
pub mod kubernetes;
pub mod quay;
pub mod sigv4;

use std::time::Duration;

use jiff::Timestamp;

use crate::cluster::KubeError;
use crate::core::credential::{Credential, Sensitive};

/// The token sources, as the config file names them (`registries[].<source>`).
#[derive(Clone, Debug)]
pub enum TokenSourceConfig {
    /// A TokenRequest token for a ServiceAccount of the namespace, used as the password.
    Kubernetes(kubernetes::KubernetesSource),
    /// Chainguard's STS: the SA token exchanged for a cgr.dev token of an assumable identity.
    Chainguard(chainguard::ChainguardSource),
    /// Quay robot-account federation.
    Quay(quay::QuaySource),
    /// AWS STS web identity, then ECR GetAuthorizationToken.
    Ecr(ecr::EcrSource),
    /// Google STS (workload identity federation), optionally impersonating a service account.
    Gcp(gcp::GcpSource),
    /// Entra workload identity, then the registry's `/oauth2/exchange`.
    Acr(acr::AcrSource),
    /// Any RFC 8693 token-exchange endpoint.
    TokenExchange(exchange::TokenExchangeSource),
}

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

impl TokenSourceConfig {
    /// The config keys, one per variant.
    pub const NAMES: &'static [&'static str] = &[
        "kubernetes",
        "chainguard",
        "quay",
        "ecr",
        "gcp",
        "acr",
        "tokenExchange",
    ];

    /// Reads the source named `key` from the value that follows it in a registry entry.
    pub fn from_entry<'de, A: serde::de::MapAccess<'de>>(
        key: &str,
        map: &mut A,
    ) -> Result<Self, A::Error> {
        match key {
            "kubernetes" => Ok(Self::Kubernetes(map.next_value()?)),
            "chainguard" => Ok(Self::Chainguard(map.next_value()?)),
            "quay" => Ok(Self::Quay(map.next_value()?)),
            "ecr" => Ok(Self::Ecr(map.next_value()?)),
            "gcp" => Ok(Self::Gcp(map.next_value()?)),
            "acr" => Ok(Self::Acr(map.next_value()?)),
            "tokenExchange" => Ok(Self::TokenExchange(map.next_value()?)),
            other => Err(serde::de::Error::unknown_field(other, Self::NAMES)),
        }
    }

    /// Whether the exchanged token comes from the injector's own token file (one identity for
    /// all) rather than from each namespace's ServiceAccount.
    pub fn uses_token_file(&self) -> bool {
        let token = match self {
            Self::Kubernetes(_) => return false,
            Self::Chainguard(s) => &s.service_account_token,
            Self::Quay(s) => &s.service_account_token,
            Self::Ecr(s) => &s.service_account_token,
            Self::Gcp(s) => &s.service_account_token,
            Self::Acr(s) => &s.service_account_token,
            Self::TokenExchange(s) => &s.service_account_token,
        };
        matches!(token, kubernetes::ServiceAccountToken::File(_))
    }

    /// The name used in logs, metrics and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kubernetes(_) => "kubernetes",
            Self::Chainguard(_) => "chainguard",
            Self::Quay(_) => "quay",
            Self::Ecr(_) => "ecr",
            Self::Gcp(_) => "gcp",
            Self::Acr(_) => "acr",
            Self::TokenExchange(_) => "tokenExchange",
        }
    }

    pub fn validate(
        &self,
        path: &str,
        renew_before: Option<Duration>,
        err: &mut impl FnMut(&str, String),
    ) {
        match self {
            Self::Kubernetes(k) => k.validate(&format!("{path}.kubernetes"), renew_before, err),
            Self::Chainguard(s) => s.validate(&format!("{path}.chainguard"), err),
            Self::Quay(s) => s.validate(&format!("{path}.quay"), err),
            Self::Ecr(s) => s.validate(&format!("{path}.ecr"), err),
            Self::Gcp(s) => s.validate(&format!("{path}.gcp"), err),
            Self::Acr(s) => s.validate(&format!("{path}.acr"), err),
            Self::TokenExchange(s) => s.validate(&format!("{path}.tokenExchange"), err),
        }
    }

    /// Mints a fresh credential for the context's namespace; `host` is the registry entry's.
    pub async fn mint(&self, cx: MintContext<'_>, host: &str) -> Result<Credential, MintError> {
        match self {
            Self::Kubernetes(k) => k.mint(cx.kube, cx.namespace, cx.service_account).await,
            Self::Chainguard(s) => s.mint(cx).await,
            Self::Quay(s) => s.mint(cx, host).await,
            Self::Ecr(s) => s.mint(cx).await,
            Self::Gcp(s) => s.mint(cx).await,
            Self::Acr(s) => s.mint(cx, host).await,
            Self::TokenExchange(s) => s.mint(cx).await,
        }
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

/// Default endpoints are https; an override may be http only towards loopback (a local proxy).
pub(crate) fn validate_endpoint(path: &str, url: &str, err: &mut impl FnMut(&str, String)) {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "https" && u.host_str().is_some() => {}
        Ok(u)
            if u.scheme() == "http"
                && matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")) => {}
        Ok(_) => err(path, format!("{url:?} must be an https URL")),
        Err(e) => err(path, format!("{url:?} is not a URL: {e}")),
    }
}

/// Trims a trailing `/` so that paths can be appended.
pub(crate) fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}
