//! The kubelet's exec plugin protocol, `credentialprovider.kubelet.k8s.io/v1`: one
//! `CredentialProviderRequest` on stdin, one `CredentialProviderResponse` on stdout. Pure: no
//! I/O, the clock is an argument. The request is read as a JSON tree and picked apart by hand,
//! so that no parse error can quote a value (the token is one).

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{json, Value};

use crate::core::credential::{Credential, Sensitive};
use crate::core::jwt;

pub(crate) const API_VERSION: &str = "credentialprovider.kubelet.k8s.io/v1";
const REQUEST_KIND: &str = "CredentialProviderRequest";
const RESPONSE_KIND: &str = "CredentialProviderResponse";

/// A credential is reused until this share of its lifetime is left, as the service renews
/// pull Secrets (`refresh.renewBefore`'s default).
const REMAINING_SHARE: u32 = 3;
/// Never handed out again with less than this left: a pull must still start with it.
const MIN_REMAINING: Duration = Duration::from_secs(60);

/// What the kubelet asks for.
#[derive(Debug)]
pub(crate) struct Request {
    pub image: String,
    /// The Pod's token, with the audience of `tokenAttributes.serviceAccountTokenAudience`;
    /// absent without `tokenAttributes`, or for a Pod without a ServiceAccount.
    pub service_account_token: Option<Sensitive>,
    /// The ServiceAccount's annotations that `tokenAttributes` lists.
    pub service_account_annotations: BTreeMap<String, String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "the request on stdin is not JSON ({0}); the kubelet sends one CredentialProviderRequest"
    )]
    NotJson(String),
    #[error("the request's apiVersion is {}, not {API_VERSION}: set apiVersion: {API_VERSION} for this provider in the kubelet's CredentialProviderConfig", .0.as_deref().map_or("missing".to_string(), |v| format!("{v:?}")))]
    ApiVersion(Option<String>),
    #[error("the request's kind is {0:?}, not {REQUEST_KIND}")]
    Kind(String),
    #[error("the request has no image")]
    NoImage,
    #[error("the request's {field} is not {expected}")]
    Field {
        field: &'static str,
        expected: &'static str,
    },
}

/// Reads a `CredentialProviderRequest`.
pub(crate) fn parse_request(input: &[u8]) -> Result<Request, RequestError> {
    // A syntax error names a line and column, never the text around it.
    let doc: Value =
        serde_json::from_slice(input).map_err(|e| RequestError::NotJson(e.to_string()))?;
    let Value::Object(doc) = doc else {
        return Err(RequestError::Field {
            field: "body",
            expected: "a JSON object",
        });
    };
    let string = |field: &'static str| match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RequestError::Field {
            field,
            expected: "a string",
        }),
    };
    match string("apiVersion") {
        Ok(Some(v)) if v == API_VERSION => {}
        Ok(other) => return Err(RequestError::ApiVersion(other)),
        Err(_) => return Err(RequestError::ApiVersion(Some("<not a string>".into()))),
    }
    match string("kind")? {
        Some(k) if k != REQUEST_KIND => return Err(RequestError::Kind(k)),
        _ => {}
    }
    let image = string("image")?
        .filter(|i| !i.trim().is_empty())
        .ok_or(RequestError::NoImage)?;
    let service_account_token = string("serviceAccountToken")?
        .filter(|t| !t.is_empty())
        .map(Sensitive::new);
    let service_account_annotations = match doc.get("serviceAccountAnnotations") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(RequestError::Field {
                    field: "serviceAccountAnnotations",
                    expected: "a map of strings",
                }),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(RequestError::Field {
                field: "serviceAccountAnnotations",
                expected: "a map of strings",
            })
        }
    };
    Ok(Request {
        image,
        service_account_token,
        service_account_annotations,
    })
}

/// Who a Kubernetes service-account token names and for whom it is meant, read without
/// verifying it (the exchange's other end verifies).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TokenIdentity {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
}

/// The identity in `token`'s claims, or what is wrong with it (never the token).
pub(crate) fn token_identity(token: &str) -> Result<TokenIdentity, String> {
    let claims = jwt::claims(token)?;
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
    let Some((namespace, service_account)) = sub
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
    else {
        return Err(
            "not a service-account token (its sub is not system:serviceaccount:<namespace>:<name>)"
                .into(),
        );
    };
    let audiences = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    };
    Ok(TokenIdentity {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        audiences,
    })
}

/// How long the kubelet may reuse `credential` for other Pods of the same ServiceAccount:
/// until a third of its lifetime is left (at least a minute). Zero, never reused, for a
/// pass-through token (it is bound to one Pod) and for a credential already that close to
/// its expiry.
pub(crate) fn cache_duration(
    credential: &Credential,
    pass_through: bool,
    now: Timestamp,
) -> Duration {
    if pass_through {
        return Duration::ZERO;
    }
    let whole_seconds = |from: Timestamp, to: Timestamp| {
        Duration::from_secs(u64::try_from(to.as_second() - from.as_second()).unwrap_or(0))
    };
    let lifetime = whole_seconds(credential.issued_at, credential.expires_at);
    let remaining = whole_seconds(now, credential.expires_at);
    let margin = (lifetime / REMAINING_SHARE).max(MIN_REMAINING);
    remaining.saturating_sub(margin)
}

/// The answer for one registry.
#[derive(Debug)]
pub struct Response {
    /// The registry as the image names it, so that the kubelet's keyring matches the image.
    pub registry: String,
    pub username: String,
    pub password: Sensitive,
    pub cache_duration: Duration,
}

impl Response {
    /// The `CredentialProviderResponse` JSON. `cacheKeyType: Registry`: the credential is good
    /// for the whole registry (the kubelet adds the ServiceAccount to the key with
    /// `cacheType: ServiceAccount`, the Pod's token with `Token`).
    pub fn to_json(&self) -> String {
        json!({
            "apiVersion": API_VERSION,
            "kind": RESPONSE_KIND,
            "cacheKeyType": "Registry",
            "cacheDuration": format!("{}s", self.cache_duration.as_secs()),
            "auth": {
                &self.registry: {
                    "username": self.username,
                    "password": self.password.expose(),
                }
            }
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: Value) -> String {
        let b = |v: &Value| jwt::encode_part(v.to_string().as_bytes());
        format!("{}.{}.c2ln", b(&json!({"alg": "RS256"})), b(&claims))
    }

    fn request(body: Value) -> Result<Request, RequestError> {
        parse_request(body.to_string().as_bytes())
    }

    #[test]
    fn reads_what_the_kubelet_sends() {
        let r = request(json!({
            "kind": "CredentialProviderRequest", "apiVersion": API_VERSION,
            "image": "registry.example.com/team-a/app:v1",
            "serviceAccountToken": "eyJ.secret-pod-token.sig",
            "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}
        }))
        .unwrap();
        assert_eq!(r.image, "registry.example.com/team-a/app:v1");
        assert_eq!(
            r.service_account_token.as_ref().map(Sensitive::expose),
            Some("eyJ.secret-pod-token.sig")
        );
        assert_eq!(
            r.service_account_annotations["eks.amazonaws.com/role-arn"],
            "arn:aws:iam::1:role/r"
        );
        // Without tokenAttributes the kubelet sends the image alone (omitempty).
        let r = request(json!({"kind": "CredentialProviderRequest", "apiVersion": API_VERSION, "image": "r.example/a"})).unwrap();
        assert!(r.service_account_token.is_none() && r.service_account_annotations.is_empty());
        let r = request(
            json!({"apiVersion": API_VERSION, "image": "r.example/a", "serviceAccountToken": ""}),
        )
        .unwrap();
        assert!(
            r.service_account_token.is_none(),
            "an empty token is no token"
        );
    }

    #[test]
    fn each_bad_request_has_its_own_message() {
        let v1beta1 = request(json!({"apiVersion": "credentialprovider.kubelet.k8s.io/v1beta1", "kind": "CredentialProviderRequest", "image": "a/b"})).unwrap_err();
        assert_eq!(
            v1beta1.to_string(),
            "the request's apiVersion is \"credentialprovider.kubelet.k8s.io/v1beta1\", not credentialprovider.kubelet.k8s.io/v1: set apiVersion: credentialprovider.kubelet.k8s.io/v1 for this provider in the kubelet's CredentialProviderConfig"
        );
        assert_eq!(
            request(json!({"image": "a/b"})).unwrap_err(),
            RequestError::ApiVersion(None)
        );
        assert_eq!(
            request(json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "image": "a"}))
                .unwrap_err(),
            RequestError::Kind("AdmissionReview".into())
        );
        assert_eq!(
            request(json!({"apiVersion": API_VERSION, "image": " "})).unwrap_err(),
            RequestError::NoImage
        );
        assert!(matches!(
            parse_request(b"{\"apiVersion\": "),
            Err(RequestError::NotJson(_))
        ));
        assert!(matches!(parse_request(b""), Err(RequestError::NotJson(_))));
    }

    #[test]
    fn a_misshapen_request_never_echoes_its_values() {
        for body in [
            json!({"apiVersion": API_VERSION, "image": "a/b", "serviceAccountToken": {"t": "secret-pod-token"}}),
            json!({"apiVersion": API_VERSION, "image": "a/b", "serviceAccountAnnotations": "secret-pod-token"}),
            json!({"apiVersion": API_VERSION, "image": ["secret-pod-token"]}),
            json!(["secret-pod-token"]),
        ] {
            let e = request(body).unwrap_err().to_string();
            assert!(!e.contains("secret-pod-token"), "{e}");
        }
        let e = parse_request(b"{\"serviceAccountToken\": \"secret-pod-token").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn token_identity_reads_sub_and_aud() {
        let t = jwt(
            json!({"sub": "system:serviceaccount:team-a:builder", "aud": ["registry.test"], "exp": 1}),
        );
        assert_eq!(
            token_identity(&t).unwrap(),
            TokenIdentity {
                namespace: "team-a".into(),
                service_account: "builder".into(),
                audiences: vec!["registry.test".into()]
            }
        );
        let t = jwt(json!({"sub": "system:serviceaccount:ns:sa", "aud": "one"}));
        assert_eq!(token_identity(&t).unwrap().audiences, ["one"]);
        for sub in [
            "alice",
            "system:serviceaccount:ns",
            "system:serviceaccount::sa",
        ] {
            let e = token_identity(&jwt(json!({"sub": sub}))).unwrap_err();
            assert!(e.contains("not a service-account token"), "{sub}: {e}");
        }
        let e = token_identity("opaque-secret-token").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    fn credential(issued: i64, expires: i64) -> Credential {
        Credential {
            username: "u".into(),
            password: Sensitive::new("p"),
            issued_at: Timestamp::from_second(issued).unwrap(),
            expires_at: Timestamp::from_second(expires).unwrap(),
        }
    }

    #[test]
    fn cache_duration_follows_the_credential_lifetime() {
        let t0 = 1_800_000_000;
        let at = |s: i64| Timestamp::from_second(t0 + s).unwrap();
        let secs = |d: Duration| d.as_secs();
        // Quay, Chainguard, tokenExchange: 1 h, reused for 40 min.
        let hour = credential(t0, t0 + 3600);
        assert_eq!(secs(cache_duration(&hour, false, at(0))), 2400);
        // Asked again 10 minutes in (another node): what is left until the same point.
        assert_eq!(secs(cache_duration(&hour, false, at(600))), 1800);
        // ECR's 12 h: 8 h. ACR's 3 h: 2 h.
        assert_eq!(
            secs(cache_duration(&credential(t0, t0 + 43200), false, at(0))),
            28800
        );
        assert_eq!(
            secs(cache_duration(&credential(t0, t0 + 10800), false, at(0))),
            7200
        );
        // Short ones keep at least a minute in hand; shorter still are not reused at all.
        assert_eq!(
            secs(cache_duration(&credential(t0, t0 + 90), false, at(0))),
            30
        );
        assert_eq!(
            secs(cache_duration(&credential(t0, t0 + 50), false, at(0))),
            0
        );
        assert_eq!(secs(cache_duration(&hour, false, at(3500))), 0);
        assert_eq!(secs(cache_duration(&hour, false, at(4000))), 0);
        // A pass-through token is bound to its Pod: never reused.
        assert_eq!(secs(cache_duration(&hour, true, at(0))), 0);
    }

    #[test]
    fn the_response_is_what_the_kubelet_decodes() {
        let r = Response {
            registry: "10.213.1.1:5000".into(),
            username: "org+robot".into(),
            password: Sensitive::new("robot-token"),
            cache_duration: Duration::from_secs(2400),
        };
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(
            v,
            json!({
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                "kind": "CredentialProviderResponse",
                "cacheKeyType": "Registry",
                "cacheDuration": "2400s",
                "auth": {"10.213.1.1:5000": {"username": "org+robot", "password": "robot-token"}}
            })
        );
        assert!(!format!("{r:?}").contains("robot-token"));
        let zero = Response {
            cache_duration: Duration::ZERO,
            ..r
        };
        assert!(zero.to_json().contains(r#""cacheDuration":"0s""#));
    }
}
