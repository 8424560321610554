//! The `declarative` source: a token exchange described in the config, for a registry that has
//! no source of its own. One request (method, URL, extra fields and headers) carries the
//! service-account token where the registry wants it (a Bearer header, a Basic password, a form
//! or a JSON field); JSON pointers say where the answer keeps the token, its lifetime and the
//! username. The registry sources that are one such request (`artifactory`, `cloudsmith`,
//! `artifactKeeper`, `dockerHub`) are presets of this one: they build a [`DeclarativeSource`]
//! and run it.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use serde_json::Value;

use super::kubernetes::ServiceAccountToken;
use super::{Checks, Credential, MintError, Presented, Sensitive};
use crate::http;

const NAME: &str = "declarative";

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    #[default]
    Post,
}

/// Where the service-account token goes.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Place {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `Authorization: Basic <basicUsername>:<token>`.
    BasicPassword,
    /// A field of a form body.
    FormField,
    /// A field of a JSON object body.
    JsonField,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum BodyFormat {
    Json,
    Form,
}

/// `token:` the placement of the service-account token.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    #[serde(rename = "in")]
    pub place: Place,
    /// The field name, for `formField` and `jsonField`.
    #[serde(default)]
    pub field: Option<String>,
    /// The Basic username, for `basicPassword`.
    #[serde(default)]
    pub basic_username: Option<String>,
}

/// `answer:` JSON pointers (RFC 6901) into a 2xx answer.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Answer {
    /// The credential. Default `/access_token`.
    #[serde(default = "default_token_pointer")]
    pub token: String,
    /// Seconds the credential lasts, from now.
    #[serde(default)]
    pub expires_in: Option<String>,
    /// When it expires: seconds since the epoch, or RFC 3339.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// The username to write beside it (else `username`).
    #[serde(default)]
    pub username: Option<String>,
}

fn default_token_pointer() -> String {
    "/access_token".into()
}

impl Default for Answer {
    fn default() -> Self {
        Self {
            token: default_token_pointer(),
            expires_in: None,
            expires_at: None,
            username: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeclarativeSource {
    #[serde(default)]
    pub method: Method,
    pub url: String,
    /// The `aud` of the service-account token.
    pub audience: String,
    pub token: Placement,
    /// How `fields` (and a `formField`/`jsonField` token) are sent with POST. Default: `form`
    /// for a `formField` token, else `json`. With GET, fields go in the query.
    #[serde(default)]
    pub body: Option<BodyFormat>,
    /// Sent besides the token, as they are.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub answer: Answer,
    /// Written beside the credential when the answer names no username.
    #[serde(default)]
    pub username: Option<String>,
    /// The lifetime when the answer gives none and the token is not a JWT with `exp`.
    #[serde(default, deserialize_with = "crate::core::duration::optional_field")]
    pub fallback_lifetime: Option<Duration>,
    #[serde(default)]
    pub service_account_token: ServiceAccountToken,
}

impl DeclarativeSource {
    fn body_format(&self) -> BodyFormat {
        match (self.body, self.token.place) {
            (Some(b), _) => b,
            (None, Place::FormField) => BodyFormat::Form,
            (None, _) => BodyFormat::Json,
        }
    }

    pub(crate) fn validate(&self, path: &str, checks: Checks, err: &mut impl FnMut(&str, String)) {
        super::validate_endpoint(
            &format!("{path}.url"),
            &self.url,
            checks.allow_plain_http,
            err,
        );
        if self.audience.trim().is_empty() {
            err(&format!("{path}.audience"), "must not be empty".into());
        }
        let token = format!("{path}.token");
        let field = self.token.field.as_deref().map(str::trim);
        let basic = self.token.basic_username.as_deref();
        match self.token.place {
            Place::FormField | Place::JsonField => {
                match field {
                    None | Some("") => err(&format!("{token}.field"), "must name the field".into()),
                    Some(f) if self.fields.contains_key(f) => err(
                        &format!("{token}.field"),
                        format!("{f:?} is also in fields: the token would be sent twice"),
                    ),
                    Some(_) => {}
                }
                if self.method == Method::Get {
                    err(
                        &format!("{path}.method"),
                        "GET sends no body, and a token in the query would end up in logs: use POST".into(),
                    );
                }
                let wanted = match self.token.place {
                    Place::FormField => BodyFormat::Form,
                    _ => BodyFormat::Json,
                };
                if self.body_format() != wanted {
                    err(
                        &format!("{path}.body"),
                        format!("must be {wanted:?} for a token in a {:?}", self.token.place)
                            .to_lowercase(),
                    );
                }
            }
            Place::BasicPassword if basic.is_none_or(|u| u.is_empty() || u.contains(':')) => {
                err(
                    &format!("{token}.basicUsername"),
                    "must be set, without ':', for a token in basicPassword".into(),
                );
            }
            _ => {}
        }
        if field.is_some() && !matches!(self.token.place, Place::FormField | Place::JsonField) {
            err(
                &format!("{token}.field"),
                "only for formField and jsonField".into(),
            );
        }
        if basic.is_some() && self.token.place != Place::BasicPassword {
            err(
                &format!("{token}.basicUsername"),
                "only for basicPassword".into(),
            );
        }
        for (name, value) in &self.headers {
            let header = format!("{path}.headers.{name}");
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                err(&header, format!("{name:?} is not a header name"));
            } else if name.eq_ignore_ascii_case("authorization")
                && matches!(self.token.place, Place::Bearer | Place::BasicPassword)
            {
                err(&header, "the token's placement already sets it".into());
            }
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                err(&header, "is not a valid header value".into());
            }
        }
        let answer = format!("{path}.answer");
        let pointers = [
            ("token", Some(&self.answer.token)),
            ("expiresIn", self.answer.expires_in.as_ref()),
            ("expiresAt", self.answer.expires_at.as_ref()),
            ("username", self.answer.username.as_ref()),
        ];
        for (name, pointer) in pointers {
            if let Some(p) = pointer.filter(|p| !p.starts_with('/')) {
                err(
                    &format!("{answer}.{name}"),
                    format!("{p:?} is not a JSON pointer (it starts with '/', e.g. /access_token)"),
                );
            }
        }
        if self.answer.expires_in.is_some() && self.answer.expires_at.is_some() {
            err(
                &format!("{answer}.expiresAt"),
                "set expiresIn or expiresAt, not both".into(),
            );
        }
        if self.answer.username.is_none() && self.username.as_deref().is_none_or(str::is_empty) {
            err(
                &format!("{path}.username"),
                "must be set when answer.username is not".into(),
            );
        }
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

    pub(crate) async fn exchange(
        &self,
        http: &http::HttpClient,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        self.run(NAME, http, id).await
    }

    /// Sends the request and reads the answer; `source_name` is the preset's name in errors.
    pub(crate) async fn run(
        &self,
        source_name: &'static str,
        http: &http::HttpClient,
        id: &Presented<'_>,
    ) -> Result<Credential, MintError> {
        let sa_token = id.token;
        let mut fields: Vec<(&str, &str)> = self
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let (Place::FormField | Place::JsonField, Some(f)) =
            (self.token.place, self.token.field.as_deref())
        {
            fields.push((f, sa_token.expose()));
        }
        let json: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let body = http
            .send(source_name, &[sa_token], |c| {
                let mut r = match self.method {
                    Method::Get => c.get(&self.url).query(&fields),
                    Method::Post if fields.is_empty() => c.post(&self.url),
                    Method::Post => match self.body_format() {
                        BodyFormat::Form => c.post(&self.url).form(&fields),
                        BodyFormat::Json => c.post(&self.url).json(&json),
                    },
                };
                r = r.header(reqwest::header::ACCEPT, "application/json");
                for (k, v) in &self.headers {
                    r = r.header(k, v);
                }
                match self.token.place {
                    Place::Bearer => r.bearer_auth(sa_token.expose()),
                    Place::BasicPassword => r.basic_auth(
                        self.token.basic_username.as_deref().unwrap_or_default(),
                        Some(sa_token.expose()),
                    ),
                    Place::FormField | Place::JsonField => r,
                }
            })
            .await?;
        let answer: Value = http::parse_json(source_name, "a JSON answer", &body)?;
        let (username, token, expires_at) =
            self.read_answer(source_name, &answer, Timestamp::now())?;
        super::checked(source_name, username, token, expires_at)
    }

    /// The username, the credential and its expiry from a 2xx answer: the lifetime from
    /// `expiresIn`/`expiresAt`, else the token's own `exp`, else `fallbackLifetime`.
    pub(crate) fn read_answer(
        &self,
        source_name: &'static str,
        answer: &Value,
        now: Timestamp,
    ) -> Result<(String, Sensitive, Timestamp), MintError> {
        let unusable = |reason: String| MintError::Unusable {
            source_name,
            reason,
        };
        let at = |pointer: &str| answer.pointer(pointer).filter(|v| !v.is_null());
        let token = at(&self.answer.token)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unusable(format!(
                    "the answer has no string at {} (answer.token)",
                    self.answer.token
                ))
            })?;
        let username = match self.answer.username.as_deref().and_then(at) {
            Some(v) => v
                .as_str()
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .ok_or_else(|| unusable("the answer's username is not a string".into()))?,
            None => self.username.clone().ok_or_else(|| {
                unusable("the answer names no username and the config sets none".into())
            })?,
        };
        let in_range = |t: Result<Timestamp, jiff::Error>, what: &str| {
            t.map_err(|_| unusable(format!("{what} is out of range")))
        };
        let expires_at = if let Some(v) = self.answer.expires_in.as_deref().and_then(at) {
            let seconds = number(v).ok_or_else(|| unusable("expires_in is not a number".into()))?;
            in_range(
                now.checked_add(SignedDuration::from_secs(seconds)),
                "expires_in",
            )?
        } else if let Some(v) = self.answer.expires_at.as_deref().and_then(at) {
            match (number(v), v.as_str()) {
                (Some(seconds), _) => in_range(Timestamp::from_second(seconds), "the expiry")?,
                (None, Some(text)) => text
                    .parse::<Timestamp>()
                    .map_err(|_| unusable("the expiry is not RFC 3339".into()))?,
                _ => return Err(unusable("the expiry is not a time".into())),
            }
        } else if let Ok(exp) = crate::core::jwt::expiry(token) {
            exp
        } else if let Some(d) = self.fallback_lifetime {
            in_range(
                now.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)),
                "fallbackLifetime",
            )?
        } else {
            return Err(unusable(
                "the answer gives no lifetime and the token is not a JWT with exp: set fallbackLifetime".into(),
            ));
        };
        Ok((username, Sensitive::new(token), expires_at))
    }
}

/// A whole number of seconds, as a JSON number or a string of digits.
fn number(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(yaml: &str) -> DeclarativeSource {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn errors(yaml: &str) -> Vec<String> {
        let mut out = Vec::new();
        source(yaml).validate(
            "registries[0].declarative",
            Checks::default(),
            &mut |p, m| out.push(format!("{p}: {m}")),
        );
        out
    }

    const NOW: i64 = 1_800_000_000;

    fn read(yaml: &str, answer: Value) -> Result<(String, String, i64), String> {
        source(yaml)
            .read_answer(NAME, &answer, Timestamp::from_second(NOW).unwrap())
            .map(|(u, t, e)| (u, t.expose().to_string(), e.as_second()))
            .map_err(|e| e.to_string())
    }

    const BASE: &str =
        "{url: https://r.example/token, audience: r, token: {in: bearer}, username: robot, ";

    #[test]
    fn the_lifetime_comes_from_the_answer_then_the_jwt_then_the_fallback() {
        let with = |extra: &str| format!("{BASE}{extra}}}");
        let expires_in = with("answer: {expiresIn: /expires_in}");
        assert_eq!(
            read(&expires_in, json!({"access_token": "t", "expires_in": 900})),
            Ok(("robot".into(), "t".into(), NOW + 900))
        );
        assert_eq!(
            read(
                &expires_in,
                json!({"access_token": "t", "expires_in": "900"})
            )
            .map(|r| r.2),
            Ok(NOW + 900),
            "digits in a string"
        );
        let expires_at = with("answer: {token: /data/token, expiresAt: /data/expiry}");
        assert_eq!(
            read(
                &expires_at,
                json!({"data": {"token": "t", "expiry": "2027-01-15T09:00:00+01:00"}})
            )
            .map(|r| r.2),
            Ok(1_800_000_000),
            "RFC 3339, offset applied"
        );
        assert_eq!(
            read(
                &expires_at,
                json!({"data": {"token": "t", "expiry": NOW + 60}})
            )
            .map(|r| r.2),
            Ok(NOW + 60)
        );
        // No lifetime in the answer: a JWT's exp.
        let b = |s: &str| crate::core::jwt::encode_part(s.as_bytes());
        let jwt = format!(
            "{}.{}.sig",
            b("{}"),
            b(&format!("{{\"exp\":{}}}", NOW + 300))
        );
        assert_eq!(
            read(&expires_in, json!({"access_token": jwt})).map(|r| r.2),
            Ok(NOW + 300)
        );
        // Opaque and silent: the fallback, or a refusal that says what to set.
        let e = read(&expires_in, json!({"access_token": "opaque"})).unwrap_err();
        assert!(e.contains("set fallbackLifetime"), "{e}");
        let fallback = with("fallbackLifetime: 2h");
        assert_eq!(
            read(&fallback, json!({"access_token": "opaque"})).map(|r| r.2),
            Ok(NOW + 7200)
        );
    }

    #[test]
    fn username_and_token_are_read_where_the_pointers_say() {
        let yaml = format!(
            "{BASE}answer: {{token: /token, username: /user/name, expiresIn: /expires_in}}}}"
        );
        assert_eq!(
            read(
                &yaml,
                json!({"token": "t", "user": {"name": "ci-bot"}, "expires_in": 5})
            )
            .map(|r| r.0),
            Ok("ci-bot".into()),
            "the answer's username wins over the configured one"
        );
        assert_eq!(
            read(&yaml, json!({"token": "t", "expires_in": 5})).map(|r| r.0),
            Ok("robot".into()),
            "without one in the answer, the configured username"
        );
        let e = read(&yaml, json!({"access_token": "t"})).unwrap_err();
        assert!(e.contains("no string at /token"), "{e}");
        let e = read(&yaml, json!({"token": ""})).unwrap_err();
        assert!(e.contains("no string at /token"), "empty is no token: {e}");
        let e = read(&yaml, json!({"token": "t", "user": {"name": 7}})).unwrap_err();
        assert!(e.contains("username is not a string"), "{e}");
    }

    #[test]
    fn check_config_names_each_bad_field() {
        let e = errors(
            "{method: GET, url: http://r.example, audience: '', token: {in: formField, field: tok, basicUsername: u}, \
             body: json, fields: {tok: x}, headers: {'bad header': v}, answer: {token: access_token, expiresIn: /a, expiresAt: /b}}",
        );
        let paths: Vec<&str> = e.iter().map(|l| l.split(": ").next().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "registries[0].declarative.url",
                "registries[0].declarative.audience",
                "registries[0].declarative.token.field",
                "registries[0].declarative.method",
                "registries[0].declarative.body",
                "registries[0].declarative.token.basicUsername",
                "registries[0].declarative.headers.bad header",
                "registries[0].declarative.answer.token",
                "registries[0].declarative.answer.expiresAt",
                "registries[0].declarative.username",
            ],
            "{e:#?}"
        );
        assert!(e[0].contains("plain http"), "{}", e[0]);
        let e = errors(
            "{url: https://r.example, audience: a, token: {in: basicPassword}, username: u}",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("registries[0].declarative.token.basicUsername: "));
        let e = errors("{url: https://r.example, audience: a, token: {in: bearer}, headers: {Authorization: x}, username: u, fallbackLifetime: 10s}");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(errors("{url: https://r.example, audience: a, token: {in: jsonField, field: subject_token}, answer: {username: /username}}").is_empty());
        assert!(serde_yaml::from_str::<DeclarativeSource>(
            "{url: https://r.example, audience: a, token: {in: cookie}}"
        )
        .is_err());
    }
}
