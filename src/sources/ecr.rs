//! The `ecr` source (AWS Elastic Container Registry): IAM roles for service accounts without
//! EKS. The service-account token (audience `sts.amazonaws.com`) is exchanged with STS
//! `AssumeRoleWithWebIdentity` for temporary keys of a role whose trust policy names the
//! cluster's OIDC provider; those keys sign (SigV4) ECR's `GetAuthorizationToken`, whose
//! answer is `AWS:<password>` valid for 12 hours.

use base64::Engine;
use jiff::Timestamp;
use serde::Deserialize;

use super::kubernetes::ServiceAccountToken;
use super::sigv4::{self, AwsKeys, SignableRequest};
use super::{Credential, MintError, Presented, Sensitive};
use crate::http;

const NAME: &str = "ecr";
pub(crate) const ROLE_ANNOTATION: &str = "eks.amazonaws.com/role-arn";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EcrSource {
    /// The registry's region, e.g. `eu-west-1`.
    pub region: String,
    /// The role to assume. Default: the ServiceAccount's `eks.amazonaws.com/role-arn` annotation.
    #[serde(default)]
    pub role_arn: Option<String>,
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Default `https://sts.<region>.amazonaws.com` (GovCloud, China: set it).
    #[serde(default)]
    pub sts_endpoint: Option<String>,
    /// Default `https://api.ecr.<region>.amazonaws.com`.
    #[serde(default)]
    pub ecr_endpoint: Option<String>,
    /// Lifetime of the STS keys; they are used once, right away.
    #[serde(default = "default_duration")]
    pub duration_seconds: u32,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

fn default_audience() -> String {
    "sts.amazonaws.com".into()
}

fn default_duration() -> u32 {
    900
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationResponse {
    authorization_data: Vec<AuthorizationData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationData {
    authorization_token: String,
    /// Seconds since the epoch (AWS JSON timestamps may carry a fraction).
    expires_at: f64,
}

impl EcrSource {
    fn sts_endpoint(&self) -> String {
        self.sts_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://sts.{}.amazonaws.com", self.region))
    }

    fn ecr_endpoint(&self) -> String {
        self.ecr_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://api.ecr.{}.amazonaws.com", self.region))
    }

    pub(crate) fn validate(
        &self,
        path: &str,
        checks: super::Checks,
        err: &mut impl FnMut(&str, String),
    ) {
        let region_ok = !self.region.is_empty()
            && self
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !region_ok {
            err(
                &format!("{path}.region"),
                format!("{:?} is not an AWS region such as eu-west-1", self.region),
            );
        }
        match &self.role_arn {
            Some(arn) if !(arn.starts_with("arn:") && arn.contains(":role/")) => {
                err(
                    &format!("{path}.roleArn"),
                    format!("{arn:?} is not a role ARN (arn:aws:iam::<account>:role/<name>)"),
                );
            }
            None if matches!(self.service_account_token, ServiceAccountToken::File(_)) => {
                err(&format!("{path}.roleArn"), "must be set when the token comes from a file (there is no ServiceAccount to read it from)".into());
            }
            _ => {}
        }
        if !(900..=43200).contains(&self.duration_seconds) {
            err(
                &format!("{path}.durationSeconds"),
                "must be between 900 and 43200 (STS limits)".into(),
            );
        }
        if region_ok {
            super::validate_endpoint(
                &format!("{path}.stsEndpoint"),
                &self.sts_endpoint(),
                checks.allow_plain_http,
                err,
            );
            super::validate_endpoint(
                &format!("{path}.ecrEndpoint"),
                &self.ecr_endpoint(),
                checks.allow_plain_http,
                err,
            );
        }
        self.service_account_token
            .validate(&format!("{path}.serviceAccountToken"), err);
    }

    /// The annotation read when the config sets no `roleArn`.
    pub(crate) fn annotation_keys(&self) -> Vec<&'static str> {
        match self.role_arn {
            Some(_) => vec![],
            None => vec![ROLE_ANNOTATION],
        }
    }

    /// The STS call, then the signed ECR call with the keys it gave.
    pub(crate) async fn exchange(
        &self,
        http: &http::HttpClient,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        let role_arn = id.setting(NAME, &self.role_arn, ROLE_ANNOTATION, "roleArn")?;
        let keys = self.assume_role(http, id, &role_arn).await?;
        let answer = self.authorization_token(http, id.token, &keys).await?;
        credential(answer)
    }

    /// `AssumeRoleWithWebIdentity`: temporary keys for `role_arn`. Not signed: the web identity
    /// token is the credential.
    async fn assume_role(
        &self,
        http: &http::HttpClient,
        id: &Presented<'_>,
        role_arn: &str,
    ) -> Result<StsKeys, MintError> {
        let sa_token = id.token;
        let session_name = session_name(id.namespace);
        let duration = self.duration_seconds.to_string();
        let form = [
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", role_arn),
            ("RoleSessionName", session_name.as_str()),
            ("WebIdentityToken", sa_token.expose()),
            ("DurationSeconds", duration.as_str()),
        ];
        let sts_url = format!("{}/", super::base(&self.sts_endpoint()));
        let body = http
            .send(NAME, &[sa_token], |c| c.post(&sts_url).form(&form))
            .await?;
        let text = String::from_utf8_lossy(&body);
        let field = |tag: &str| {
            http::xml_text(&text, tag).ok_or_else(|| MintError::Unusable {
                source_name: NAME,
                reason: format!("the STS answer has no <{tag}>"),
            })
        };
        Ok(StsKeys {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: Sensitive::new(field("SecretAccessKey")?),
            session_token: Sensitive::new(field("SessionToken")?),
        })
    }

    /// `GetAuthorizationToken`, signed (SigV4) with the STS keys. `sa_token` is only redacted
    /// from what an error shows.
    async fn authorization_token(
        &self,
        http: &http::HttpClient,
        sa_token: &Sensitive,
        sts: &StsKeys,
    ) -> Result<AuthorizationResponse, MintError> {
        let ecr_url = reqwest::Url::parse(&format!("{}/", super::base(&self.ecr_endpoint())))
            .map_err(|e| MintError::Settings {
                source_name: NAME,
                message: format!("ecrEndpoint: {e}"),
            })?;
        let host = match (ecr_url.host_str(), ecr_url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => {
                return Err(MintError::Settings {
                    source_name: NAME,
                    message: "ecrEndpoint has no host".into(),
                })
            }
        };
        let keys = AwsKeys {
            access_key_id: &sts.access_key_id,
            secret_access_key: sts.secret_access_key.expose(),
            session_token: Some(sts.session_token.expose()),
        };
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            (
                "x-amz-target",
                "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken",
            ),
        ];
        let secrets = [sa_token, &sts.secret_access_key, &sts.session_token];
        let body = http
            .send(NAME, &secrets, |c| {
                // Signed per attempt: the signature carries the time.
                let request = SignableRequest {
                    method: "POST",
                    host: &host,
                    path: ecr_url.path(),
                    query: &[],
                    headers: &headers,
                    body: b"{}",
                };
                let mut builder = c.post(ecr_url.clone()).body("{}");
                for (k, v) in headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain(sigv4::sign(
                        &request,
                        &keys,
                        &self.region,
                        "ecr",
                        Timestamp::now(),
                    ))
                {
                    builder = builder.header(k, v);
                }
                builder
            })
            .await?;
        Ok(http::parse_json(
            NAME,
            "a GetAuthorizationToken response",
            &body,
        )?)
    }
}

/// The temporary keys STS hands out.
struct StsKeys {
    access_key_id: String,
    secret_access_key: Sensitive,
    session_token: Sensitive,
}

/// The credential in a `GetAuthorizationToken` answer: `user:password`, base64, and its expiry.
fn credential(answer: AuthorizationResponse) -> Result<Credential, MintError> {
    let data = answer
        .authorization_data
        .into_iter()
        .next()
        .ok_or(MintError::Unusable {
            source_name: NAME,
            reason: "authorizationData is empty".into(),
        })?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(data.authorization_token.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(MintError::Unusable {
            source_name: NAME,
            reason: "authorizationToken is not base64 text".into(),
        })?;
    let Some((username, password)) = decoded.split_once(':') else {
        return Err(MintError::Unusable {
            source_name: NAME,
            reason: "authorizationToken is not user:password".into(),
        });
    };
    let expires_at =
        Timestamp::from_second(data.expires_at as i64).map_err(|_| MintError::Unusable {
            source_name: NAME,
            reason: format!("expiresAt {} is out of range", data.expires_at),
        })?;
    super::checked(
        NAME,
        username.to_string(),
        Sensitive::new(password),
        expires_at,
    )
}

/// STS session names allow `[\w+=,.@-]` and at most 64 characters; the namespace fits (it
/// shows in CloudTrail, telling which namespace pulled).
fn session_name(namespace: &str) -> String {
    let name = format!("pull-secret-injector-{namespace}");
    name.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sts_xml() {
        let doc = "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\n<AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>s&amp;k</SecretAccessKey></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>";
        assert_eq!(
            http::xml_text(doc, "AccessKeyId").as_deref(),
            Some("ASIAEXAMPLE")
        );
        assert_eq!(
            http::xml_text(doc, "SecretAccessKey").as_deref(),
            Some("s&k")
        );
        assert_eq!(http::xml_text(doc, "SessionToken"), None);
    }

    #[test]
    fn session_names_fit_sts_limits() {
        assert_eq!(session_name("team-a"), "pull-secret-injector-team-a");
        assert_eq!(session_name(&"n".repeat(63)).len(), 64);
    }
}
