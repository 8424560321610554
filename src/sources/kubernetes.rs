//! The `kubernetes` source: a TokenRequest for a ServiceAccount of the namespace, with the
//! registry's audience. The registry (or its token server) verifies the JWT against the
//! cluster's issuer, so the credential names exactly one namespace's identity.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde::Deserialize;

use super::{Credential, MintError, Presented, Sensitive};

/// The API server refuses TokenRequests for less than ten minutes.
pub(crate) const MIN_EXPIRATION_SECONDS: i64 = 600;

/// The longest lifetime the config may ask of a TokenRequest: a day. The credentials are meant
/// to be short-lived, and the shipped self-fencing policy refuses the service's TokenRequests
/// for longer than the longest configured one (`Config::max_token_seconds`).
pub(crate) const MAX_EXPIRATION_SECONDS: i64 = 86_400;

/// `expirationSeconds` at `path` within the API server's minimum and this project's maximum.
fn validate_expiration(path: &str, seconds: i64, err: &mut impl FnMut(&str, String)) -> bool {
    if seconds < MIN_EXPIRATION_SECONDS {
        err(
            path,
            format!("{seconds} is below the API server's minimum of {MIN_EXPIRATION_SECONDS}"),
        );
        false
    } else if seconds > MAX_EXPIRATION_SECONDS {
        err(
            path,
            format!("{seconds} is above the maximum of {MAX_EXPIRATION_SECONDS} (a day)"),
        );
        false
    } else {
        true
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSource {
    /// The ServiceAccount of each opted-in namespace whose identity the token carries.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The token's `aud`: what the registry expects, usually its own URL.
    pub audience: String,
    /// Requested lifetime. The API server may shorten or lengthen it; its answer wins.
    #[serde(default = "default_expiration_seconds")]
    pub expiration_seconds: i64,
    /// Username written beside the token. Default: the ServiceAccount's name.
    #[serde(default)]
    pub username: Option<String>,
}

fn default_service_account() -> String {
    "default".into()
}

fn default_expiration_seconds() -> i64 {
    3600
}

impl KubernetesSource {
    pub(crate) fn validate(
        &self,
        path: &str,
        renew_before: Option<Duration>,
        err: &mut impl FnMut(&str, String),
    ) {
        if self.audience.trim().is_empty() {
            err(&format!("{path}.audience"), "must not be empty".into());
        }
        if let Err(m) = crate::core::names::validate_dns_subdomain(&self.service_account) {
            err(&format!("{path}.serviceAccount"), m);
        }
        let within = validate_expiration(
            &format!("{path}.expirationSeconds"),
            self.expiration_seconds,
            err,
        );
        if let Some(rb) = renew_before.filter(|_| within) {
            if rb.as_secs() >= self.expiration_seconds as u64 {
                err(
                    &format!("{path}.expirationSeconds"),
                    format!("{}s is not longer than refresh.renewBefore ({}s): every token would be due at once", self.expiration_seconds, rb.as_secs()),
                );
            }
        }
    }

    /// Mints for `service_account` when given (identity scope `serviceAccount`), else for the
    /// configured one.
    pub(crate) async fn mint(
        &self,
        client: &kube::Client,
        namespace: &str,
        service_account: Option<&str>,
    ) -> Result<Credential, MintError> {
        let issued_at = Timestamp::now();
        let service_account = service_account.unwrap_or(&self.service_account);
        let (token, expires_at) = request_token(
            client,
            namespace,
            service_account,
            &self.audience,
            self.expiration_seconds,
        )
        .await?;
        if expires_at <= issued_at {
            return Err(MintError::Unusable {
                source_name: "kubernetes",
                reason: format!("token already expired at {expires_at}"),
            });
        }
        Ok(Credential {
            username: self
                .username
                .clone()
                .unwrap_or_else(|| service_account.to_string()),
            password: token,
            issued_at,
            expires_at,
        })
    }
}

impl KubernetesSource {
    /// The credential is the presented token itself (the kubelet's, bound to one Pod): it
    /// lasts as long as the token, and the username is the configured one or the
    /// ServiceAccount's name.
    pub(crate) fn pass_through(&self, id: &Presented<'_>) -> Result<Credential, MintError> {
        let expires_at =
            crate::core::jwt::expiry(id.token.expose()).map_err(|reason| MintError::Unusable {
                source_name: "kubernetes",
                reason: format!("the service-account token: {reason}"),
            })?;
        let username = self
            .username
            .clone()
            .or_else(|| id.service_account.map(str::to_string))
            .unwrap_or_else(|| self.service_account.clone());
        super::checked("kubernetes", username, id.token.clone(), expires_at)
    }
}

/// A TokenRequest for `namespace/service_account` with one audience. Shared by every source
/// that exchanges the namespace's identity; returns the token and the API server's expiry
/// (which may differ from what was asked).
pub(crate) async fn request_token(
    client: &kube::Client,
    namespace: &str,
    service_account: &str,
    audience: &str,
    expiration_seconds: i64,
) -> Result<(Sensitive, Timestamp), MintError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_string()],
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let response = api
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .map_err(|e| MintError::TokenRequest {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            source: e.into(),
        })?;
    let status = response.status.ok_or_else(|| MintError::Unusable {
        source_name: "kubernetes",
        reason: "TokenRequest response has no status".into(),
    })?;
    if status.token.is_empty() {
        return Err(MintError::Unusable {
            source_name: "kubernetes",
            reason: "TokenRequest returned an empty token".into(),
        });
    }
    Ok((Sensitive::new(status.token), status.expiration_timestamp.0))
}

/// The annotations of `namespace/name`, where cloud sources look for ids they were not given
/// (`eks.amazonaws.com/role-arn`, `azure.workload.identity/client-id`).
pub(crate) async fn service_account_annotations(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<std::collections::BTreeMap<String, String>, MintError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa = api.get(name).await.map_err(|e| MintError::ServiceAccount {
        namespace: namespace.to_string(),
        service_account: name.to_string(),
        source: e.into(),
    })?;
    Ok(sa.metadata.annotations.unwrap_or_default())
}

/// Where an exchanging source gets the service-account token it presents:
/// `serviceAccountToken: {fromNamespace: {serviceAccount: default}}` (a TokenRequest for the
/// namespace's ServiceAccount, so the credential is tied to that namespace) or
/// `serviceAccountToken: {file: /var/run/secrets/tokens/...}` (the injector's own projected token).
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RawServiceAccountToken")]
pub enum ServiceAccountToken {
    FromNamespace(FromNamespace),
    File(std::path::PathBuf),
}

/// serde_yaml 0.9 reads enums only from YAML tags; a map with exactly one key reads better.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServiceAccountToken {
    from_namespace: Option<FromNamespace>,
    file: Option<std::path::PathBuf>,
}

impl TryFrom<RawServiceAccountToken> for ServiceAccountToken {
    type Error = String;
    fn try_from(raw: RawServiceAccountToken) -> Result<Self, String> {
        match (raw.from_namespace, raw.file) {
            (Some(f), None) => Ok(Self::FromNamespace(f)),
            (None, Some(p)) => Ok(Self::File(p)),
            _ => Err("exactly one of fromNamespace, file must be set".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromNamespace {
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Only needs to outlive the exchange; the minimum the API server accepts.
    #[serde(default = "min_expiration_seconds")]
    pub expiration_seconds: i64,
}

fn min_expiration_seconds() -> i64 {
    MIN_EXPIRATION_SECONDS
}

impl Default for ServiceAccountToken {
    fn default() -> Self {
        Self::FromNamespace(FromNamespace {
            service_account: default_service_account(),
            expiration_seconds: MIN_EXPIRATION_SECONDS,
        })
    }
}

impl ServiceAccountToken {
    pub(crate) fn validate(&self, path: &str, err: &mut impl FnMut(&str, String)) {
        match self {
            Self::FromNamespace(f) => {
                if let Err(m) = crate::core::names::validate_dns_subdomain(&f.service_account) {
                    err(&format!("{path}.fromNamespace.serviceAccount"), m);
                }
                validate_expiration(
                    &format!("{path}.fromNamespace.expirationSeconds"),
                    f.expiration_seconds,
                    err,
                );
            }
            Self::File(p) => {
                if !p.is_absolute() {
                    err(
                        &format!("{path}.file"),
                        format!("{} is not an absolute path", p.display()),
                    );
                }
            }
        }
    }

    /// The ServiceAccount (in namespace scope) and the lifetime a TokenRequest asks for; `None`
    /// for a token file, which asks the API server for nothing.
    pub(crate) fn token_request(&self) -> Option<(&str, i64)> {
        match self {
            Self::FromNamespace(f) => Some((&f.service_account, f.expiration_seconds)),
            Self::File(_) => None,
        }
    }

    /// The ServiceAccount whose token [`fetch`](Self::fetch) gets; unknown for a file.
    pub(crate) fn service_account<'a>(&'a self, cx: super::MintContext<'a>) -> Option<&'a str> {
        match self {
            Self::FromNamespace(f) => Some(cx.service_account.unwrap_or(&f.service_account)),
            Self::File(_) => None,
        }
    }

    /// The token to exchange, with `audience` when it is requested here (a projected file
    /// carries whatever audience its volume was given).
    pub(crate) async fn fetch(
        &self,
        cx: super::MintContext<'_>,
        audience: &str,
    ) -> Result<Sensitive, MintError> {
        match self {
            Self::FromNamespace(f) => {
                let service_account = cx.service_account.unwrap_or(&f.service_account);
                Ok(request_token(
                    cx.kube,
                    cx.namespace,
                    service_account,
                    audience,
                    f.expiration_seconds,
                )
                .await?
                .0)
            }
            Self::File(p) => read_token_file(p).await,
        }
    }
}

/// A projected service-account token from its file, trimmed.
pub(crate) async fn read_token_file(path: &std::path::Path) -> Result<Sensitive, MintError> {
    let raw = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| MintError::TokenFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(MintError::TokenFile {
            path: path.display().to_string(),
            message: "file is empty".into(),
        });
    }
    Ok(Sensitive::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(t: &ServiceAccountToken) -> Vec<String> {
        let mut out = Vec::new();
        t.validate(
            "registries[0].chainguard.serviceAccountToken",
            &mut |p, m| out.push(format!("{p}: {m}")),
        );
        out
    }

    #[test]
    fn service_account_token_shapes() {
        let t: ServiceAccountToken =
            serde_yaml::from_str("fromNamespace: {serviceAccount: builder}").unwrap();
        assert!(
            matches!(&t, ServiceAccountToken::FromNamespace(f) if f.service_account == "builder" && f.expiration_seconds == 600)
        );
        assert!(errors(&t).is_empty());
        let t: ServiceAccountToken =
            serde_yaml::from_str("file: /var/run/secrets/tokens/cgr").unwrap();
        assert!(
            matches!(&t, ServiceAccountToken::File(p) if p.to_str() == Some("/var/run/secrets/tokens/cgr"))
        );
        assert!(
            serde_yaml::from_str::<ServiceAccountToken>("fromNamespace: {account: x}").is_err()
        );
        assert!(
            serde_yaml::from_str::<ServiceAccountToken>("{fromNamespace: {}, file: /t}").is_err()
        );
        assert!(serde_yaml::from_str::<ServiceAccountToken>("{}").is_err());
    }

    #[test]
    fn service_account_token_validation_names_the_field() {
        let t: ServiceAccountToken = serde_yaml::from_str(
            "fromNamespace: {serviceAccount: Bad_Name, expirationSeconds: 60}",
        )
        .unwrap();
        let e = errors(&t);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with(
                "registries[0].chainguard.serviceAccountToken.fromNamespace.serviceAccount: "
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with(
                "registries[0].chainguard.serviceAccountToken.fromNamespace.expirationSeconds: "
            ),
            "{e:?}"
        );
        let t: ServiceAccountToken = serde_yaml::from_str("file: relative/token").unwrap();
        assert_eq!(errors(&t).len(), 1);
    }

    #[tokio::test]
    async fn file_token_is_read_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "eyJ.secret-sa-token\n").unwrap();
        let t = ServiceAccountToken::File(path.clone());
        // The kube client is not used for a file source; build one that points nowhere.
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let http = crate::http::HttpClient::new(&Default::default(), &Default::default()).unwrap();
        let cx = crate::sources::MintContext {
            kube: &client,
            http: &http,
            namespace: "ns",
            service_account: None,
        };
        let token = t.fetch(cx, "aud").await.unwrap();
        assert_eq!(token.expose(), "eyJ.secret-sa-token");
        assert!(!format!("{token:?}").contains("secret"));
        std::fs::write(&path, "  \n").unwrap();
        let e = t.fetch(cx, "aud").await.unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }
}
