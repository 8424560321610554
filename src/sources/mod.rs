//! Where credentials come from. A token source turns a service-account identity into a registry
//! credential; each source lives in its own module and is one variant of [`TokenSourceConfig`],
//! so adding a source touches that enum and a new module, nothing else.
//!
//! A mint has two halves. Getting the identity: the service asks the API server for a token
//! of the namespace's ServiceAccount ([`TokenSourceConfig::mint`]), the kubelet hands the
//! credential provider the Pod's own ([`crate::credential_provider`]). Exchanging it
//! ([`TokenSourceConfig::exchange`]): the same code for both, given a [`Presented`] identity.

pub(crate) mod acr;
pub mod alibaba;
pub(crate) mod artifact_keeper;
pub(crate) mod artifactory;
pub(crate) mod chainguard;
pub(crate) mod cloudsmith;
pub(crate) mod declarative;
pub(crate) mod docker_hub;
pub(crate) mod ecr;
pub(crate) mod exchange;
pub(crate) mod gcp;
pub(crate) mod kubernetes;
pub(crate) mod quay;
pub(crate) mod shared;
pub mod sigv4;

use std::collections::BTreeMap;

pub(crate) use shared::{base, checked, from_expires_in, from_jwt};
pub use shared::{validate_endpoint, Checks, MintContext, MintError, Presented};

use crate::core::credential::{Credential, Sensitive};
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

impl TokenSourceConfig {
    /// The config keys, one per variant.
    pub(crate) const NAMES: &'static [&'static str] = &[
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
    pub(crate) fn from_entry<'de, A: serde::de::MapAccess<'de>>(
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
    pub(crate) fn uses_token_file(&self) -> bool {
        matches!(
            self.service_account_token(),
            Some(kubernetes::ServiceAccountToken::File(_))
        )
    }

    /// The name used in logs, metrics and errors.
    pub(crate) fn name(&self) -> &'static str {
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

    pub(crate) fn validate(&self, path: &str, checks: Checks, err: &mut impl FnMut(&str, String)) {
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
    pub(crate) fn service_account_token(&self) -> Option<&kubernetes::ServiceAccountToken> {
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
    pub(crate) fn token_request(&self) -> Option<(&str, i64)> {
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
    pub(crate) async fn exchange(
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
pub(crate) fn setting_for(annotation: &str) -> &'static str {
    match annotation {
        ecr::ROLE_ANNOTATION => "ecr.roleArn",
        acr::CLIENT_ID_ANNOTATION => "acr.clientId",
        acr::TENANT_ID_ANNOTATION => "acr.tenantId",
        _ => "setting",
    }
}
