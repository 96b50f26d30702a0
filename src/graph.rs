//! The Microsoft Graph calls: `POST …/windowsAutopilotDeviceIdentities/{id}/unassignUserFromDevice`
//! and the list `GET …/windowsAutopilotDeviceIdentities` lookups read. I/O only; what an answer
//! means is decided in [`crate::retry`], what a page holds in [`crate::lookup`].

use std::{sync::Arc, time::Duration};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use crate::{
    auth::AccessToken,
    config::TenantName,
    contract::DeviceId,
    metrics::{CallStatus, GraphOperation, Metrics},
    retry::Answer,
};

/// Graph error bodies are small; anything longer is cut before parsing.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// A page of the device list: Graph pages hold at most a few hundred identities of a few KiB.
const MAX_PAGE_BODY: usize = 16 * 1024 * 1024;
/// Messages kept in events and dead-letter headers.
const MAX_MESSAGE: usize = 1024;

pub struct GraphClient {
    http: reqwest::Client,
    base: Url,
    metrics: Arc<Metrics>,
}

/// One call's result.
#[derive(Debug, Clone)]
pub struct Reply {
    pub client_request_id: String,
    pub outcome: CallOutcome,
}

#[derive(Debug, Clone)]
pub enum CallOutcome {
    Answered(Response),
    Timeout,
    ConnectError(String),
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<String>,
    /// Graph's `request-id`, for support cases.
    pub request_id: Option<String>,
    pub error: Option<GraphError>,
    /// A successful read's body (at most [`MAX_PAGE_BODY`]); empty for actions and errors.
    pub body: Vec<u8>,
}

/// Graph's `{"error":{"code","message"}}`, with Intune's JSON-in-`message` unwrapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    pub code: Option<String>,
    pub message: String,
    /// Intune's Activity ID, when its wrapped message names one.
    pub activity_id: Option<String>,
}

impl Reply {
    pub fn answer(&self) -> Answer<'_> {
        match &self.outcome {
            CallOutcome::Answered(r) => Answer::Status {
                code: r.status,
                retry_after: r.retry_after.as_deref(),
            },
            CallOutcome::Timeout => Answer::Timeout,
            CallOutcome::ConnectError(_) => Answer::ConnectError,
        }
    }

    pub fn response(&self) -> Option<&Response> {
        match &self.outcome {
            CallOutcome::Answered(r) => Some(r),
            _ => None,
        }
    }

    /// A one-line account of the call for events, dead letters and logs.
    pub fn describe(&self) -> String {
        match &self.outcome {
            CallOutcome::Answered(r) => match &r.error {
                Some(e) => format!(
                    "Graph answered {} {}: {}",
                    r.status,
                    e.code.as_deref().unwrap_or("(no code)"),
                    e.message
                ),
                None => format!("Graph answered {}", r.status),
            },
            CallOutcome::Timeout => "Graph did not answer in time".to_owned(),
            CallOutcome::ConnectError(e) => format!("could not reach Graph: {e}"),
        }
    }
}

impl GraphClient {
    pub fn new(http: reqwest::Client, base: Url, metrics: Arc<Metrics>) -> Self {
        Self {
            http,
            base,
            metrics,
        }
    }

    /// The action URL. `DeviceId` is a validated GUID, and the segment is percent-encoded on top.
    pub fn unassign_url(&self, device: &DeviceId) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("graph.base_url is an http(s) URL")
            .pop_if_empty()
            .extend([
                "deviceManagement",
                "windowsAutopilotDeviceIdentities",
                device.as_str(),
                "unassignUserFromDevice",
            ]);
        url
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Sends the action once with a fresh `client-request-id`; counted for `tenant`.
    pub async fn unassign(
        &self,
        tenant: &TenantName,
        token: &AccessToken,
        device: &DeviceId,
    ) -> Reply {
        let request = self
            .http
            .post(self.unassign_url(device))
            .header(reqwest::header::CONTENT_LENGTH, "0");
        self.send(tenant, GraphOperation::Unassign, request, token, 0)
            .await
    }

    /// Reads one page of the device list. `url` is built by [`crate::lookup`] or is a
    /// nextLink it vetted: only ever under `graph.base_url`.
    pub async fn list(&self, tenant: &TenantName, token: &AccessToken, url: Url) -> Reply {
        let request = self.http.get(url);
        self.send(tenant, GraphOperation::List, request, token, MAX_PAGE_BODY)
            .await
    }

    /// Sends once with a fresh `client-request-id`, keeping up to `keep` bytes of a success body.
    async fn send(
        &self,
        tenant: &TenantName,
        operation: GraphOperation,
        request: reqwest::RequestBuilder,
        token: &AccessToken,
        keep: usize,
    ) -> Reply {
        let client_request_id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let sent = request
            .bearer_auth(token.bearer())
            .header("client-request-id", &client_request_id)
            .header("return-client-request-id", "true")
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await;
        let outcome = match sent {
            Ok(response) => match read(response, keep).await {
                Ok(response) => CallOutcome::Answered(response),
                Err(e) if e.is_timeout() => CallOutcome::Timeout,
                Err(e) => CallOutcome::ConnectError(e.to_string()),
            },
            Err(e) if e.is_timeout() => CallOutcome::Timeout,
            Err(e) => CallOutcome::ConnectError(e.to_string()),
        };
        let status = match &outcome {
            CallOutcome::Answered(r) => CallStatus::Http(r.status),
            CallOutcome::Timeout => CallStatus::Timeout,
            CallOutcome::ConnectError(_) => CallStatus::ConnectError,
        };
        self.metrics
            .graph_call(tenant, operation, status, started.elapsed().as_secs_f64());
        Reply {
            client_request_id,
            outcome,
        }
    }
}

/// Reads the answer. An error body that fails mid-way still leaves the status, which is what
/// decides; a success body wanted (`keep` > 0) that fails mid-way is a failed call, and one
/// over `keep` bytes is cut (and so fails to parse).
async fn read(mut response: reqwest::Response, keep: usize) -> reqwest::Result<Response> {
    let status = response.status().as_u16();
    let headers = response.headers();
    let retry_after = header(headers, RETRY_AFTER.as_str());
    let request_id = header(headers, "request-id");
    let success = response.status().is_success();
    let limit = if success { keep } else { MAX_ERROR_BODY };
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) if success => return Err(e),
            Err(_) => break,
        }
    }
    let (error, body) = match success {
        true => (None, body),
        false => (parse_error(&body), Vec::new()),
    };
    Ok(Response {
        status,
        retry_after,
        request_id,
        error,
        body,
    })
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: Option<String>,
    #[serde(default)]
    message: String,
}

/// Intune's error, serialised as a JSON string inside Graph's `message`.
#[derive(Deserialize)]
struct IntuneMessage {
    #[serde(rename = "Message")]
    message: String,
}

/// Parses Graph's error body. Unparseable bodies yield `None`: the status still decides.
pub fn parse_error(body: &[u8]) -> Option<GraphError> {
    let envelope: ErrorEnvelope = serde_json::from_slice(body).ok()?;
    let raw = envelope.error.message;
    let message = serde_json::from_str::<IntuneMessage>(&raw)
        .map(|m| m.message)
        .unwrap_or(raw);
    let activity_id = message
        .split_once("Activity ID: ")
        .and_then(|(_, rest)| rest.get(..36))
        .filter(|id| crate::contract::is_guid(id))
        .map(str::to_owned);
    Some(GraphError {
        code: envelope.error.code,
        message: truncate(&message),
        activity_id,
    })
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// The HTTP client for Graph and the token endpoint: bounded time, no redirects (a redirect
/// must never carry a bearer token elsewhere), rustls.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("unassign-worker/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .expect("the TLS backend initialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_graph_error() {
        let body = br#"{"error":{"code":"TooManyRequests","message":"Please retry again later.","innerError":{"request-id":"x"}}}"#;
        let e = parse_error(body).unwrap();
        assert_eq!(e.code.as_deref(), Some("TooManyRequests"));
        assert_eq!(e.message, "Please retry again later.");
        assert_eq!(e.activity_id, None);
    }

    #[test]
    fn intune_wrapped_error() {
        let inner = r#"{"_version":3,"Message":"An error has occurred - Operation ID (for customer support): 00000000-0000-0000-0000-000000000000 - Activity ID: 7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e - Url: https://fef.msub02.manage.microsoft.com/x","CustomApiErrorPhrase":"","RetryAfter":null}"#;
        let body = serde_json::json!({"error": {"code": "ResourceNotFound", "message": inner}});
        let e = parse_error(body.to_string().as_bytes()).unwrap();
        assert_eq!(e.code.as_deref(), Some("ResourceNotFound"));
        assert!(
            e.message.starts_with("An error has occurred"),
            "{}",
            e.message
        );
        assert_eq!(
            e.activity_id.as_deref(),
            Some("7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e")
        );
    }

    #[test]
    fn garbage_bodies_are_not_errors() {
        assert_eq!(parse_error(b""), None);
        assert_eq!(parse_error(b"<html>502 Bad Gateway</html>"), None);
        let long = serde_json::json!({"error": {"code": "X", "message": "m".repeat(5000)}});
        assert!(
            parse_error(long.to_string().as_bytes())
                .unwrap()
                .message
                .chars()
                .count()
                <= 1025
        );
    }

    #[test]
    fn url_is_built_from_segments() {
        let client = GraphClient::new(
            reqwest::Client::new(),
            Url::parse("https://graph.microsoft.com/beta/").unwrap(),
            Arc::new(Metrics::new()),
        );
        let id = DeviceId::parse("7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e").unwrap();
        assert_eq!(
            client.unassign_url(&id).as_str(),
            "https://graph.microsoft.com/beta/deviceManagement/windowsAutopilotDeviceIdentities/7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e/unassignUserFromDevice"
        );
    }
}
