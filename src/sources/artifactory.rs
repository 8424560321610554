//! The `artifactory` source: JFrog Artifactory's OIDC integration ("Generic OpenID Connect"
//! provider). The service-account token goes in a JSON token-exchange body to
//! `/access/api/v1/oidc/token`; the integration's identity mappings on `iss`/`sub`/`aud` choose
//! the user and the lifetime of the access token that comes back. A preset of
//! [`declarative`](super::declarative).

use serde::Deserialize;

use super::declarative::{Answer, BodyFormat, DeclarativeSource, Method, Place, Placement};
use super::kubernetes::ServiceAccountToken;
use super::{Checks, Credential, MintError, Presented};
use crate::http;

const NAME: &str = "artifactory";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArtifactorySource {
    /// The OIDC integration's name (`provider_name`).
    pub provider_name: String,
    /// Sent as `project_key` when set.
    #[serde(default)]
    pub project_key: Option<String>,
    /// The `aud` of the service-account token, as the integration's identity mapping expects.
    pub audience: String,
    /// Artifactory's base URL. Default: `https://<the registry entry's host>`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Written beside the token when the answer names no `username`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

impl ArtifactorySource {
    pub(crate) fn validate(&self, path: &str, checks: Checks, err: &mut impl FnMut(&str, String)) {
        if self.provider_name.trim().is_empty() {
            err(&format!("{path}.providerName"), "must not be empty".into());
        }
        if self.audience.trim().is_empty() {
            err(&format!("{path}.audience"), "must not be empty".into());
        }
        if let Some(e) = &self.endpoint {
            super::validate_endpoint(&format!("{path}.endpoint"), e, checks.allow_plain_http, err);
        }
        self.service_account_token
            .validate(&format!("{path}.serviceAccountToken"), err);
    }

    /// The one request, as a declarative exchange would spell it.
    pub(crate) fn spec(&self, host: &str) -> DeclarativeSource {
        let base = self
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{host}"));
        let mut fields = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:id_token",
            ),
            ("provider_name", self.provider_name.as_str()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>();
        if let Some(p) = &self.project_key {
            fields.insert("project_key".into(), p.clone());
        }
        DeclarativeSource {
            method: Method::Post,
            url: format!("{}/access/api/v1/oidc/token", super::base(&base)),
            audience: self.audience.clone(),
            token: Placement {
                place: Place::JsonField,
                field: Some("subject_token".into()),
                basic_username: None,
            },
            body: Some(BodyFormat::Json),
            fields,
            headers: Default::default(),
            answer: Answer {
                token: "/access_token".into(),
                expires_in: Some("/expires_in".into()),
                expires_at: None,
                username: Some("/username".into()),
            },
            username: self.username.clone(),
            fallback_lifetime: None,
            service_account_token: self.service_account_token.clone(),
        }
    }

    pub(crate) async fn exchange(
        &self,
        http: &http::HttpClient,
        host: &str,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        self.spec(host).run(NAME, http, id).await
    }
}
