//! The token endpoint: `GET /token?service=..&scope=..` with Basic `<user>:<service-account JWT>`,
//! answered as the Docker Registry v2 token protocol says (`token`, `access_token`,
//! `expires_in`, `issued_at`). Each decision is logged (who, what was asked, what was granted),
//! never the token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use jiff::Timestamp;
use serde_json::json;

use super::issue::{Signer, SignerError};
use super::oidc::{Verifier, VerifyError};
use super::review::{ReviewError, TokenReviewer};
use super::rules::{self, Access};
use super::TokenServerConfig;

/// The time source: the system clock in production; tests move it to show expiry handling
/// (the API server will not mint tokens shorter than ten minutes).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum TokenServerError {
    #[error(transparent)]
    Signer(#[from] SignerError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpClientError),
    #[error(transparent)]
    TokenReview(#[from] super::review::ProbeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct AppState {
    config: TokenServerConfig,
    verifier: Verifier,
    /// `tokenReview.enabled`: the API server confirms each verified token.
    reviewer: Option<TokenReviewer>,
    signer: Signer,
    clock: Clock,
}

/// Tries the TokenReview endpoint a few times (an API server that is restarting answers
/// again within seconds); a setting that cannot work ends the start with what to set.
async fn confirm_reviews_answered(reviewer: &TokenReviewer) -> Result<(), TokenServerError> {
    const ATTEMPTS: u32 = 4;
    let mut attempt = 1;
    loop {
        match reviewer.probe().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= ATTEMPTS => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "TokenReview start-up check failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                attempt += 1;
            }
        }
    }
}

pub struct TokenServer {
    pub local_addr: SocketAddr,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TokenServer {
    /// `proxy`: how the issuer's keys are fetched (from the environment, read in `main`).
    pub async fn start(
        config: TokenServerConfig,
        clock: Clock,
        proxy: &crate::http::ProxyEnv,
    ) -> Result<Self, TokenServerError> {
        let cert = Arc::new(crate::tls::ReloadingCert::load(
            &config.tls.cert_file,
            &config.tls.key_file,
        )?);
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(
            crate::tls::server_config(cert)?,
        ));
        let signer = Signer::from_files(
            &config.signing.cert_file,
            &config.signing.key_file,
            &config.signing.issuer,
        )?;
        let verifier = Verifier::with_proxy(config.issuer.clone(), config.leeway, proxy)?;
        let reviewer = match config.token_review.enabled {
            true => Some(TokenReviewer::new(
                &config.token_review,
                config.issuer.ca_file.clone(),
                config.issuer.token_file.clone(),
            )?),
            false => None,
        };
        if let Some(reviewer) = &reviewer {
            confirm_reviews_answered(reviewer).await?;
        }
        let addr = config.listen;
        let listen_error = move |source| TokenServerError::Listen { addr, source };
        let listener = std::net::TcpListener::bind(config.listen).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let local_addr = listener.local_addr().map_err(listen_error)?;
        let limits = config.connection_limits();
        let read_timeout = config.read_timeout;
        let state = Arc::new(AppState {
            config,
            verifier,
            reviewer,
            signer,
            clock,
        });
        let app = router(state);
        let handle = axum_server::Handle::new();
        let timer = crate::coarse_timer::CoarseTimer::start(Duration::from_millis(100));
        let app = app.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                // No request here needs a body or waits long: a stalled one is cut off.
                match tokio::time::timeout(read_timeout, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => (StatusCode::REQUEST_TIMEOUT, "request not answered in time")
                        .into_response(),
                }
            },
        ));
        let server = crate::connections::serve(
            listener,
            tls,
            "token-server",
            limits,
            read_timeout,
            timer,
            handle.clone(),
            app,
        )
        .map_err(listen_error)?;
        let task = tokio::spawn(server);
        tracing::info!(%local_addr, "serving registry tokens over TLS");
        Ok(Self {
            local_addr,
            handle,
            task,
        })
    }

    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let Self {
            handle, mut task, ..
        } = self;
        tokio::select! {
            result = &mut task => return result.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            _ = signal => {}
        }
        handle.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
        task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    pub async fn shutdown(self) {
        self.handle
            .graceful_shutdown(Some(std::time::Duration::from_secs(1)));
        let _ = self.task.await;
    }
}

fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/token", get(token))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// The refusal when the fault is here, not in the token (the issuer's keys could not be
/// fetched, the API server did not answer): the caller is not told what went wrong inside;
/// the log says.
const NOT_VERIFIED: &str = "service-account token refused: it cannot be verified now";

fn unauthorized(message: &str) -> Response {
    let body = json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]});
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"pull-secret-injector token server\"",
        )],
        axum::Json(body),
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"errors": [{"code": "BAD_REQUEST", "message": message}]})),
    )
        .into_response()
}

/// A fault here (the log has the detail), in the same JSON shape as the other answers.
fn internal_error(message: &str) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(json!({"errors": [{"code": "UNKNOWN", "message": message}]})),
    )
        .into_response()
}

/// The password of a Basic Authorization header.
fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?,
    )
    .ok()?;
    decoded.split_once(':').map(|(_, p)| p.to_string())
}

fn describe(access: &[Access]) -> String {
    if access.is_empty() {
        return "nothing".into();
    }
    access
        .iter()
        .map(|a| format!("{}:{}:{}", a.kind, a.name, a.actions.join(",")))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn token(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params: Vec<(String, String)> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let service = params
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.as_str());
    if service != Some(state.config.service.as_str()) {
        return bad_request("unknown service");
    }
    // A control character has no place in a scope, and in a log line it could forge another.
    if params
        .iter()
        .any(|(k, v)| k == "scope" && v.chars().any(char::is_control))
    {
        tracing::info!(
            granted = "nothing",
            reason = "control characters in scope",
            "token refused"
        );
        return bad_request("scope contains control characters");
    }
    let requested: Vec<Access> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| rules::parse_scope(v))
        .collect();
    let Some(password) = basic_password(&headers) else {
        tracing::info!(requested = ?describe(&requested), granted = "nothing", reason = "no credentials", "token refused");
        return unauthorized("credentials required: Basic <any user>:<service-account token>");
    };
    let now = (state.clock)();
    let verified = match state.verifier.verify(&password, now).await {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(requested = ?describe(&requested), granted = "nothing", reason = ?e.to_string(), "token refused");
            return match e {
                VerifyError::Keys(_) => unauthorized(NOT_VERIFIED),
                e => unauthorized(&format!("service-account token refused: {e}")),
            };
        }
    };
    if let Some(reviewer) = &state.reviewer {
        let audiences = &state.config.issuer.audiences;
        if let Err(e) = reviewer
            .confirm(&password, &verified.subject, audiences)
            .await
        {
            tracing::info!(subject = ?verified.subject, requested = ?describe(&requested), granted = "nothing", reason = ?e.to_string(), "token refused");
            return match e {
                ReviewError::Unavailable(_) => unauthorized(NOT_VERIFIED),
                e => unauthorized(&format!("service-account token refused: {e}")),
            };
        }
    }
    let granted = rules::grant(&state.config.rules, &verified.identity, &requested);
    let lifetime = state.config.token_lifetime;
    let token = match state.signer.sign(
        &verified.subject,
        &state.config.service,
        &granted,
        now,
        lifetime,
    ) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(subject = ?verified.subject, requested = ?describe(&requested), error = ?e, "token signing failed");
            return internal_error("the token could not be signed");
        }
    };
    tracing::info!(
        subject = ?verified.subject,
        namespace = ?verified.identity.namespace,
        service_account = ?verified.identity.service_account,
        // Request values are logged escaped (Debug): they cannot start a line of their own.
        requested = ?describe(&requested),
        granted = ?describe(&granted),
        "token issued"
    );
    let body = json!({"token": token, "access_token": token, "expires_in": lifetime.as_secs(), "issued_at": now.to_string()});
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// The token endpoint in-process (`oneshot`, no sockets): what a caller with no credentials can
/// make it write to its log.
#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    const CONFIG: &str = r#"
tls: {certFile: t.crt, keyFile: t.key}
issuer: {url: "https://issuer.example", jwksUri: "https://127.0.0.1:1/jwks", audiences: [registry.test]}
service: registry.test
signing: {certFile: s.crt, keyFile: s.key}
rules:
  - {namespace: team-a, repositories: ["team-a/*"]}
"#;

    fn app(dir: &std::path::Path) -> axum::Router {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let config = TokenServerConfig::from_yaml(CONFIG).unwrap();
        router(Arc::new(AppState {
            verifier: Verifier::new(config.issuer.clone(), config.leeway).unwrap(),
            reviewer: None,
            signer: Signer::from_files(&c, &k, "psi").unwrap(),
            config,
            clock: Arc::new(Timestamp::now),
        }))
    }

    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn call(app: axum::Router, query: &str) -> (StatusCode, serde_json::Value) {
        let request = axum::http::Request::get(format!("/token?{query}"))
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    /// A signing failure is answered like every other error here: the registry error shape,
    /// not plain text (a client that parses the body gets a message, not a parse error).
    #[tokio::test]
    async fn an_internal_fault_answers_in_the_json_error_shape() {
        let response = internal_error("the token could not be signed");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["errors"][0]["message"], "the token could not be signed",
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_newline_in_a_scope_is_refused_and_cannot_forge_a_log_line() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let forged = "repository:team-a/app:pull\n2026-12-01T00:00:00Z  INFO token issued \
                      subject=system:serviceaccount:kube-system:admin";
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("service", "registry.test")
            .append_pair("scope", forged)
            .finish();
        let (status, body) = call(app(dir.path()), &query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body["errors"][0]["message"],
            "scope contains control characters"
        );
        // Without control characters, a scope that looks like a log line is logged quoted, on
        // the refusal's own line.
        let quoted = "repository:team-a/app:pull\" token issued subject=x";
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("service", "registry.test")
            .append_pair("scope", quoted)
            .finish();
        let (status, _) = call(app(dir.path()), &query).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        for line in text.lines() {
            assert!(line.contains("token refused"), "{line}");
            assert!(!line.contains(" INFO token issued"), "{line}");
        }
        assert!(
            text.contains("reason=\"control characters in scope\""),
            "{text}"
        );
    }

    /// Issue 23, point 13: a token that cannot be checked because the issuer's keys cannot be
    /// fetched is refused with a plain 401; why is in the log, not in the answer.
    #[tokio::test]
    async fn a_key_fetch_failure_is_a_plain_401_and_its_detail_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let part = |s: &str| crate::core::jwt::encode_part(s.as_bytes());
        let token = format!(
            "{}.{}.{}",
            part(r#"{"alg":"RS256","kid":"k1"}"#),
            part("{}"),
            part("sig")
        );
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("u:{token}"));
        let request = axum::http::Request::get("/token?service=registry.test")
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .body(Body::empty())
            .unwrap();
        let response = app(dir.path()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errors"][0]["message"], NOT_VERIFIED);
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("token refused") && text.contains("cannot fetch the issuer's keys"),
            "{text}"
        );
    }

    /// Issue 18, point 7: the token server has the webhook's deadlines. A real TLS listener on
    /// 127.0.0.1: a client that completes TLS and sends nothing, and one that trickles its
    /// request headers, are both disconnected; a real request is still answered.
    #[tokio::test]
    async fn idle_and_slow_clients_are_disconnected() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        for name in ["t", "s"] {
            std::fs::write(dir.path().join(format!("{name}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        let yaml = CONFIG
            .replace("t.crt", &dir.path().join("t.crt").display().to_string())
            .replace("t.key", &dir.path().join("t.key").display().to_string())
            .replace("s.crt", &dir.path().join("s.crt").display().to_string())
            .replace("s.key", &dir.path().join("s.key").display().to_string())
            + "listen: 127.0.0.1:0\nreadTimeout: 500ms\nidleTimeout: 500ms\nmaxConnections: 8\n"
            + "tokenReview: {enabled: false}\n";
        let config = TokenServerConfig::from_yaml(&yaml).unwrap();
        let server = TokenServer::start(config, Arc::new(Timestamp::now), &Default::default())
            .await
            .unwrap();
        let connect = || async {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.der().clone()).unwrap();
            let tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(server.local_addr)
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(name, tcp)
                .await
                .unwrap()
        };
        let closed = |mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>| async move {
            let mut buf = [0u8; 1024];
            let read = async {
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(20), read)
                .await
                .is_ok()
        };
        assert!(
            closed(connect().await).await,
            "an idle TLS client is disconnected"
        );
        let mut slow = connect().await;
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        slow.flush().await.unwrap();
        assert!(
            closed(slow).await,
            "a client that trickles its headers is disconnected"
        );
        let mut ok = connect().await;
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = ok.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
        server.shutdown().await;
    }
}
