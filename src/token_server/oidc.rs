//! Verifies Kubernetes service-account tokens against the cluster's OIDC issuer: keys from the
//! issuer's discovery document (its `jwks_uri` only on the issuer's own host, over HTTPS) or a
//! configured JWKS URL, cached and fetched again when a token names a key not seen yet (the API
//! server rotated its key); RS256 only (the algorithm is pinned, so `none` or an HMAC "signed"
//! with the public key cannot pass); `iss`, `aud`, `exp` and `nbf` checked with a small leeway.
//! Errors say what failed, never echo the token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Deserialize;

use super::rules::Identity;
use crate::core::credential::Sensitive;
use crate::core::jwt;
use crate::http::{HttpClient, HttpConfig, ProxyEnv};

/// `issuer:` in the token server's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerConfig {
    /// The cluster's issuer, exactly as in the tokens' `iss`
    /// (`kubectl get --raw /.well-known/openid-configuration`).
    pub url: String,
    /// Where the keys are, when the issuer URL is not reachable from here (the API server's own
    /// `/openid/v1/jwks`). Default: `jwks_uri` of `<url>/.well-known/openid-configuration`, if
    /// it is on the issuer's own host, over https (the request carries `tokenFile`'s token).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Trusted besides the system's roots for those requests (the API server's CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A bearer token file for those requests, where the API server serves discovery only to
    /// authenticated clients (a projected token of the token server's own ServiceAccount).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Accepted `aud` values: what the `kubernetes` source's `audience` is set to.
    pub audiences: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("not a JWT: {0}")]
    Malformed(&'static str),
    #[error("algorithm {0:?} is not accepted (RS256 only)")]
    Algorithm(String),
    #[error("signed with an unknown key")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("issuer is not the configured one")]
    Issuer,
    #[error("audience is not accepted")]
    Audience,
    #[error("expired at {0}")]
    Expired(Timestamp),
    #[error("not valid before {0}")]
    NotYetValid(Timestamp),
    #[error("subject is not a ServiceAccount")]
    Subject,
    #[error("cannot fetch the issuer's keys: {0}")]
    Keys(String),
}

/// What a verified token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub subject: String,
    pub identity: Identity,
    pub expires_at: Timestamp,
}

struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

pub struct Verifier {
    config: IssuerConfig,
    http: HttpClient,
    leeway: Duration,
    keys: tokio::sync::RwLock<HashMap<String, RsaKey>>,
    /// One fetch at a time, at most every [`MIN_REFETCH`]: a stream of tokens with made-up key
    /// ids must not turn into a stream of requests to the API server. Holds when the last
    /// fetch ended.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches ended so far: a caller that waited for someone else's fetch takes its result
    /// instead of fetching again.
    fetches: std::sync::atomic::AtomicU64,
}

const MIN_REFETCH: Duration = Duration::from_secs(10);
/// A fetch (discovery document and key set) that takes longer is abandoned: callers waiting
/// for it get an answer in about this long, however the issuer behaves.
const FETCH_BUDGET: Duration = Duration::from_secs(5);
/// Each request of a fetch; no retries (the next unknown key id tries again).
const FETCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Audience,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

impl Verifier {
    pub fn new(
        config: IssuerConfig,
        leeway: Duration,
    ) -> Result<Self, crate::http::HttpClientError> {
        Self::with_proxy(config, leeway, &ProxyEnv::default())
    }

    /// As `new`, fetching keys through `proxy` (the API server's in-cluster names never are).
    pub fn with_proxy(
        config: IssuerConfig,
        leeway: Duration,
        proxy: &ProxyEnv,
    ) -> Result<Self, crate::http::HttpClientError> {
        let http = HttpClient::new(
            &HttpConfig {
                ca_file: config.ca_file.clone(),
                timeout: FETCH_REQUEST_TIMEOUT,
                retries: 0,
                allow_plain_http: false,
            },
            proxy,
        )?;
        Ok(Self {
            config,
            http,
            leeway,
            keys: Default::default(),
            fetching: Default::default(),
            fetches: Default::default(),
        })
    }

    /// Checks `token` at time `now`.
    pub async fn verify(&self, token: &str, now: Timestamp) -> Result<Verified, VerifyError> {
        let [h, p, s] = jwt::split(token)
            .ok_or(VerifyError::Malformed("expected three dot-separated parts"))?;
        let header: Header = jwt::decode_part(h)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(VerifyError::Malformed("unreadable header"))?;
        if header.alg != "RS256" {
            return Err(VerifyError::Algorithm(
                header.alg.chars().take(16).collect(),
            ));
        }
        let signature =
            jwt::decode_part(s).ok_or(VerifyError::Malformed("signature is not base64url"))?;
        let kid = header.kid.unwrap_or_default();
        if !self.keys.read().await.contains_key(&kid) {
            self.refresh().await?;
        }
        {
            let keys = self.keys.read().await;
            let key = keys.get(&kid).ok_or(VerifyError::UnknownKey)?;
            let public = ring::signature::RsaPublicKeyComponents {
                n: &key.n,
                e: &key.e,
            };
            let signed = &token[..h.len() + 1 + p.len()];
            public
                .verify(
                    &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                    signed.as_bytes(),
                    &signature,
                )
                .map_err(|_| VerifyError::Signature)?;
        }
        // Only a correctly signed payload is parsed.
        let claims: Claims = jwt::decode_part(p)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(VerifyError::Malformed("unreadable claims"))?;
        if claims.iss != self.config.url {
            return Err(VerifyError::Issuer);
        }
        let audiences = match claims.aud {
            Audience::One(a) => vec![a],
            Audience::Many(a) => a,
        };
        if !audiences.iter().any(|a| self.config.audiences.contains(a)) {
            return Err(VerifyError::Audience);
        }
        let leeway =
            jiff::SignedDuration::try_from(self.leeway).unwrap_or(jiff::SignedDuration::ZERO);
        let expires_at = Timestamp::from_second(claims.exp)
            .map_err(|_| VerifyError::Malformed("exp out of range"))?;
        if now >= expires_at + leeway {
            return Err(VerifyError::Expired(expires_at));
        }
        if let Some(nbf) = claims.nbf {
            let not_before = Timestamp::from_second(nbf)
                .map_err(|_| VerifyError::Malformed("nbf out of range"))?;
            if now + leeway < not_before {
                return Err(VerifyError::NotYetValid(not_before));
            }
        }
        let identity = Identity::from_subject(&claims.sub).ok_or(VerifyError::Subject)?;
        Ok(Verified {
            subject: claims.sub,
            identity,
            expires_at,
        })
    }

    /// Fetches the keys again, unless that was done moments ago. Callers that arrive while a
    /// fetch runs wait for that one (at most [`FETCH_BUDGET`]) and take its outcome; the time
    /// is stamped when a fetch ends, so a slow one is not followed at once by another.
    async fn refresh(&self) -> Result<(), VerifyError> {
        use std::sync::atomic::Ordering;
        let seen = self.fetches.load(Ordering::Acquire);
        let mut last = self.fetching.lock().await;
        if self.fetches.load(Ordering::Acquire) != seen
            || last.is_some_and(|t| t.elapsed() < MIN_REFETCH)
        {
            return Ok(());
        }
        let fetched = tokio::time::timeout(FETCH_BUDGET, self.fetch()).await;
        *last = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::AcqRel);
        let keys = match fetched {
            Ok(result) => result?,
            Err(_) => {
                return Err(VerifyError::Keys(format!(
                    "the issuer did not answer within {}s",
                    FETCH_BUDGET.as_secs()
                )))
            }
        };
        tracing::info!(keys = keys.len(), "fetched the issuer's signing keys");
        *self.keys.write().await = keys;
        Ok(())
    }

    async fn fetch(&self) -> Result<HashMap<String, RsaKey>, VerifyError> {
        let bearer = match &self.config.token_file {
            Some(path) => Some(Sensitive::new(
                std::fs::read_to_string(path)
                    .map_err(|e| VerifyError::Keys(format!("reading {}: {e}", path.display())))?
                    .trim(),
            )),
            None => None,
        };
        let get = |url: String| {
            let bearer = bearer.clone();
            async move {
                let secrets: Vec<&Sensitive> = bearer.iter().collect();
                self.http
                    .send("oidc", &secrets, |c| {
                        let r = c.get(&url);
                        match &bearer {
                            Some(b) => r.bearer_auth(b.expose()),
                            None => r,
                        }
                    })
                    .await
                    .map_err(|e| VerifyError::Keys(e.to_string()))
            }
        };
        let jwks_uri = match &self.config.jwks_uri {
            Some(u) => u.clone(),
            None => {
                let body = get(format!(
                    "{}/.well-known/openid-configuration",
                    self.config.url.trim_end_matches('/')
                ))
                .await?;
                let named = serde_json::from_slice::<Discovery>(&body)
                    .map_err(|_| {
                        VerifyError::Keys("the discovery document has no jwks_uri".into())
                    })?
                    .jwks_uri;
                same_origin_https(&named, &self.config.url)?;
                named
            }
        };
        let body = get(jwks_uri).await?;
        let jwks: Jwks = serde_json::from_slice(&body)
            .map_err(|_| VerifyError::Keys("the JWKS is not a key set".into()))?;
        Ok(jwks
            .keys
            .into_iter()
            .filter(|k| k.kty == "RSA")
            .filter_map(|k| {
                Some((
                    k.kid.unwrap_or_default(),
                    RsaKey {
                        n: jwt::decode_part(k.n.as_deref()?)?,
                        e: jwt::decode_part(k.e.as_deref()?)?,
                    },
                ))
            })
            .collect())
    }
}

/// The token server's own token goes with the key request: a `jwks_uri` the discovery
/// document names is fetched only from the issuer's own scheme, host and port, over HTTPS. Keys
/// kept elsewhere are for `issuer.jwksUri` to name.
fn same_origin_https(jwks_uri: &str, issuer: &str) -> Result<(), VerifyError> {
    let origin = |u: &str| {
        let u = reqwest::Url::parse(u).ok()?;
        Some((
            u.scheme().to_string(),
            u.host_str()?.to_string(),
            u.port_or_known_default()?,
        ))
    };
    match (origin(jwks_uri), origin(issuer)) {
        (Some(named), Some(own)) if named.0 == "https" && named == own => Ok(()),
        (named, _) => Err(VerifyError::Keys(format!(
            "the discovery document names jwks_uri on {}, not on the issuer's own host over \
             https: not fetched (set issuer.jwksUri to fetch the keys from there)",
            named.map_or("an unreadable URL".to_string(), |(scheme, host, port)| {
                format!("{:?}", format!("{scheme}://{host}:{port}"))
            })
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discovered_jwks_uri_must_be_the_issuers_own_host_over_https() {
        let issuer = "https://oidc.example.com/id/abc";
        for good in [
            "https://oidc.example.com/id/abc/keys",
            "https://OIDC.example.com:443/openid/v1/jwks",
        ] {
            assert_eq!(same_origin_https(good, issuer), Ok(()), "{good}");
        }
        for bad in [
            "https://attacker.example/jwks",
            "https://oidc.example.com.attacker.example/jwks",
            "https://oidc.example.com:8443/jwks",
            "http://oidc.example.com/jwks",
            "https://user@attacker.example/jwks",
            "not a url",
        ] {
            let e = same_origin_https(bad, issuer).unwrap_err();
            assert!(e.to_string().contains("issuer.jwksUri"), "{bad}: {e}");
        }
        // An http issuer (loopback) does not make an http key URL acceptable.
        let e = same_origin_https("http://127.0.0.1:8080/jwks", "http://127.0.0.1:8080");
        assert!(e.is_err());
    }

    fn verifier() -> Verifier {
        let config = IssuerConfig {
            url: "https://issuer.example".into(),
            jwks_uri: Some("https://127.0.0.1:1/jwks".into()),
            ca_file: None,
            token_file: None,
            audiences: vec!["registry.test".into()],
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        Verifier::new(config, Duration::from_secs(10)).unwrap()
    }

    fn b64(s: &str) -> String {
        jwt::encode_part(s.as_bytes())
    }

    #[tokio::test]
    async fn unsigned_and_hmac_tokens_are_refused_before_any_key_lookup() {
        let v = verifier();
        let claims = b64(
            r#"{"iss":"https://issuer.example","sub":"system:serviceaccount:a:b","aud":"registry.test","exp":9999999999}"#,
        );
        for alg in ["none", "HS256", "RS512", "ES256"] {
            let token = format!("{}.{claims}.", b64(&format!(r#"{{"alg":"{alg}"}}"#)));
            assert_eq!(
                v.verify(&token, Timestamp::now()).await,
                Err(VerifyError::Algorithm(alg.into()))
            );
        }
        assert!(matches!(
            v.verify("garbage", Timestamp::now()).await,
            Err(VerifyError::Malformed(_))
        ));
        assert!(matches!(
            v.verify("a.b.c", Timestamp::now()).await,
            Err(VerifyError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn an_unknown_key_that_cannot_be_fetched_is_a_key_error_without_the_token() {
        let v = verifier();
        let token = format!(
            "{}.{}.{}",
            b64(r#"{"alg":"RS256","kid":"k1"}"#),
            b64(r#"{"sub":"secret-claims"}"#),
            b64("sig")
        );
        let e = v.verify(&token, Timestamp::now()).await.unwrap_err();
        assert!(matches!(e, VerifyError::Keys(_)), "{e:?}");
        assert!(!e.to_string().contains(&token), "{e}");
        // Within MIN_REFETCH the keys are not fetched again: the answer is an unknown key.
        assert_eq!(
            v.verify(&token, Timestamp::now()).await,
            Err(VerifyError::UnknownKey)
        );
    }

    /// An issuer that accepts connections and never answers: callers with unknown key ids
    /// share one fetch, get an answer when it is abandoned, and do not start another at once.
    #[tokio::test]
    async fn a_hanging_issuer_costs_one_fetch_and_waiters_get_an_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket); // never answered, never closed
            }
        });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let v = std::sync::Arc::new(
            Verifier::new(
                IssuerConfig {
                    url: "https://issuer.example".into(),
                    jwks_uri: Some(format!("https://127.0.0.1:{port}/jwks")),
                    ca_file: None,
                    token_file: None,
                    audiences: vec!["registry.test".into()],
                },
                Duration::from_secs(10),
            )
            .unwrap(),
        );
        let token = |kid: usize| {
            format!(
                "{}.{}.{}",
                b64(&format!(r#"{{"alg":"RS256","kid":"k{kid}"}}"#)),
                b64("{}"),
                b64("sig")
            )
        };
        let callers = (0..20).map(|i| {
            let (v, t) = (v.clone(), token(i));
            tokio::spawn(async move { v.verify(&t, Timestamp::now()).await })
        });
        // Bounded: waiters that each ran their own fetch would take minutes.
        let answers =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(callers))
                .await
                .expect("every caller got an answer");
        for answer in answers {
            let e = answer.unwrap().unwrap_err();
            assert!(
                matches!(e, VerifyError::Keys(_) | VerifyError::UnknownKey),
                "{e:?}"
            );
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one fetch for all"
        );
        // Right after, another unknown key costs no fetch.
        let e = v.verify(&token(99), Timestamp::now()).await.unwrap_err();
        assert_eq!(e, VerifyError::UnknownKey);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
