//! HTTPS: `POST /mutate` (AdmissionReview), `GET /healthz`, `GET /readyz`, `GET /metrics`
//! (OpenMetrics text). Errors are JSON
//! bodies with a status code, never axum's plain-text rejections.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;

use crate::admission::bytes::{ByteBudget, Held};
use crate::admission::webhook::Webhook;
use crate::connections::Peer;

pub(crate) struct AppState {
    pub webhook: Webhook,
    /// True once the watches have synced; the certificate is loaded before serving starts.
    pub ready: Arc<AtomicBool>,
    pub max_body_bytes: usize,
    pub read_timeout: std::time::Duration,
    /// Times the body read: armed for every request, so coarse and cheap (see `coarse_timer`).
    pub timer: crate::coarse_timer::CoarseTimer,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Bytes of request bodies held (`admission.maxBytesInFlight`, and per peer): what many
    /// connections or HTTP/2 streams can make the webhook hold at once is bounded.
    pub body_bytes: Arc<ByteBudget>,
}

/// An HTTP error with a JSON body: `{"error": "...", "code": 400}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.message, "code": self.status.as_u16()})),
        )
            .into_response()
    }
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        "ok".into_response()
    } else {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "watches have not synced yet".into(),
        }
        .into_response()
    }
}

async fn mutate(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("request body exceeds {} bytes", state.max_body_bytes),
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes) {
        return Err(too_large());
    }
    // Requests that came through no connection (in-process tests) share one peer.
    let peer = request
        .extensions()
        .get::<Peer>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0);
    let deadline = hyper::rt::Timer::sleep(&state.timer, state.read_timeout);
    let body = tokio::select! {
        biased;
        body = read_body(&state, request.into_body(), peer) => body?,
        () = deadline => {
            return Err(ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                message: format!("request body not received within {}ms", state.read_timeout.as_millis()),
            })
        }
    };
    let answer = state
        .webhook
        .review(&body.bytes)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
        })?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(answer),
    )
        .into_response())
}

/// A request body, and its share of the bytes in flight (given back when dropped).
struct HeldBody {
    bytes: Vec<u8>,
    _held: Held,
}

/// Reads a body of at most `max_body_bytes`, taking its bytes from the in-flight budget as
/// they arrive: a declared length reserves nothing (it costs a sender nothing to declare).
/// When the budget or the peer's share is spent, a request waits up to `readTimeout` for room,
/// then gets 503.
async fn read_body(state: &AppState, body: Body, peer: IpAddr) -> Result<HeldBody, ApiError> {
    let max = state.max_body_bytes;
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("request body exceeds {max} bytes"),
    };
    let mut held = state.body_bytes.holding(peer);
    // Grown as bytes come, for the same reason.
    let mut bytes = Vec::new();
    let mut body = Limited::new(body, max);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<LengthLimitError>() {
                too_large()
            } else {
                ApiError {
                    status: StatusCode::BAD_REQUEST,
                    message: format!("cannot read request body: {e}"),
                }
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if !held.take(data.len(), state.read_timeout).await {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "too many request bytes in flight; retry".into(),
            });
        }
        bytes.extend_from_slice(&data);
    }
    Ok(HeldBody { bytes, _held: held })
}

/// The HTTP layer in-process (`oneshot` on the router, no sockets): status codes and content
/// types for what the API server, or a misbehaving client, may send.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::cluster::Events;
    use crate::config::Config;
    use crate::secret::provisioner::Provisioner;
    use crate::settings::{Environment, Settings};

    /// The router over a service whose Kubernetes client points nowhere: nothing here needs it.
    fn app(max_body_bytes: usize, read_timeout: Duration, ready: bool) -> Router {
        app_with_budget(max_body_bytes, read_timeout, ready, 1 << 20)
    }

    fn app_with_budget(
        max_body_bytes: usize,
        read_timeout: Duration,
        ready: bool,
        bytes_in_flight: usize,
    ) -> Router {
        let yaml = "tls: {certFile: a, keyFile: b}\nregistries: [{host: r.example, kubernetes: {audience: a}}]\n";
        let settings = Arc::new(
            Settings::new(Config::from_yaml(yaml).unwrap(), &Environment::default()).unwrap(),
        );
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let store = kube::runtime::reflector::store().0;
        let provisioner = Arc::new(Provisioner::new(
            client.clone(),
            crate::http::HttpClient::new(&Default::default(), &Default::default()).unwrap(),
            store.clone(),
            settings.clone(),
            Events::new(client.clone(), None),
            metrics.clone(),
        ));
        let webhook = Webhook::new(
            client,
            settings,
            store,
            Default::default(),
            provisioner,
            Default::default(),
            metrics.clone(),
        );
        router(Arc::new(AppState {
            webhook,
            ready: Arc::new(AtomicBool::new(ready)),
            max_body_bytes,
            read_timeout,
            timer: crate::coarse_timer::CoarseTimer::start(Duration::from_millis(10)),
            metrics,
            body_bytes: ByteBudget::new(bytes_in_flight, max_body_bytes, bytes_in_flight),
        }))
    }

    async fn call(app: Router, request: Request<Body>) -> (StatusCode, String, serde_json::Value) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, content_type, json)
    }

    fn mutate(body: impl Into<Body>) -> Request<Body> {
        Request::post("/mutate")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap()
    }

    const CONFIGMAP: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u1","kind":{"group":"","version":"v1","kind":"ConfigMap"},"namespace":"a","operation":"CREATE"}}"#;

    #[tokio::test]
    async fn a_review_is_answered_in_json() {
        let (status, content_type, body) =
            call(app(4096, Duration::from_secs(5), true), mutate(CONFIGMAP)).await;
        assert_eq!(
            (status, content_type.as_str()),
            (StatusCode::OK, "application/json")
        );
        assert_eq!(
            body["response"],
            serde_json::json!({"uid": "u1", "allowed": true})
        );
    }

    #[tokio::test]
    async fn a_malformed_review_is_400_with_a_json_error() {
        let (status, content_type, body) =
            call(app(4096, Duration::from_secs(5), true), mutate("{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        assert_eq!(body["code"], 400);
        assert!(body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid AdmissionReview"));
    }

    #[tokio::test]
    async fn a_body_too_large_is_413_whether_declared_or_streamed() {
        let big = "x".repeat(2048);
        let mut declared = mutate(big.clone());
        declared
            .headers_mut()
            .insert(header::CONTENT_LENGTH, big.len().into());
        let (status, _, body) = call(app(1024, Duration::from_secs(5), true), declared).await;
        assert_eq!(
            (status, body["code"].as_u64()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some(413))
        );
        // No Content-Length: the limit is found while reading.
        let chunks = futures::stream::iter([Ok::<_, std::io::Error>(big)]);
        let (status, _, _) = call(
            app(1024, Duration::from_secs(5), true),
            mutate(Body::from_stream(chunks)),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_is_408() {
        let never = futures::stream::pending::<Result<String, std::io::Error>>();
        let (status, content_type, body) = call(
            app(4096, Duration::from_millis(50), true),
            mutate(Body::from_stream(never)),
        )
        .await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        assert_eq!(body["code"], 408);
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        let (status, _, _) = call(app(4096, Duration::from_secs(5), false), get("/healthz")).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, body) =
            call(app(4096, Duration::from_secs(5), false), get("/readyz")).await;
        assert_eq!(
            (status, body["code"].as_u64()),
            (StatusCode::SERVICE_UNAVAILABLE, Some(503))
        );
        let (status, _, _) = call(app(4096, Duration::from_secs(5), true), get("/readyz")).await;
        assert_eq!(status, StatusCode::OK);
        let (status, content_type, _) =
            call(app(4096, Duration::from_secs(5), true), get("/metrics")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
    }

    /// Issue 18, point 3: the bytes of bodies in flight are bounded, and on one HTTP/2
    /// connection the requests waiting for room do not starve those being read: 40 bodies of
    /// 1 MiB as streams of one connection, against a budget of 3 MiB, are all answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_large_streams_on_one_http2_connection_share_the_byte_budget() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c"), dir.path().join("k"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let reloading = Arc::new(crate::tls::ReloadingCert::load(&c, &k).unwrap());
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(
            crate::tls::server_config(reloading).unwrap(),
        ));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let mib = 1024 * 1024;
        let router = app_with_budget(2 * mib, Duration::from_secs(10), true, 3 * mib);
        let limits = crate::connections::Limits {
            max_connections: 8,
            max_connections_per_peer: 8,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        };
        let handle = axum_server::Handle::new();
        let serving = crate::connections::serve(
            listener,
            tls,
            "test",
            limits,
            Duration::from_secs(10),
            crate::coarse_timer::CoarseTimer::start(Duration::from_millis(10)),
            handle.clone(),
            router,
        )
        .unwrap();
        tokio::spawn(serving);
        let padded = CONFIGMAP.replacen(
            r#""operation""#,
            &format!(r#""pad":"{}","operation""#, "x".repeat(mib - 300)),
            1,
        );
        let body = axum::body::Bytes::from(padded);
        let url = format!("https://localhost:{}/mutate", addr.port());
        let client = reqwest::Client::builder()
            .resolve("localhost", addr)
            .add_root_certificate(reqwest::Certificate::from_der(cert.der()).unwrap())
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let calls = (0..40).map(|_| {
            let request = client
                .post(&url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            async move {
                let r = request.send().await.unwrap();
                (r.version(), r.status())
            }
        });
        let answers =
            tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(calls))
                .await
                .expect("answered");
        for (version, status) in answers {
            assert_eq!(
                (version, status),
                (axum::http::Version::HTTP_2, StatusCode::OK)
            );
        }
        handle.shutdown();
    }
}
