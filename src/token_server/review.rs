//! Confirms a verified service-account token with the API server's TokenReview: the offline
//! check (signature, `iss`, `aud`, `exp`) cannot know that the token's ServiceAccount (or the
//! Pod it was bound to) has since been deleted; the API server does. Answers are cached for
//! `tokenReview.cacheFor`, so that is how long a revoked token can keep working here; a token
//! the API server cannot confirm (refused, or no answer) gets nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::core::credential::Sensitive;
use crate::http::{CallError, HttpClient, HttpClientError, HttpConfig, ProxyEnv};

/// `tokenReview:` in the token server's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenReviewConfig {
    /// Off: tokens are checked offline only, and stay good until they expire even when their
    /// ServiceAccount is deleted.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// The API server. Its CA and the bearer token for the review are `issuer.caFile` and
    /// `issuer.tokenFile` (the token server's ServiceAccount needs `create tokenreviews`).
    #[serde(default = "default_url")]
    pub url: String,
    /// How long an answer is reused: the longest a revoked token keeps working.
    #[serde(
        default = "default_cache_for",
        deserialize_with = "crate::core::duration::field"
    )]
    pub cache_for: Duration,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            url: default_url(),
            cache_for: default_cache_for(),
        }
    }
}

fn default_enabled() -> bool {
    true
}

fn default_url() -> String {
    "https://kubernetes.default.svc".into()
}

fn default_cache_for() -> Duration {
    Duration::from_secs(10)
}

/// Cached answers at most; beyond, expired ones are dropped, then all (a flood of distinct,
/// validly signed tokens is not something an outsider can make).
const MAX_CACHED: usize = 10_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the API server no longer accepts this token (its ServiceAccount or Pod was deleted, or it was revoked)")]
    Revoked,
    #[error("the API server confirms the token for another user")]
    OtherUser,
    #[error("cannot confirm the token with the API server: {0}")]
    Unavailable(String),
}

/// What to set when the API server cannot be reached at `tokenReview.url`.
pub(crate) const SET_URL: &str = "set tokenReview.url to the API server's address (the default \
     https://kubernetes.default.svc resolves only inside a cluster) and issuer.caFile to its \
     CA, or tokenReview.enabled: false to check tokens offline only";

/// Why a TokenReview could not be asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PostError {
    #[error("cannot read issuer.tokenFile {0}")]
    TokenFile(String),
    #[error(transparent)]
    Call(CallError),
    #[error("the answer is not a TokenReview")]
    NotAReview,
}

impl PostError {
    /// What to set, by what went wrong.
    fn advice(&self) -> &'static str {
        match self {
            PostError::TokenFile(_) => {
                "set issuer.tokenFile to a service-account token the API server accepts"
            }
            PostError::Call(CallError::Refused {
                status: 401 | 403, ..
            }) => {
                "the token in issuer.tokenFile must be accepted by the API server and allowed \
                 to create tokenreviews (bind its ServiceAccount to system:auth-delegator)"
            }
            PostError::Call(_) | PostError::NotAReview => SET_URL,
        }
    }
}

/// The start-up check failed: the token server would refuse every client.
#[derive(Debug, thiserror::Error)]
#[error("tokenReview: {url} cannot confirm tokens: {reason}; {advice}")]
pub struct ProbeError {
    url: String,
    reason: PostError,
    advice: &'static str,
}

pub(crate) struct TokenReviewer {
    url: String,
    http: HttpClient,
    token_file: Option<PathBuf>,
    cache_for: Duration,
    cache: Mutex<HashMap<[u8; 32], Answer>>,
}

/// By the token's SHA-256: when it was asked, and the username it was confirmed for or why not.
type Answer = (Instant, Result<String, ReviewError>);

#[derive(Deserialize)]
struct Review {
    #[serde(default)]
    status: Status,
}

#[derive(Default, Deserialize)]
struct Status {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: User,
}

#[derive(Default, Deserialize)]
struct User {
    #[serde(default)]
    username: String,
}

impl TokenReviewer {
    pub(crate) fn new(
        config: &TokenReviewConfig,
        ca_file: Option<PathBuf>,
        token_file: Option<PathBuf>,
    ) -> Result<Self, HttpClientError> {
        // The API server: never through a proxy. Its URL is checked to be https by the config
        // (the unit tests below speak plain http on loopback).
        let http = HttpClient::new(
            &HttpConfig {
                ca_file,
                timeout: REQUEST_TIMEOUT,
                retries: 0,
                allow_plain_http: true,
            },
            &ProxyEnv::default(),
        )?;
        Ok(Self {
            url: format!(
                "{}/apis/authentication.k8s.io/v1/tokenreviews",
                config.url.trim_end_matches('/')
            ),
            http,
            token_file,
            cache_for: config.cache_for,
            cache: Mutex::default(),
        })
    }

    /// Whether the API server accepts `token` (already verified offline) as `subject`, for one
    /// of `audiences`.
    pub(crate) async fn confirm(
        &self,
        token: &str,
        subject: &str,
        audiences: &[String],
    ) -> Result<(), ReviewError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(&key)
                .filter(|(at, _)| at.elapsed() < self.cache_for)
                .map(|(_, answer)| answer.clone())
        };
        let answer = match cached {
            Some(answer) => answer,
            None => {
                let answer = self.ask(token, audiences).await;
                // No answer is not cached: the next request asks again.
                if !matches!(answer, Err(ReviewError::Unavailable(_))) {
                    self.remember(key, answer.clone());
                }
                answer
            }
        };
        match answer {
            Ok(user) if user == subject => Ok(()),
            Ok(_) => Err(ReviewError::OtherUser),
            Err(e) => Err(e),
        }
    }

    fn remember(&self, key: [u8; 32], answer: Result<String, ReviewError>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            let keep = self.cache_for;
            cache.retain(|_, (at, _)| at.elapsed() < keep);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), answer));
    }

    async fn ask(&self, token: &str, audiences: &[String]) -> Result<String, ReviewError> {
        let review = self
            .post(token, audiences)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        if review.status.authenticated {
            Ok(review.status.user.username)
        } else {
            Err(ReviewError::Revoked)
        }
    }

    /// Asks once whether the API server answers reviews at `url` with the configured CA and
    /// bearer token, so a setting that cannot work stops the start, not the first client. The
    /// token reviewed is a made-up one: any answer (it is not authenticated) will do.
    pub(crate) async fn probe(&self) -> Result<(), ProbeError> {
        let probe_error = |reason: PostError| ProbeError {
            url: self.url.clone(),
            advice: reason.advice(),
            reason,
        };
        self.post("pull-secret-injector-start-up-probe", &[])
            .await
            .map(|_| ())
            .map_err(probe_error)
    }

    async fn post(&self, token: &str, audiences: &[String]) -> Result<Review, PostError> {
        let bearer = match &self.token_file {
            Some(path) => Some(Sensitive::new(
                std::fs::read_to_string(path)
                    .map_err(|e| PostError::TokenFile(format!("{}: {e}", path.display())))?
                    .trim(),
            )),
            None => None,
        };
        let reviewed = Sensitive::new(token);
        let mut secrets = vec![&reviewed];
        secrets.extend(bearer.iter());
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": reviewed.expose(), "audiences": audiences},
        });
        let answer = self
            .http
            .send("tokenreview", &secrets, |c| {
                let r = c.post(&self.url).json(&body);
                match &bearer {
                    Some(b) => r.bearer_auth(b.expose()),
                    None => r,
                }
            })
            .await
            .map_err(PostError::Call)?;
        serde_json::from_slice(&answer).map_err(|_| PostError::NotAReview)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A stand-in API server on loopback: `good` is system:serviceaccount:a:b, anything else is
    /// not authenticated (as for a deleted ServiceAccount). Counts the reviews it answers.
    async fn api_server() -> (String, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let app = axum::Router::new().route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            axum::routing::post(move |axum::Json(review): axum::Json<serde_json::Value>| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    let good = review["spec"]["token"] == "good"
                        && review["spec"]["audiences"] == serde_json::json!(["registry.test"]);
                    axum::Json(serde_json::json!({"status": {
                        "authenticated": good,
                        "user": {"username": if good { "system:serviceaccount:a:b" } else { "" }}
                    }}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    #[tokio::test]
    async fn tokens_are_confirmed_once_per_cache_period_and_revoked_ones_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (url, seen) = api_server().await;
        let config = TokenReviewConfig {
            enabled: true,
            url,
            cache_for: Duration::from_secs(60),
        };
        let reviewer = TokenReviewer::new(&config, None, None).unwrap();
        let aud = ["registry.test".to_string()];
        let sub = "system:serviceaccount:a:b";
        assert_eq!(reviewer.confirm("good", sub, &aud).await, Ok(()));
        assert_eq!(reviewer.confirm("good", sub, &aud).await, Ok(()));
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "the second answer is cached"
        );
        assert_eq!(
            reviewer
                .confirm("good", "system:serviceaccount:a:other", &aud)
                .await,
            Err(ReviewError::OtherUser)
        );
        assert_eq!(
            reviewer.confirm("deleted-sa-token", sub, &aud).await,
            Err(ReviewError::Revoked)
        );
        // With no cache, each request asks: a deletion is seen at once.
        let fresh = TokenReviewer::new(
            &TokenReviewConfig {
                cache_for: Duration::ZERO,
                ..config
            },
            None,
            None,
        )
        .unwrap();
        let before = seen.load(Ordering::SeqCst);
        fresh.confirm("good", sub, &aud).await.unwrap();
        fresh.confirm("good", sub, &aud).await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), before + 2);
    }

    #[tokio::test]
    async fn no_answer_is_a_refusal_that_names_no_token() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = TokenReviewConfig {
            enabled: true,
            url: "http://127.0.0.1:1".into(),
            cache_for: Duration::from_secs(10),
        };
        let reviewer = TokenReviewer::new(&config, None, None).unwrap();
        let e = reviewer
            .confirm("a-secret-token-value", "system:serviceaccount:a:b", &[])
            .await
            .unwrap_err();
        assert!(matches!(e, ReviewError::Unavailable(_)), "{e:?}");
        assert!(!e.to_string().contains("a-secret-token-value"), "{e}");
    }

    /// Issue 22: a TokenReview endpoint that cannot answer stops the start with what to set:
    /// the in-cluster name outside a cluster, a bearer token the API server refuses, a token
    /// file that is missing; an endpoint that answers passes.
    #[tokio::test]
    async fn the_start_up_probe_says_what_to_set() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (answering, _) = api_server().await;
        let forbidden = {
            let app = axum::Router::new().route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                axum::routing::post(|| async { (axum::http::StatusCode::FORBIDDEN, "forbidden") }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            url
        };
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "a-bearer-token-value\n").unwrap();
        let missing = dir.path().join("missing");
        let probe = |url: &str, token: &std::path::Path| {
            let config = TokenReviewConfig {
                url: url.into(),
                ..TokenReviewConfig::default()
            };
            let reviewer = TokenReviewer::new(&config, None, Some(token.into())).unwrap();
            async move { reviewer.probe().await.map_err(|e| e.to_string()) }
        };
        assert_eq!(probe(&answering, &token_file).await, Ok(()));
        let cases = [
            // `.invalid` never resolves (RFC 6761), as the in-cluster name does not outside.
            (
                "https://kubernetes.default.svc.invalid",
                &token_file,
                "set tokenReview.url",
            ),
            (forbidden.as_str(), &token_file, "system:auth-delegator"),
            (answering.as_str(), &missing, "set issuer.tokenFile"),
        ];
        for (url, token, advice) in cases {
            let error = probe(url, token).await.unwrap_err();
            assert!(error.starts_with("tokenReview: "), "{error}");
            assert!(error.contains(advice), "{url}: {error}");
            assert!(!error.contains("a-bearer-token-value"), "{error}");
        }
    }
}
