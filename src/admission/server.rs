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
