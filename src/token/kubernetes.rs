//! The `kubernetes` source: a TokenRequest for a ServiceAccount of the namespace, with the
//! registry's audience. The registry (or its token server) verifies the JWT against the
//! cluster's issuer, so the credential names exactly one namespace's identity.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde::Deserialize;

use super::{Credential, MintError, Sensitive};

/// The API server refuses TokenRequests for less than ten minutes.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;

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
    pub fn validate(&self, path: &str, renew_before: Option<Duration>, err: &mut impl FnMut(&str, String)) {
        if self.audience.trim().is_empty() {
            err(&format!("{path}.audience"), "must not be empty".into());
        }
        if let Err(m) = crate::config::validate_dns_subdomain(&self.service_account) {
            err(&format!("{path}.serviceAccount"), m);
        }
        if self.expiration_seconds < MIN_EXPIRATION_SECONDS {
            err(
                &format!("{path}.expirationSeconds"),
                format!("{} is below the API server's minimum of {MIN_EXPIRATION_SECONDS}", self.expiration_seconds),
            );
        } else if let Some(rb) = renew_before {
            if rb.as_secs() >= self.expiration_seconds as u64 {
                err(
                    &format!("{path}.expirationSeconds"),
                    format!("{}s is not longer than refresh.renewBefore ({}s): every token would be due at once", self.expiration_seconds, rb.as_secs()),
                );
            }
        }
    }

    pub async fn mint(&self, client: &kube::Client, namespace: &str) -> Result<Credential, MintError> {
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![self.audience.clone()],
                expiration_seconds: Some(self.expiration_seconds),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let issued_at = Timestamp::now();
        let response = api
            .create_token_request(&self.service_account, &PostParams::default(), &request)
            .await
            .map_err(|e| MintError::TokenRequest {
                namespace: namespace.to_string(),
                service_account: self.service_account.clone(),
                message: crate::kube_error_message(&e),
            })?;
        let status = response.status.ok_or_else(|| MintError::Unusable {
            source_name: "kubernetes",
            reason: "TokenRequest response has no status".into(),
        })?;
        if status.token.is_empty() {
            return Err(MintError::Unusable { source_name: "kubernetes", reason: "TokenRequest returned an empty token".into() });
        }
        let expires_at = status.expiration_timestamp.0;
        if expires_at <= issued_at {
            return Err(MintError::Unusable { source_name: "kubernetes", reason: format!("token already expired at {expires_at}") });
        }
        Ok(Credential {
            username: self.username.clone().unwrap_or_else(|| self.service_account.clone()),
            password: Sensitive::new(status.token),
            issued_at,
            expires_at,
        })
    }
}
