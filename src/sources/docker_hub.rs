//! The `dockerHub` source: Docker Hub's organisation OIDC connections. The service-account token
//! (audience `https://identity.docker.com`) is exchanged in an OAuth token-exchange form at
//! `identity.docker.com/oauth/token` for an access token of the organisation, asked to last
//! `expiresIn` seconds (300 to 3600). Docker documents these connections for GitHub Actions'
//! issuer; whether it accepts a Kubernetes cluster's issuer is not confirmed. A preset of
//! [`declarative`](super::declarative).

use std::time::Duration;

use serde::Deserialize;

use super::declarative::{Answer, BodyFormat, DeclarativeSource, Method, Place, Placement};
use super::kubernetes::ServiceAccountToken;
use super::{Checks, Credential, MintError, Presented};
use crate::http;

const NAME: &str = "dockerHub";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DockerHubSource {
    /// The OIDC connection's id (a UUID, from the organisation's settings).
    pub connection_id: String,
    /// The organisation: the username of the credential.
    pub organization: String,
    #[serde(default = "default_identity")]
    pub audience: String,
    #[serde(default = "default_identity")]
    pub endpoint: String,
    /// The lifetime asked for, 300 to 3600 seconds.
    #[serde(default = "default_expires_in")]
    pub expires_in: u32,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

fn default_identity() -> String {
    "https://identity.docker.com".into()
}

fn default_expires_in() -> u32 {
    3600
}

impl DockerHubSource {
    pub(crate) fn validate(&self, path: &str, checks: Checks, err: &mut impl FnMut(&str, String)) {
        let uuid = self.connection_id.len() == 36
            && self
                .connection_id
                .chars()
                .enumerate()
                .all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => c == '-',
                    _ => c.is_ascii_hexdigit(),
                });
        if !uuid {
            err(
                &format!("{path}.connectionId"),
                format!("{:?} is not a connection id (a UUID)", self.connection_id),
            );
        }
        if self.organization.trim().is_empty() {
            err(&format!("{path}.organization"), "must not be empty".into());
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
        if !(300..=3600).contains(&self.expires_in) {
            err(
                &format!("{path}.expiresIn"),
                "must be between 300 and 3600 (Docker's limits)".into(),
            );
        }
        self.service_account_token
            .validate(&format!("{path}.serviceAccountToken"), err);
    }

    /// The one request, as a declarative exchange would spell it.
    pub(crate) fn spec(&self) -> DeclarativeSource {
        let fields = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange".to_string(),
            ),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:id_token".to_string(),
            ),
            ("connection_id", self.connection_id.clone()),
            ("expires_in", self.expires_in.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into();
        DeclarativeSource {
            method: Method::Post,
            url: format!("{}/oauth/token", super::base(&self.endpoint)),
            audience: self.audience.clone(),
            token: Placement {
                place: Place::FormField,
                field: Some("subject_token".into()),
                basic_username: None,
            },
            body: Some(BodyFormat::Form),
            fields,
            headers: Default::default(),
            answer: Answer {
                token: "/access_token".into(),
                expires_in: Some("/expires_in".into()),
                expires_at: None,
                username: None,
            },
            username: Some(self.organization.clone()),
            // The answer may state no lifetime: then it is the one asked for.
            fallback_lifetime: Some(Duration::from_secs(self.expires_in.into())),
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
