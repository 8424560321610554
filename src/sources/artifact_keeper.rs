//! The `artifactKeeper` source: Artifact Keeper's CI token endpoint. The service-account token
//! is the Bearer of `POST /api/v1/auth/ci/token` (with the OIDC provider's id as JSON when
//! configured); the answer carries the access token, `expires_in` and the username. A preset of
//! [`declarative`](super::declarative).

use serde::Deserialize;

use super::declarative::{Answer, BodyFormat, DeclarativeSource, Method, Place, Placement};
use super::kubernetes::ServiceAccountToken;
use super::{Checks, Credential, MintError, Presented};
use crate::http;

const NAME: &str = "artifactKeeper";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArtifactKeeperSource {
    /// Artifact Keeper's base URL. Default: `https://<the registry entry's host>`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The `aud` of the service-account token, as the OIDC provider's settings list it.
    pub audience: String,
    /// Sent as `provider_id` when set (several OIDC providers).
    #[serde(default)]
    pub provider_id: Option<String>,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

impl ArtifactKeeperSource {
    pub(crate) fn validate(&self, path: &str, checks: Checks, err: &mut impl FnMut(&str, String)) {
        if self.audience.trim().is_empty() {
            err(&format!("{path}.audience"), "must not be empty".into());
        }
        if let Some(e) = &self.endpoint {
            super::validate_endpoint(&format!("{path}.endpoint"), e, checks.allow_plain_http, err);
        }
        if self
            .provider_id
            .as_deref()
            .is_some_and(|p| p.trim().is_empty())
        {
            err(&format!("{path}.providerId"), "must not be empty".into());
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
        DeclarativeSource {
            method: Method::Post,
            url: format!("{}/api/v1/auth/ci/token", super::base(&base)),
            audience: self.audience.clone(),
            token: Placement {
                place: Place::Bearer,
                field: None,
                basic_username: None,
            },
            body: Some(BodyFormat::Json),
            fields: self
                .provider_id
                .iter()
                .map(|p| ("provider_id".to_string(), p.clone()))
                .collect(),
            headers: Default::default(),
            answer: Answer {
                token: "/access_token".into(),
                expires_in: Some("/expires_in".into()),
                expires_at: None,
                username: Some("/username".into()),
            },
            username: None,
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
