//! The Microsoft identity platform token endpoint (client credentials with a client secret or a
//! client assertion), answering errors in Entra's AADSTS shape.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use time::OffsetDateTime;
use time::macros::format_description;
use uuid::Uuid;

use super::Behaviour;
use super::assertion::{self, Kind};
use super::state::{Config, Shared, is_guid};

/// The urlencoded form fields of a token request.
pub(super) type Form = HashMap<String, String>;

/// An Entra error: HTTP status, OAuth `error`, AADSTS number and its description.
#[derive(Debug)]
pub(super) struct AadError {
    pub status: StatusCode,
    pub error: &'static str,
    pub code: u32,
    pub description: String,
}

pub(super) fn aad(
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

fn missing(param: &str) -> AadError {
    aad(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        format!("The request body must contain the following parameter: '{param}'."),
    )
}

/// Checks a token request in the order Entra does: service, tenant, grant, client, scope, then
/// the secret or assertion sent to `token_url`; tells which kind of credential passed.
pub(super) fn validate(
    cfg: &Config,
    b: &Behaviour,
    tenant: &str,
    token_url: &str,
    form: &Form,
) -> Result<Kind, AadError> {
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    if b.token_outage {
        return Err(aad(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.".into(),
        ));
    }
    let own_app = b.tenants.get(&tenant.to_ascii_lowercase());
    let known_tenant = own_app.is_some()
        || cfg
            .tenant_id
            .as_deref()
            .map_or(is_guid(tenant), |t| t.eq_ignore_ascii_case(tenant));
    if !known_tenant {
        return Err(aad(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and \
                 are signing into the correct cloud."
            ),
        ));
    }
    match field("grant_type").ok_or_else(|| missing("grant_type"))? {
        "client_credentials" => {}
        other => {
            return Err(aad(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{other}'."),
            ));
        }
    }
    let client_id = field("client_id").ok_or_else(|| missing("client_id"))?;
    let (app_id, app_secret) = own_app.map_or((&cfg.client_id, &b.client_secret), |app| {
        (&app.client_id, &app.client_secret)
    });
    if !client_id.eq_ignore_ascii_case(app_id) {
        return Err(aad(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. \
                 This can happen if the application has not been installed by the administrator of \
                 the tenant or consented to by any user in the tenant. You may have sent your \
                 authentication request to the wrong tenant."
            ),
        ));
    }
    let scope = field("scope").ok_or_else(|| missing("scope"))?;
    if !scope.ends_with("/.default") {
        return Err(aad(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!(
                "The provided value for scope {scope} is not valid. Client credential flows must \
                 have a scope value with /.default suffixed to the resource identifier \
                 (application ID URI)."
            ),
        ));
    }
    let invalid_client = |code, description: String| {
        Err(aad(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            code,
            description,
        ))
    };
    if let (None, Some(client_assertion)) = (field("client_secret"), field("client_assertion")) {
        let kind = field("client_assertion_type");
        return assertion::verify(&cfg.issuer, b, client_id, token_url, kind, client_assertion);
    }
    match field("client_secret") {
        None => invalid_client(
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'."
                .into(),
        ),
        Some(secret) if secret != app_secret => invalid_client(
            7000215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the \
                 client secret value, not the client secret ID, for a secret added to app \
                 '{client_id}'."
            ),
        ),
        Some(_) => Ok("secret"),
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`.
pub(super) async fn handler(
    State(sim): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Form = url::form_urlencoded::parse(&body).into_owned().collect();
    // Where the client sent this request, as a client assertion's audience must name it.
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let token_url = format!("http://{host}/{tenant}/oauth2/v2.0/token");
    let (result, delay) = sim.token(&tenant, &token_url, &form);
    tokio::time::sleep(delay).await;
    match result {
        Ok(access_token) => {
            let ttl = sim.cfg.token_ttl.as_secs();
            Json(json!({
                "token_type": "Bearer",
                "expires_in": ttl,
                "ext_expires_in": ttl,
                "access_token": access_token,
            }))
            .into_response()
        }
        Err(e) => error_response(e, &headers),
    }
}

/// Entra's error body; the correlation id echoes the caller's `client-request-id` as Entra's does.
fn error_response(e: AadError, headers: &HeaderMap) -> Response {
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
