//! The `chainguard` source: the namespace's service-account token (audience
//! `issuer.enforce.dev`) exchanged at Chainguard's STS for a cgr.dev token of an assumable
//! identity. The identity's binding (issuer and subject `system:serviceaccount:NS:SA`) is set
//! up on Chainguard's side with `chainctl iam identities create`.

use serde::Deserialize;

use super::kubernetes::ServiceAccountToken;
use super::{Credential, MintError, Presented};
use crate::http;

const NAME: &str = "chainguard";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChainguardSource {
    /// The assumable identity's UID (`chainctl iam identities list`).
    pub identity: String,
    /// Chainguard's STS.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// The `aud` of the minted token: the registry that accepts it.
    #[serde(default = "default_registry_audience")]
    pub registry_audience: String,
    /// The `aud` of the service-account token presented to the STS.
    #[serde(default = "default_audience")]
    pub audience: String,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

fn default_issuer() -> String {
    "https://issuer.enforce.dev".into()
}

fn default_registry_audience() -> String {
    "cgr.dev".into()
}

fn default_audience() -> String {
    "issuer.enforce.dev".into()
}

#[derive(Deserialize)]
struct ExchangeResponse {
    token: String,
}

impl ChainguardSource {
    pub(crate) fn validate(
        &self,
        path: &str,
        checks: super::Checks,
        err: &mut impl FnMut(&str, String),
    ) {
        // UIDs are hex path segments joined by '/'; anything else cannot be one.
        let ok = !self.identity.is_empty()
            && self
                .identity
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '/');
        if !ok {
            err(
                &format!("{path}.identity"),
                format!(
                    "{:?} is not an identity UID (hex, as chainctl prints it)",
                    self.identity
                ),
            );
        }
        super::validate_endpoint(
            &format!("{path}.issuer"),
            &self.issuer,
            checks.allow_plain_http,
            err,
        );
        if self.audience.trim().is_empty() {
            err(&format!("{path}.audience"), "must not be empty".into());
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
        let url = format!("{}/sts/exchange", super::base(&self.issuer));
        let body = http
            .send(NAME, &[sa_token], |c| {
                c.post(&url)
                    .query(&[
                        ("aud", self.registry_audience.as_str()),
                        ("identity", self.identity.as_str()),
                    ])
                    .bearer_auth(sa_token.expose())
                    .header(reqwest::header::CONTENT_LENGTH, 0)
            })
            .await?;
        let answer: ExchangeResponse =
            http::parse_json(NAME, "a token response ({\"token\": ...})", &body)?;
        super::from_jwt(NAME, "_token".into(), answer.token)
    }
}
