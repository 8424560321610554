//! The `quay` source: robot-account federation. The robot's federation settings on Quay list
//! the cluster's issuer and the subject `system:serviceaccount:NS:SA`; the service-account
//! token (with an explicit audience: audience-less federation is deprecated) is sent as the
//! robot's password and answered with a robot token of about an hour.

use serde::Deserialize;

use super::kubernetes::ServiceAccountToken;
use super::{Credential, MintError, Presented};
use crate::http;

const NAME: &str = "quay";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuaySource {
    /// `organization+robotname`.
    pub robot: String,
    /// The `aud` of the service-account token, as the robot's federation config lists it.
    pub audience: String,
    /// Quay's base URL. Default: `https://<the registry entry's host>`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

#[derive(Deserialize)]
struct FederationResponse {
    token: String,
}

impl QuaySource {
    pub(crate) fn validate(
        &self,
        path: &str,
        checks: super::Checks,
        err: &mut impl FnMut(&str, String),
    ) {
        let parts: Vec<&str> = self.robot.split('+').collect();
        if parts.len() != 2
            || parts
                .iter()
                .any(|p| p.is_empty() || p.contains(char::is_whitespace))
        {
            err(
                &format!("{path}.robot"),
                format!(
                    "{:?} is not a robot account (organization+name)",
                    self.robot
                ),
            );
        }
        if self.audience.trim().is_empty() {
            err(
                &format!("{path}.audience"),
                "must not be empty (audience-less federation is deprecated by Quay)".into(),
            );
        }
        if let Some(e) = &self.endpoint {
            super::validate_endpoint(&format!("{path}.endpoint"), e, checks.allow_plain_http, err);
        }
        self.service_account_token
            .validate(&format!("{path}.serviceAccountToken"), err);
    }

    pub(crate) async fn exchange(
        &self,
        http: &http::HttpClient,
        host: &str,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        let sa_token = id.token;
        let base = self
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{host}"));
        let url = format!("{}/oauth2/federation/robot/token", super::base(&base));
        let body = http
            .send(NAME, &[sa_token], |c| {
                c.get(&url).basic_auth(&self.robot, Some(sa_token.expose()))
            })
            .await?;
        let answer: FederationResponse =
            http::parse_json(NAME, "a robot token ({\"token\": ...})", &body)?;
        super::from_jwt(NAME, self.robot.clone(), answer.token)
    }
}
