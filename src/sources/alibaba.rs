//! The `alibaba` source: Alibaba Cloud Container Registry (Enterprise Edition) through RRSA.
//! The service-account token (audience `sts.aliyuncs.com`) is exchanged with STS
//! `AssumeRoleWithOIDC` (unsigned: the token is the credential) for temporary keys of a RAM
//! role that trusts the cluster's OIDC provider; those keys sign (RPC signature 1.0,
//! HMAC-SHA1) the registry's `GetAuthorizationToken`, answered with a temporary username,
//! password and expiry.

use std::collections::BTreeMap;

use base64::Engine;
use jiff::Timestamp;
use serde::Deserialize;

use super::kubernetes::ServiceAccountToken;
use super::{Checks, Credential, MintError, Presented, Sensitive};
use crate::http;

const NAME: &str = "alibaba";
const CR_VERSION: &str = "2018-12-01";
const STS_VERSION: &str = "2015-04-01";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlibabaSource {
    /// The instance's region, e.g. `cn-hangzhou`.
    pub region: String,
    /// The Enterprise Edition instance, `cri-...`.
    pub instance_id: String,
    /// `acs:ram::<account>:role/<name>`.
    pub role_arn: String,
    /// `acs:ram::<account>:oidc-provider/<name>`: the cluster's issuer, as registered in RAM.
    pub oidc_provider_arn: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Lifetime of the STS keys; they are used once, right away.
    #[serde(default = "default_duration")]
    pub duration_seconds: u32,
    /// Default `https://sts.<region>.aliyuncs.com`.
    #[serde(default)]
    pub sts_endpoint: Option<String>,
    /// Default `https://cr.<region>.aliyuncs.com`.
    #[serde(default)]
    pub cr_endpoint: Option<String>,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

fn default_audience() -> String {
    "sts.aliyuncs.com".into()
}

fn default_duration() -> u32 {
    900
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsAnswer {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    access_key_secret: String,
    security_token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AuthorizationAnswer {
    #[serde(default)]
    is_success: Option<bool>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    authorization_token: String,
    #[serde(default)]
    temp_username: String,
    /// Milliseconds since the epoch.
    #[serde(default)]
    expire_time: Option<i64>,
}

impl AlibabaSource {
    fn sts_endpoint(&self) -> String {
        self.sts_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://sts.{}.aliyuncs.com", self.region))
    }

    fn cr_endpoint(&self) -> String {
        self.cr_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://cr.{}.aliyuncs.com", self.region))
    }

    pub(crate) fn validate(&self, path: &str, checks: Checks, err: &mut impl FnMut(&str, String)) {
        let region_ok = !self.region.is_empty()
            && self
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !region_ok {
            err(
                &format!("{path}.region"),
                format!("{:?} is not a region such as cn-hangzhou", self.region),
            );
        }
        if !self.instance_id.starts_with("cri-") {
            err(
                &format!("{path}.instanceId"),
                format!(
                    "{:?} is not an Enterprise Edition instance id (cri-...)",
                    self.instance_id
                ),
            );
        }
        let arn = |field: &str, value: &str, kind: &str| {
            (!(value.starts_with("acs:ram::") && value.contains(&format!(":{kind}/")))).then(|| {
                (
                    format!("{path}.{field}"),
                    format!("{value:?} is not a RAM {kind} ARN (acs:ram::<account>:{kind}/<name>)"),
                )
            })
        };
        for (p, m) in [
            arn("roleArn", &self.role_arn, "role"),
            arn("oidcProviderArn", &self.oidc_provider_arn, "oidc-provider"),
        ]
        .into_iter()
        .flatten()
        {
            err(&p, m);
        }
        if self.audience.trim().is_empty() {
            err(&format!("{path}.audience"), "must not be empty".into());
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
                &format!("{path}.crEndpoint"),
                &self.cr_endpoint(),
                checks.allow_plain_http,
                err,
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
        let session = session_name(id.namespace);
        let duration = self.duration_seconds.to_string();
        let timestamp = timestamp(Timestamp::now());
        // Unsigned, like AWS's web identity call; in the body so the token stays out of URLs.
        let form = [
            ("Action", "AssumeRoleWithOIDC"),
            ("Version", STS_VERSION),
            ("Format", "JSON"),
            ("Timestamp", timestamp.as_str()),
            ("RoleArn", self.role_arn.as_str()),
            ("OIDCProviderArn", self.oidc_provider_arn.as_str()),
            ("OIDCToken", sa_token.expose()),
            ("RoleSessionName", session.as_str()),
            ("DurationSeconds", duration.as_str()),
        ];
        let sts_url = format!("{}/", super::base(&self.sts_endpoint()));
        let body = http
            .send(NAME, &[sa_token], |c| c.post(&sts_url).form(&form))
            .await?;
        let sts: StsAnswer = http::parse_json(NAME, "an AssumeRoleWithOIDC answer", &body)?;
        let keys = sts.credentials;
        let secret = Sensitive::new(keys.access_key_secret);
        let security_token = Sensitive::new(keys.security_token);

        let cr_url = format!("{}/", super::base(&self.cr_endpoint()));
        let secrets = [sa_token, &secret, &security_token];
        let body = http
            .send(NAME, &secrets, |c| {
                // Signed per attempt: the signature covers the time and a fresh nonce.
                let mut params: BTreeMap<&str, String> = [
                    ("AccessKeyId", keys.access_key_id.clone()),
                    ("Action", "GetAuthorizationToken".into()),
                    ("Format", "JSON".into()),
                    ("InstanceId", self.instance_id.clone()),
                    ("SecurityToken", security_token.expose().to_string()),
                    ("SignatureMethod", "HMAC-SHA1".into()),
                    ("SignatureNonce", format!("{:032x}", fastrand::u128(..))),
                    ("SignatureVersion", "1.0".into()),
                    ("Timestamp", self::timestamp(Timestamp::now())),
                    ("Version", CR_VERSION.into()),
                ]
                .into();
                let signature = sign("POST", &params, secret.expose());
                params.insert("Signature", signature);
                c.post(&cr_url).form(&params)
            })
            .await?;
        let answer: AuthorizationAnswer =
            http::parse_json(NAME, "a GetAuthorizationToken answer", &body)?;
        let unusable = |reason: String| MintError::Unusable {
            source_name: NAME,
            reason,
        };
        if answer.is_success == Some(false) {
            return Err(unusable(format!(
                "GetAuthorizationToken did not succeed: {}",
                http::describe_body(answer.code.unwrap_or_default().as_bytes(), &secrets)
            )));
        }
        if answer.temp_username.is_empty() {
            return Err(unusable("the answer has no TempUsername".into()));
        }
        let millis = answer
            .expire_time
            .ok_or_else(|| unusable("the answer has no ExpireTime".into()))?;
        let expires_at = Timestamp::from_millisecond(millis)
            .map_err(|_| unusable(format!("ExpireTime {millis} is out of range")))?;
        super::checked(
            NAME,
            answer.temp_username,
            Sensitive::new(answer.authorization_token),
            expires_at,
        )
    }
}

/// `pull-secret-injector-<namespace>`, within STS's 64 characters.
fn session_name(namespace: &str) -> String {
    let mut name = format!("pull-secret-injector-{namespace}");
    name.truncate(64);
    name
}

/// ISO 8601 in UTC to the second, as the RPC APIs take it.
fn timestamp(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// RFC 3986 percent-encoding: only `A-Z a-z 0-9 - _ . ~` stay as they are.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// RPC signature 1.0: HMAC-SHA1, keyed with `<secret>&`, of
/// `METHOD&%2F&<the encoded, sorted, encoded-again parameters>`, in base64.
pub fn sign(method: &str, params: &BTreeMap<&str, String>, secret: &str) -> String {
    let canonical: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect();
    let to_sign = format!(
        "{method}&{}&{}",
        percent_encode("/"),
        percent_encode(&canonical.join("&"))
    );
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        format!("{secret}&").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD
        .encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_documented_example() {
        // The worked example of Alibaba Cloud's RPC signature documentation.
        let params: BTreeMap<&str, String> = [
            ("AccessKeyId", "testid"),
            ("Action", "DescribeRegions"),
            ("Format", "XML"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
            ("SignatureVersion", "1.0"),
            ("Timestamp", "2016-02-23T12:46:24Z"),
            ("Version", "2014-05-26"),
        ]
        .map(|(k, v)| (k, v.to_string()))
        .into();
        assert_eq!(
            sign("GET", &params, "testsecret"),
            "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
        );
    }

    #[test]
    fn encoding_and_names() {
        assert_eq!(percent_encode("a b*c~d/é"), "a%20b%2Ac~d%2F%C3%A9");
        assert_eq!(
            timestamp(Timestamp::from_second(1_456_231_584).unwrap()),
            "2016-02-23T12:46:24Z"
        );
        assert_eq!(session_name(&"n".repeat(63)).len(), 64);
    }
}
