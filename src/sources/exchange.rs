//! The `tokenExchange` source: any OAuth 2.0 token-exchange endpoint (RFC 8693). The
//! service-account token is the `subject_token`; the issued `access_token` is the password.

use serde::Deserialize;

use super::kubernetes::ServiceAccountToken;
use super::{Credential, MintError, Presented};
use crate::http;

const NAME: &str = "tokenExchange";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenExchangeSource {
    /// The token endpoint.
    pub endpoint: String,
    /// Username written beside the issued token.
    pub username: String,
    /// The `aud` of the service-account token (the `subject_token`).
    pub subject_token_audience: String,
    /// RFC 8693 parameters, sent when set.
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub requested_token_type: Option<String>,
    /// Sent as `client_id` for endpoints that require one (a public client).
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

#[derive(Deserialize)]
struct ExchangeResponse {
    access_token: String,
    /// Optional in RFC 8693; without it the token must be a JWT with `exp`.
    #[serde(default)]
    expires_in: Option<i64>,
}

impl TokenExchangeSource {
    pub(crate) fn validate(
        &self,
        path: &str,
        checks: super::Checks,
        err: &mut impl FnMut(&str, String),
    ) {
        super::validate_endpoint(
            &format!("{path}.endpoint"),
            &self.endpoint,
            checks.allow_plain_http,
            err,
        );
        if self.username.trim().is_empty() {
            err(&format!("{path}.username"), "must not be empty".into());
        }
        if self.subject_token_audience.trim().is_empty() {
            err(
                &format!("{path}.subjectTokenAudience"),
                "must not be empty".into(),
            );
        }
        self.service_account_token
            .validate(&format!("{path}.serviceAccountToken"), err);
    }

    pub(crate) async fn exchange(
        &self,
        http: &http::HttpClient,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        let sa_token = id.token;
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", GRANT_TYPE),
            ("subject_token", sa_token.expose()),
            ("subject_token_type", JWT_TOKEN_TYPE),
        ];
        let optional = [
            ("audience", &self.audience),
            ("resource", &self.resource),
            ("scope", &self.scope),
            ("requested_token_type", &self.requested_token_type),
            ("client_id", &self.client_id),
        ];
        form.extend(
            optional
                .iter()
                .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v))),
        );
        let body = http
            .send(NAME, &[sa_token], |c| c.post(&self.endpoint).form(&form))
            .await?;
        let answer: ExchangeResponse = http::parse_json(
            NAME,
            "a token-exchange response ({\"access_token\", \"expires_in\"})",
            &body,
        )?;
        match answer.expires_in {
            Some(seconds) => super::from_expires_in(NAME, self.username.clone(), answer.access_token, seconds),
            None => super::from_jwt(NAME, self.username.clone(), answer.access_token).map_err(|_| MintError::Unusable {
                source_name: NAME,
                reason: "the answer has no expires_in and the token is not a JWT with exp: its lifetime is unknown".into(),
            }),
        }
    }
}
