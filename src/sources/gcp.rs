//! The `gcp` source (Artifact Registry, GCR): workload identity federation. The service-account
//! token is exchanged at Google's STS for a federated access token, optionally traded for a
//! Google service account's token (impersonation) with its own, longer lifetime.

use jiff::Timestamp;
use serde::Deserialize;
use serde_json::json;

use super::kubernetes::ServiceAccountToken;
use super::{Credential, MintError, Presented, Sensitive};
use crate::http;

const NAME: &str = "gcp";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const PROVIDER_PREFIX: &str = "//iam.googleapis.com/";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GcpSource {
    /// `projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>`.
    pub workload_identity_provider: String,
    /// A Google service account to impersonate (needs `roles/iam.workloadIdentityUser` for the
    /// federated principal). Without it the federated token itself is used.
    #[serde(default)]
    pub service_account_email: Option<String>,
    /// The `aud` of the service-account token. Default: the provider's default audience,
    /// `https://iam.googleapis.com/<workloadIdentityProvider>`.
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "default_sts_endpoint")]
    pub sts_endpoint: String,
    #[serde(default = "default_iam_endpoint")]
    pub iam_credentials_endpoint: String,
    /// Lifetime asked of an impersonated token, in seconds (Google allows up to 3600 by default).
    #[serde(default = "default_lifetime")]
    pub lifetime_seconds: u32,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

fn default_sts_endpoint() -> String {
    "https://sts.googleapis.com".into()
}

fn default_iam_endpoint() -> String {
    "https://iamcredentials.googleapis.com".into()
}

fn default_lifetime() -> u32 {
    3600
}

#[derive(Deserialize)]
struct StsResponse {
    access_token: String,
    expires_in: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImpersonationResponse {
    access_token: String,
    expire_time: Timestamp,
}

impl GcpSource {
    fn provider(&self) -> &str {
        self.workload_identity_provider
            .trim_start_matches(PROVIDER_PREFIX)
    }

    pub(crate) fn validate(
        &self,
        path: &str,
        checks: super::Checks,
        err: &mut impl FnMut(&str, String),
    ) {
        let parts: Vec<&str> = self.provider().split('/').collect();
        let shape = parts.len() == 8
            && parts[0] == "projects"
            && parts[2] == "locations"
            && parts[4] == "workloadIdentityPools"
            && parts[6] == "providers"
            && parts.iter().all(|p| !p.is_empty());
        if !shape {
            err(
                &format!("{path}.workloadIdentityProvider"),
                format!("{:?} is not projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>", self.workload_identity_provider),
            );
        }
        if let Some(email) = &self.service_account_email {
            if !email.contains('@') || email.contains(char::is_whitespace) || email.contains('/') {
                err(
                    &format!("{path}.serviceAccountEmail"),
                    format!("{email:?} is not a service account email"),
                );
            }
        }
        if !(600..=43200).contains(&self.lifetime_seconds) {
            err(
                &format!("{path}.lifetimeSeconds"),
                "must be between 600 and 43200".into(),
            );
        }
        super::validate_endpoint(
            &format!("{path}.stsEndpoint"),
            &self.sts_endpoint,
            checks.allow_plain_http,
            err,
        );
        super::validate_endpoint(
            &format!("{path}.iamCredentialsEndpoint"),
            &self.iam_credentials_endpoint,
            checks.allow_plain_http,
            err,
        );
        self.service_account_token
            .validate(&format!("{path}.serviceAccountToken"), err);
    }

    /// The `aud` of the service-account token: the configured one or the provider's default.
    pub(crate) fn token_audience(&self) -> String {
        self.audience
            .clone()
            .unwrap_or_else(|| format!("https://iam.googleapis.com/{}", self.provider()))
    }

    pub(crate) async fn exchange(
        &self,
        http: &http::HttpClient,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        let sa_token = id.token;
        let url = format!("{}/v1/token", super::base(&self.sts_endpoint));
        let request = json!({
            "grantType": "urn:ietf:params:oauth:grant-type:token-exchange",
            "audience": format!("{PROVIDER_PREFIX}{}", self.provider()),
            "scope": SCOPE,
            "requestedTokenType": "urn:ietf:params:oauth:token-type:access_token",
            "subjectToken": sa_token.expose(),
            "subjectTokenType": "urn:ietf:params:oauth:token-type:jwt",
        });
        let body = http
            .send(NAME, &[sa_token], |c| c.post(&url).json(&request))
            .await?;
        let sts: StsResponse = http::parse_json(
            NAME,
            "an STS response ({\"access_token\", \"expires_in\"})",
            &body,
        )?;
        let username = "oauth2accesstoken".to_string();
        let Some(email) = &self.service_account_email else {
            let credential =
                super::from_expires_in(NAME, username, sts.access_token, sts.expires_in)?;
            // A federated token does not outlive the token it came from.
            return Ok(match crate::core::jwt::expiry(sa_token.expose()) {
                Ok(sa_exp) if sa_exp < credential.expires_at => Credential {
                    expires_at: sa_exp,
                    ..credential
                },
                _ => credential,
            });
        };
        let federated = Sensitive::new(sts.access_token);
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
            super::base(&self.iam_credentials_endpoint)
        );
        let request = json!({"scope": [SCOPE], "lifetime": format!("{}s", self.lifetime_seconds)});
        let body = http
            .send(NAME, &[sa_token, &federated], |c| {
                c.post(&url).bearer_auth(federated.expose()).json(&request)
            })
            .await?;
        let answer: ImpersonationResponse = http::parse_json(
            NAME,
            "a generateAccessToken response ({\"accessToken\", \"expireTime\"})",
            &body,
        )?;
        super::checked(
            NAME,
            username,
            Sensitive::new(answer.access_token),
            answer.expire_time,
        )
    }
}
