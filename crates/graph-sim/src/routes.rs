//! HTTP routes: the Graph endpoints (with Graph's headers and error bodies) and `/_sim` controls.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;
use uuid::Uuid;

use crate::state::{Answer, Shared};
use crate::{Behaviour, Scripted, Stats, aad, token};

const DEVICES: &str = "/beta/deviceManagement/windowsAutopilotDeviceIdentities";
/// Where Intune says the failing call went, inside its wrapped error messages.
const INTUNE_URL: &str = "https://fef.msub02.manage.microsoft.com/DeviceEnrollmentFE/\
                          StatelessDeviceEnrollmentFEService/deviceManagement/\
                          windowsAutopilotDeviceIdentities";
const MISSING_PERMISSION: &str = "Application is not authorized to perform this operation. \
     Application must have one of the following scopes: DeviceManagementServiceConfig.ReadWrite.All";

pub(super) fn router(sim: Arc<Shared>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route(DEVICES, get(list))
        .route(
            &format!("{DEVICES}/{{id}}/unassignUserFromDevice"),
            post(unassign),
        )
        .route("/_sim/stats", get(stats))
        .route("/_sim/reset", post(reset))
        .route("/_sim/behaviour", get(behaviour).put(set_behaviour))
        .route("/_sim/script", post(script))
        .route("/_sim/revoke-tokens", post(revoke_tokens))
        .fallback(unexpected)
        .method_not_allowed_fallback(unexpected)
        .with_state(sim)
}

/// `POST /{tenant}/oauth2/v2.0/token`.
async fn token(
    State(sim): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: token::Form = url::form_urlencoded::parse(&body).into_owned().collect();
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
        Err(e) => aad::error_response(e, &headers),
    }
}

/// Ids Graph puts on every response: its own `request-id` and the caller's `client-request-id`
/// (or, like Graph, the request id when the caller sent none).
struct Ids {
    request_id: String,
    client_request_id: String,
}

impl Ids {
    fn new(headers: &HeaderMap) -> Ids {
        let request_id = Uuid::new_v4().to_string();
        let client_request_id = headers
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| request_id.clone(), str::to_owned);
        Ids {
            request_id,
            client_request_id,
        }
    }

    fn stamp(&self, mut response: Response) -> Response {
        let headers = response.headers_mut();
        for (name, value) in [
            ("request-id", &self.request_id),
            ("client-request-id", &self.client_request_id),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        response
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn request_line(method: &Method, uri: &Uri) -> String {
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{method} {target}")
}

/// `POST …/windowsAutopilotDeviceIdentities/{id}/unassignUserFromDevice`.
async fn unassign(
    State(sim): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let ids = Ids::new(&headers);
    let (answer, _in_flight) = sim.unassign(bearer(&headers), &id, &request_line(&method, &uri));
    tokio::time::sleep(answer.delay).await;
    let url =
        format!("{INTUNE_URL}('{id}')/microsoft.management.services.api.unassignUserFromDevice");
    answer_response(&ids, answer, &url)
}

/// `GET …/windowsAutopilotDeviceIdentities` with `$filter`, `$top` and `$skiptoken` paging.
async fn list(
    State(sim): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let ids = Ids::new(&headers);
    let _in_flight = sim.list_in_flight();
    let page = match sim.list(bearer(&headers), query.as_deref()) {
        Ok(page) => page,
        Err(answer) => {
            tokio::time::sleep(answer.delay).await;
            return answer_response(&ids, answer, INTUNE_URL);
        }
    };
    tokio::time::sleep(page.delay).await;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let mut body = json!({
        "@odata.context": format!("http://{host}/beta/$metadata#deviceManagement/windowsAutopilotDeviceIdentities"),
        "value": page.devices,
    });
    if let Some(next) = page.next_query {
        let origin = page.next_origin.unwrap_or_else(|| format!("http://{host}"));
        body["@odata.nextLink"] = format!("{origin}{DEVICES}?{next}").into();
    }
    ids.stamp(Json(body).into_response())
}

/// Turns a decided answer into Graph's response: no body on success, Graph's error body otherwise.
fn answer_response(ids: &Ids, answer: Answer, intune_url: &str) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = if status.is_success() {
        status.into_response()
    } else {
        let message = answer
            .message
            .unwrap_or_else(|| default_message(status, &ids.request_id, intune_url));
        (status, Json(error_body(ids, status, &message))).into_response()
    };
    let headers = response.headers_mut();
    if let Some(value) = answer
        .retry_after
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert(header::RETRY_AFTER, value);
    }
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(
                "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"",
            ),
        );
    }
    ids.stamp(response)
}

/// `{"error":{"code","message","innerError":{"date","request-id","client-request-id"}}}`.
fn error_body(ids: &Ids, status: StatusCode, message: &str) -> Value {
    let date = OffsetDateTime::now_utc()
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]"
        ))
        .unwrap_or_default();
    json!({"error": {
        "code": error_code(status),
        "message": message,
        "innerError": {
            "date": date,
            "request-id": ids.request_id,
            "client-request-id": ids.client_request_id,
        },
    }})
}

fn error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequest",
        401 => "InvalidAuthenticationToken",
        403 => "Forbidden",
        404 => "ResourceNotFound",
        408 => "RequestTimeout",
        409 => "Conflict",
        429 => "TooManyRequests",
        500 => "InternalServerError",
        502 => "BadGateway",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "UnknownError",
    }
}

/// Graph's gateway answers throttling and unavailability itself; everything else comes from
/// Intune, which wraps its own error as a JSON string in `message`.
fn default_message(status: StatusCode, activity_id: &str, intune_url: &str) -> String {
    let phrase = match status.as_u16() {
        429 => return "Please retry again later.".into(),
        503 => return "The service is currently unavailable. Please retry later.".into(),
        504 => return "The gateway did not receive a timely response.".into(),
        403 => MISSING_PERMISSION,
        _ => "An error has occurred",
    };
    json!({
        "_version": 3,
        "Message": format!(
            "{phrase} - Operation ID (for customer support): 00000000-0000-0000-0000-000000000000 \
             - Activity ID: {activity_id} - Url: {intune_url}?api-version=2024-06-10"
        ),
        "CustomApiErrorPhrase": "",
        "RetryAfter": null,
        "ErrorSourceService": "",
        "HttpHeaders": "{}",
    })
    .to_string()
}

/// Any request the simulator does not serve: 404, and remembered for tests to assert on.
async fn unexpected(
    State(sim): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    sim.record_unexpected(request_line(&method, &uri));
    let ids = Ids::new(&headers);
    let message = format!("No HTTP resource was found that matches the request URI '{uri}'.");
    let body = Json(error_body(&ids, StatusCode::NOT_FOUND, &message));
    ids.stamp((StatusCode::NOT_FOUND, body).into_response())
}

async fn stats(State(sim): State<Arc<Shared>>) -> Json<Stats> {
    Json(sim.stats())
}

async fn reset(State(sim): State<Arc<Shared>>) -> StatusCode {
    sim.reset_stats();
    StatusCode::NO_CONTENT
}

async fn behaviour(State(sim): State<Arc<Shared>>) -> Json<Behaviour> {
    Json(sim.behaviour())
}

async fn set_behaviour(State(sim): State<Arc<Shared>>, Json(new): Json<Behaviour>) -> StatusCode {
    sim.update(|b| *b = new);
    StatusCode::NO_CONTENT
}

async fn script(State(sim): State<Arc<Shared>>, Json(answers): Json<Vec<Scripted>>) -> StatusCode {
    sim.push_script(answers);
    StatusCode::NO_CONTENT
}

async fn revoke_tokens(State(sim): State<Arc<Shared>>) -> StatusCode {
    sim.revoke_tokens();
    StatusCode::NO_CONTENT
}
