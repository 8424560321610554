//! Where credentials come from. A token source turns a service-account identity into a registry
//! credential; each source lives in its own module and is one variant of [`TokenSourceConfig`],
//! so adding a source touches that enum and a new module, nothing else.
//!
//! A mint has two halves. Getting the identity: the service asks the API server for a token
//! of the namespace's ServiceAccount ([`TokenSourceConfig::mint`]), the kubelet hands the
//! credential provider the Pod's own ([`crate::credential_provider`]). Exchanging it
//! ([`TokenSourceConfig::exchange`]): the same code for both, given a [`Presented`] identity.

pub mod acr;
pub mod alibaba;
pub mod artifact_keeper;
pub mod artifactory;
pub mod chainguard;
pub mod cloudsmith;
pub mod declarative;
pub mod docker_hub;
pub mod ecr;
pub mod exchange;
pub mod gcp;
pub mod kubernetes;
pub mod quay;
pub mod sigv4;

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;

use crate::cluster::KubeError;
use crate::core::credential::{Credential, Sensitive};
use crate::core::jwt;
use crate::http;

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
    /// JFrog Artifactory's OIDC integration (a JSON token exchange).
    Artifactory(artifactory::ArtifactorySource),
    /// Cloudsmith's OIDC endpoint for a service account.
    Cloudsmith(cloudsmith::CloudsmithSource),
    /// Artifact Keeper's CI token endpoint.
    ArtifactKeeper(artifact_keeper::ArtifactKeeperSource),
    /// Docker Hub's organisation OIDC connections.
    DockerHub(docker_hub::DockerHubSource),
    /// Alibaba Cloud STS (RRSA), then the registry's signed GetAuthorizationToken.
    Alibaba(alibaba::AlibabaSource),
    /// One request described in the config: the long tail.
    Declarative(declarative::DeclarativeSource),
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
/// ([`TokenSourceConfig::token_audience`]), whose it is, and the annotations of its
/// ServiceAccount that the source reads ([`TokenSourceConfig::annotation_keys`]).
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
        "artifactory",
        "cloudsmith",
        "artifactKeeper",
        "dockerHub",
        "alibaba",
        "declarative",
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
            "artifactory" => Ok(Self::Artifactory(map.next_value()?)),
            "cloudsmith" => Ok(Self::Cloudsmith(map.next_value()?)),
            "artifactKeeper" => Ok(Self::ArtifactKeeper(map.next_value()?)),
            "dockerHub" => Ok(Self::DockerHub(map.next_value()?)),
            "alibaba" => Ok(Self::Alibaba(map.next_value()?)),
            "declarative" => Ok(Self::Declarative(map.next_value()?)),
            other => Err(serde::de::Error::unknown_field(other, Self::NAMES)),
        }
    }

    /// Whether the exchanged token comes from the injector's own token file (one identity for
    /// all) rather than from each namespace's ServiceAccount.
    pub fn uses_token_file(&self) -> bool {
        matches!(
            self.service_account_token(),
            Some(kubernetes::ServiceAccountToken::File(_))
        )
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
            Self::Artifactory(_) => "artifactory",
            Self::Cloudsmith(_) => "cloudsmith",
            Self::ArtifactKeeper(_) => "artifactKeeper",
            Self::DockerHub(_) => "dockerHub",
            Self::Alibaba(_) => "alibaba",
            Self::Declarative(_) => "declarative",
        }
    }

    pub fn validate(&self, path: &str, checks: Checks, err: &mut impl FnMut(&str, String)) {
        let path = format!("{path}.{}", self.name());
        let path = path.as_str();
        match self {
            Self::Kubernetes(k) => k.validate(path, checks.renew_before, err),
            Self::Chainguard(s) => s.validate(path, checks, err),
            Self::Quay(s) => s.validate(path, checks, err),
            Self::Ecr(s) => s.validate(path, checks, err),
            Self::Gcp(s) => s.validate(path, checks, err),
            Self::Acr(s) => s.validate(path, checks, err),
            Self::TokenExchange(s) => s.validate(path, checks, err),
            Self::Artifactory(s) => s.validate(path, checks, err),
            Self::Cloudsmith(s) => s.validate(path, checks, err),
            Self::ArtifactKeeper(s) => s.validate(path, checks, err),
            Self::DockerHub(s) => s.validate(path, checks, err),
            Self::Alibaba(s) => s.validate(path, checks, err),
            Self::Declarative(s) => s.validate(path, checks, err),
        }
    }

    /// Where an exchanging source gets the token it presents; `None` for `kubernetes`, whose
    /// token is the credential itself.
    pub fn service_account_token(&self) -> Option<&kubernetes::ServiceAccountToken> {
        self.presents().ok()
    }

    /// The token source of an exchanging source, or the `kubernetes` source itself.
    fn presents(&self) -> Result<&kubernetes::ServiceAccountToken, &kubernetes::KubernetesSource> {
        match self {
            Self::Kubernetes(k) => Err(k),
            Self::Chainguard(s) => Ok(&s.service_account_token),
            Self::Quay(s) => Ok(&s.service_account_token),
            Self::Ecr(s) => Ok(&s.service_account_token),
            Self::Gcp(s) => Ok(&s.service_account_token),
            Self::Acr(s) => Ok(&s.service_account_token),
            Self::TokenExchange(s) => Ok(&s.service_account_token),
            Self::Artifactory(s) => Ok(&s.service_account_token),
            Self::Cloudsmith(s) => Ok(&s.service_account_token),
            Self::ArtifactKeeper(s) => Ok(&s.service_account_token),
            Self::DockerHub(s) => Ok(&s.service_account_token),
            Self::Alibaba(s) => Ok(&s.service_account_token),
            Self::Declarative(s) => Ok(&s.service_account_token),
        }
    }

    /// The ServiceAccount a TokenRequest of this source is for (with one Secret per namespace;
    /// per ServiceAccount it is each one) and the lifetime it asks; `None` when the source
    /// reads a token file and asks the API server for nothing.
    pub fn token_request(&self) -> Option<(&str, i64)> {
        match self.presents() {
            Err(k) => Some((&k.service_account, k.expiration_seconds)),
            Ok(t) => t.token_request(),
        }
    }

    /// The `aud` the presented service-account token must carry.
    pub fn token_audience(&self) -> String {
        match self {
            Self::Kubernetes(k) => k.audience.clone(),
            Self::Chainguard(s) => s.audience.clone(),
            Self::Quay(s) => s.audience.clone(),
            Self::Ecr(s) => s.audience.clone(),
            Self::Gcp(s) => s.token_audience(),
            Self::Acr(s) => s.audience.clone(),
            Self::TokenExchange(s) => s.subject_token_audience.clone(),
            Self::Artifactory(s) => s.audience.clone(),
            Self::Cloudsmith(s) => s.audience.clone(),
            Self::ArtifactKeeper(s) => s.audience.clone(),
            Self::DockerHub(s) => s.audience.clone(),
            Self::Alibaba(s) => s.audience.clone(),
            Self::Declarative(s) => s.audience.clone(),
        }
    }

    /// The ServiceAccount annotations this source reads, because the config leaves the
    /// setting out (`eks.amazonaws.com/role-arn`, `azure.workload.identity/*`).
    pub fn annotation_keys(&self) -> Vec<&'static str> {
        match self {
            Self::Ecr(s) => s.annotation_keys(),
            Self::Acr(s) => s.annotation_keys(),
            _ => Vec::new(),
        }
    }

    /// Mints a fresh credential for the context's namespace; `host` is the registry entry's.
    pub async fn mint(&self, cx: MintContext<'_>, host: &str) -> Result<Credential, MintError> {
        let token_source = match self.presents() {
            Ok(t) => t,
            Err(k) => return k.mint(cx.kube, cx.namespace, cx.service_account).await,
        };
        let service_account = token_source.service_account(cx);
        let keys = self.annotation_keys();
        // Settings first: without them no token is requested.
        let annotations = match (keys.is_empty(), service_account) {
            (true, _) => BTreeMap::new(),
            (false, Some(sa)) => {
                kubernetes::service_account_annotations(cx.kube, cx.namespace, sa).await?
            }
            (false, None) => {
                return Err(MintError::Settings {
                    source_name: self.name(),
                    message: format!(
                        "with a token file there is no ServiceAccount to read {} from: set it in the config",
                        keys.join(", ")
                    ),
                })
            }
        };
        if let (Some(key), Some(sa)) = (
            keys.iter().find(|k| !annotations.contains_key(**k)),
            service_account,
        ) {
            return Err(MintError::Settings {
                source_name: self.name(),
                message: format!(
                    "ServiceAccount {}/{sa} has no {key} annotation and the config sets no {}",
                    cx.namespace,
                    setting_for(key)
                ),
            });
        }
        let token = token_source.fetch(cx, &self.token_audience()).await?;
        let presented = Presented {
            token: &token,
            namespace: cx.namespace,
            service_account,
            annotations: &annotations,
        };
        self.exchange(cx.http, host, &presented).await
    }

    /// The credential for `host` from an identity already in hand: the token exchanged at the
    /// source's endpoints, or for `kubernetes` the token itself.
    pub async fn exchange(
        &self,
        http: &http::HttpClient,
        host: &str,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        match self {
            Self::Kubernetes(k) => k.pass_through(id),
            Self::Chainguard(s) => s.exchange(http, id).await,
            Self::Quay(s) => s.exchange(http, host, id).await,
            Self::Ecr(s) => s.exchange(http, id).await,
            Self::Gcp(s) => s.exchange(http, id).await,
            Self::Acr(s) => s.exchange(http, host, id).await,
            Self::TokenExchange(s) => s.exchange(http, id).await,
            Self::Artifactory(s) => s.exchange(http, host, id).await,
            Self::Cloudsmith(s) => s.exchange(http, id).await,
            Self::ArtifactKeeper(s) => s.exchange(http, host, id).await,
            Self::DockerHub(s) => s.exchange(http, id).await,
            Self::Alibaba(s) => s.exchange(http, id).await,
            Self::Declarative(s) => s.exchange(http, id).await,
        }
    }
}

/// The config field a ServiceAccount annotation stands in for.
pub fn setting_for(annotation: &str) -> &'static str {
    match annotation {
        ecr::ROLE_ANNOTATION => "ecr.roleArn",
        acr::CLIENT_ID_ANNOTATION => "acr.clientId",
        acr::TENANT_ID_ANNOTATION => "acr.tenantId",
        _ => "setting",
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
