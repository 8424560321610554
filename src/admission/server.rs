//! HTTPS: `POST /mutate` (AdmissionReview), `GET /healthz`, `GET /readyz`. Errors are JSON
//! bodies with a status code, never axum's plain-text rejections.

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

use crate::admission::webhook::Webhook;

pub struct AppState {
    pub webhook: Webhook,
    /// True once the watches have synced; the certificate is loaded before serving starts.
    pub ready: Arc<AtomicBool>,
    pub max_body_bytes: usize,
    pub read_timeout: std::time::Duration,
    /// Times the body read: armed for every request, so coarse and cheap (see `coarse_timer`).
    pub timer: crate::admission::coarse_timer::CoarseTimer,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// An HTTP error with a JSON body: `{"error": "...", "code": 400}`.
#[derive(Debug)]
pub struct ApiError {
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

pub fn router(state: Arc<AppState>) -> Router {
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
    let collect = Limited::new(request.into_body(), state.max_body_bytes).collect();
    let deadline = hyper::rt::Timer::sleep(&state.timer, state.read_timeout);
    let body = tokio::select! {
        biased;
        body = collect => body,
        () = deadline => {
            return Err(ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                message: format!("request body not received within {}ms", state.read_timeout.as_millis()),
            })
        }
    };
    let body = body.map_err(|e| {
        if e.is::<LengthLimitError>() {
            too_large()
        } else {
            ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!("cannot read request body: {e}"),
            }
        }
    })?;
    let answer = state
        .webhook
        .review(&body.to_bytes())
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
            crate::sources::http::HttpClient::new(&Default::default()).unwrap(),
            store.clone(),
            settings.clone(),
            Events::new(client.clone(), None),
            metrics.clone(),
        ));
        let webhook = Webhook::new(
            client,
            settings,
            store,
            provisioner,
            Default::default(),
            metrics.clone(),
        );
        router(Arc::new(AppState {
            webhook,
            ready: Arc::new(AtomicBool::new(ready)),
            max_body_bytes,
            read_timeout,
            timer: crate::admission::coarse_timer::CoarseTimer::start(Duration::from_millis(10)),
            metrics,
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
}
