//! The `cloudsmith` source: Cloudsmith's OIDC endpoint for a service account. The
//! service-account token and the service's slug go as JSON to `/openid/<organization>/`; the
//! answer (`201 {"token"}`) is the password, the slug the username. The answer states no
//! lifetime: it is the token's `exp` when it is a JWT, else `fallbackLifetime`. A preset of
//! [`declarative`](super::declarative).

use std::time::Duration;

use serde::Deserialize;

use super::declarative::{Answer, BodyFormat, DeclarativeSource, Method, Place, Placement};
use super::kubernetes::ServiceAccountToken;
use super::{Checks, Credential, MintError, Presented};
use crate::http;

const NAME: &str = "cloudsmith";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudsmithSource {
    /// The organization's slug, as in `/openid/<organization>/`.
    pub organization: String,
    /// The Cloudsmith service account's slug: sent, and the username.
    pub service_slug: String,
    /// The `aud` of the service-account token, as the OIDC provider's settings list it.
    pub audience: String,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// How long the token lasts when it is not a JWT with `exp`.
    #[serde(default, deserialize_with = "crate::core::duration::optional_field")]
    pub fallback_lifetime: Option<Duration>,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

fn default_endpoint() -> String {
    "https://api.cloudsmith.io".into()
}

/// A slug: what Cloudsmith puts in a URL path.
fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl CloudsmithSource {
    pub(crate) fn validate(&self, path: &str, checks: Checks, err: &mut impl FnMut(&str, String)) {
        if !is_slug(&self.organization) {
            err(
                &format!("{path}.organization"),
                format!("{:?} is not an organization slug", self.organization),
            );
        }
        if !is_slug(&self.service_slug) {
            err(
                &format!("{path}.serviceSlug"),
                format!("{:?} is not a service account slug", self.service_slug),
            );
        }
        if self.audience.trim().is_empty() {
            err(&format!("{path}.audience"), "must not be empty".into());
        }
        super::validate_endpoint(
            &format!("{path}.endpoint"),
            &self.endpoint,
            checks.allow_plain_http,
            err,
        );
        if self
            .fallback_lifetime
            .is_some_and(|d| d < Duration::from_secs(60))
        {
            err(
                &format!("{path}.fallbackLifetime"),
                "must be at least 1m".into(),
            );
        }
        self.service_account_token
            .validate(&format!("{path}.serviceAccountToken"), err);
    }

    /// The one request, as a declarative exchange would spell it.
    pub(crate) fn spec(&self) -> DeclarativeSource {
        DeclarativeSource {
            method: Method::Post,
            url: format!(
                "{}/openid/{}/",
                super::base(&self.endpoint),
                self.organization
            ),
            audience: self.audience.clone(),
            token: Placement {
                place: Place::JsonField,
                field: Some("oidc_token".into()),
                basic_username: None,
            },
            body: Some(BodyFormat::Json),
            fields: [("service_slug".to_string(), self.service_slug.clone())].into(),
            headers: Default::default(),
            answer: Answer {
                token: "/token".into(),
                ..Answer::default()
            },
            username: Some(self.service_slug.clone()),
            fallback_lifetime: self.fallback_lifetime,
            service_account_token: self.service_account_token.clone(),
        }
    }

    pub(crate) async fn exchange(
        &self,
        http: &http::HttpClient,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        self.spec().run(NAME, http, id).await
    }
}
