//! The two routers: the public one (`POST /v1/requests` and nothing else) and the operators'
//! one (`/metrics`, `/healthz`, `/readyz`) on its own port.

use std::{
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;
use serde_json::json;
use tracing::Instrument as _;

use super::{Intake, accept::Accepted};
use crate::ops::batch::BadRow;

/// Seconds a client is asked to wait after a 503.
pub const RETRY_AFTER_SECS: u64 = 5;
const REQUEST_ID: &str = "x-request-id";

/// One entry of an error answer (every non-2xx of `/v1/*` has this shape).
#[derive(Debug, Serialize)]
pub struct ErrorItem {
    /// The item's line (JSON Lines), position (array, from 1) or 1 for a single object;
    /// `null` when the error is about the post as a whole.
    pub line: Option<u64>,
    pub field: Option<&'static str>,
    pub message: String,
}

impl ErrorItem {
    pub fn whole(message: impl Into<String>) -> Self {
        Self {
            line: None,
            field: None,
            message: message.into(),
        }
    }
}

impl From<&BadRow> for ErrorItem {
    fn from(bad: &BadRow) -> Self {
        Self {
            line: Some(bad.line),
            field: bad.field(),
            message: bad.reason.clone(),
        }
    }
}

/// A refused post: its status, its errors, and a `Retry-After` for 429 and 503.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub errors: Vec<ErrorItem>,
    pub retry_after: Option<u64>,
}

impl Refused {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            errors: vec![ErrorItem::whole(message)],
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({"errors": self.errors}))).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"unassign-intake\""),
            );
        }
        response
    }
}

impl IntoResponse for Accepted {
    fn into_response(self) -> Response {
        let replayed = self.replayed;
        let mut response = (
            StatusCode::ACCEPTED,
            Json(json!({"accepted": self.request_ids.len(), "request_ids": self.request_ids})),
        )
            .into_response();
        if replayed {
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

pub fn public(intake: Arc<Intake>) -> Router {
    Router::new()
        .route("/v1/requests", post(requests))
        .fallback(|| async { Refused::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(intake.clone(), observe))
        .with_state(intake)
}

pub fn operations(intake: Arc<Intake>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { Json(json!({"alive": true})) }))
        .route("/readyz", get(readyz))
        .with_state(intake)
}

async fn requests(State(intake): State<Arc<Intake>>, headers: HeaderMap, body: Body) -> Response {
    match intake.accept(&headers, body, unix_now()).await {
        Ok(accepted) => accepted.into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// Every public answer: a request id (the client's `X-Request-Id` if it is a sane one) on the
/// response and in the log line, the status counted, the latency observed.
async fn observe(State(intake): State<Arc<Intake>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    intake.metrics.started();
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let span = tracing::info_span!("post", request_id = %id);
    let mut response = next.run(request).instrument(span.clone()).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    intake.metrics.answered(status, seconds);
    span.in_scope(|| tracing::info!(status, ms = seconds * 1000.0, "answered"));
    response.headers_mut().insert(
        REQUEST_ID,
        HeaderValue::from_str(&id).expect("checked or generated above: visible ASCII"),
    );
    response
}

async fn metrics_text(State(intake): State<Arc<Intake>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        intake.metrics.render(),
    )
}

async fn readyz(State(intake): State<Arc<Intake>>) -> impl IntoResponse {
    if intake.broker.connected() {
        (StatusCode::OK, Json(json!({"ready": true})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "broker_disconnected"})),
        )
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
