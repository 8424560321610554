//! The `acr` source (Azure Container Registry): Entra workload identity. The service-account
//! token (audience `api://AzureADTokenExchange`) is a client assertion for an Entra app or
//! managed identity whose federated credential names the cluster's issuer and the subject;
//! the Entra token is then exchanged at the registry for an ACR refresh token (about 3 h).

use serde::Deserialize;

use super::kubernetes::ServiceAccountToken;
use super::{Credential, MintError, Presented, Sensitive};
use crate::http;

const NAME: &str = "acr";
pub(crate) const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
pub(crate) const TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";
/// ACR's fixed username for refresh tokens.
const USERNAME: &str = "00000000-0000-0000-0000-000000000000";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AcrSource {
    /// Entra tenant. Default: the ServiceAccount's `azure.workload.identity/tenant-id` annotation.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Client id of the app or managed identity. Default: the ServiceAccount's
    /// `azure.workload.identity/client-id` annotation.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "default_authority")]
    pub authority_host: String,
    /// The registry's base URL. Default: `https://<the registry entry's host>`.
    #[serde(default)]
    pub registry_endpoint: Option<String>,
    #[serde(default = "default_audience")]
    pub audience: String,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}

fn default_audience() -> String {
    "api://AzureADTokenExchange".into()
}

#[derive(Deserialize)]
struct EntraResponse {
    access_token: String,
}

#[derive(Deserialize)]
struct ExchangeResponse {
    refresh_token: String,
}

impl AcrSource {
    pub(crate) fn validate(
        &self,
        path: &str,
        checks: super::Checks,
        err: &mut impl FnMut(&str, String),
    ) {
        for (field, value) in [("tenantId", &self.tenant_id), ("clientId", &self.client_id)] {
            if let Some(v) = value {
                if v.is_empty()
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                {
                    err(
                        &format!("{path}.{field}"),
                        format!("{v:?} is not an Entra id"),
                    );
                }
            } else if matches!(self.service_account_token, ServiceAccountToken::File(_)) {
                err(&format!("{path}.{field}"), "must be set when the token comes from a file (there is no ServiceAccount to read it from)".into());
            }
        }
        super::validate_endpoint(
            &format!("{path}.authorityHost"),
            &self.authority_host,
            checks.allow_plain_http,
            err,
        );
        if let Some(e) = &self.registry_endpoint {
            super::validate_endpoint(
                &format!("{path}.registryEndpoint"),
                e,
                checks.allow_plain_http,
                err,
            );
        }
        self.service_account_token
            .validate(&format!("{path}.serviceAccountToken"), err);
    }

    /// The annotations read for ids the config does not set.
    pub(crate) fn annotation_keys(&self) -> Vec<&'static str> {
        [
            (&self.tenant_id, TENANT_ID_ANNOTATION),
            (&self.client_id, CLIENT_ID_ANNOTATION),
        ]
        .into_iter()
        .filter(|(configured, _)| configured.is_none())
        .map(|(_, key)| key)
        .collect()
    }

    pub(crate) async fn exchange(
        &self,
        http: &http::HttpClient,
        host: &str,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        let tenant = id.setting(NAME, &self.tenant_id, TENANT_ID_ANNOTATION, "tenantId")?;
        let client_id = id.setting(NAME, &self.client_id, CLIENT_ID_ANNOTATION, "clientId")?;
        let sa_token = id.token;
        let url = format!(
            "{}/{tenant}/oauth2/v2.0/token",
            super::base(&self.authority_host)
        );
        let form = [
            ("client_id", client_id.as_str()),
            ("scope", "https://containerregistry.azure.net/.default"),
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", sa_token.expose()),
        ];
        let body = http
            .send(NAME, &[sa_token], |c| c.post(&url).form(&form))
            .await?;
        let entra: EntraResponse = http::parse_json(
            NAME,
            "an Entra token response ({\"access_token\", ...})",
            &body,
        )?;
        let entra_token = Sensitive::new(entra.access_token);

        let registry = self
            .registry_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{host}"));
        let url = format!("{}/oauth2/exchange", super::base(&registry));
        let form = [
            ("grant_type", "access_token"),
            ("service", host),
            ("tenant", tenant.as_str()),
            ("access_token", entra_token.expose()),
        ];
        let body = http
            .send(NAME, &[sa_token, &entra_token], |c| {
                c.post(&url).form(&form)
            })
            .await?;
        let answer: ExchangeResponse = http::parse_json(
            NAME,
            "an ACR exchange response ({\"refresh_token\"})",
            &body,
        )?;
        super::from_jwt(NAME, USERNAME.into(), answer.refresh_token)
    }
}
