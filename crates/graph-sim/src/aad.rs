//! Entra ID's error shape: an HTTP status, the OAuth `error`, an AADSTS number and its
//! description, answered as Entra's JSON body.

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use time::OffsetDateTime;
use time::macros::format_description;
use uuid::Uuid;

/// An Entra error: HTTP status, OAuth `error`, AADSTS number and its description.
#[derive(Debug)]
pub(crate) struct AadError {
    pub status: StatusCode,
    pub error: &'static str,
    pub code: u32,
    pub description: String,
}

pub(crate) fn aad(
    status: StatusCode,
    error: &'static str,
    code: u32,
    description: String,
) -> AadError {
    AadError {
        status,
        error,
        code,
        description,
    }
}

/// Entra's error body; the correlation id echoes the caller's `client-request-id` as Entra's does.
pub(crate) fn error_response(e: AadError, headers: &HeaderMap) -> Response {
    let trace_id = Uuid::new_v4().to_string();
    let correlation_id = headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| Uuid::new_v4().to_string(), str::to_owned);
    let timestamp = OffsetDateTime::now_utc()
        .format(format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second]Z"
        ))
        .unwrap_or_default();
    let body = json!({
        "error": e.error,
        "error_description": format!(
            "AADSTS{}: {} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}",
            e.code, e.description
        ),
        "error_codes": [e.code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={}", e.code),
    });
    (e.status, Json(body)).into_response()
}
