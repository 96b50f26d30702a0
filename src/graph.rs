//! The Microsoft Graph calls: `POST …/windowsAutopilotDeviceIdentities/{id}/unassignUserFromDevice`
//! and the list `GET …/windowsAutopilotDeviceIdentities` lookups read — the real adapter of the
//! [`ports::Graph`] port. I/O only; what an answer means is decided in [`crate::retry`], what a
//! page holds in [`crate::lookup`].

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use url::Url;

use crate::{
    auth::AccessToken,
    contract::DeviceId,
    job::Call,
    ports,
    retry::{Answer, GraphError, Reply, Response},
    tenant::Tenant,
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
}

impl GraphClient {
    pub fn new(http: reqwest::Client, base: Url) -> Self {
        Self { http, base }
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

    /// Sends the action once with a fresh `client-request-id`.
    pub async fn unassign(&self, token: &AccessToken, device: &DeviceId) -> Reply {
        let request = self
            .http
            .post(self.unassign_url(device))
            .header(reqwest::header::CONTENT_LENGTH, "0");
        self.send(request, token, 0).await
    }

    /// Reads one page of the device list. `url` is built by [`crate::lookup`] or is a
    /// nextLink it vetted: only ever under `graph.base_url`.
    pub async fn list(&self, token: &AccessToken, url: Url) -> Reply {
        self.send(self.http.get(url), token, MAX_PAGE_BODY).await
    }

    /// Sends once with a fresh `client-request-id`, keeping up to `keep` bytes of a success body.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        token: &AccessToken,
        keep: usize,
    ) -> Reply {
        let client_request_id = uuid::Uuid::new_v4().to_string();
        let sent = request
            .bearer_auth(token.bearer())
            .header("client-request-id", &client_request_id)
            .header("return-client-request-id", "true")
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await;
        let answer = match sent {
            Ok(response) => match read(response, keep).await {
                Ok(response) => Answer::Answered(response),
                Err(e) if e.is_timeout() => Answer::Timeout,
                Err(e) => Answer::ConnectError(e.to_string()),
            },
            Err(e) if e.is_timeout() => Answer::Timeout,
            Err(e) => Answer::ConnectError(e.to_string()),
        };
        Reply {
            client_request_id,
            answer,
        }
    }
}

/// The real Graph: the tenant's token source, then HTTP.
impl ports::Graph for GraphClient {
    type Token = AccessToken;

    async fn token(&self, tenant: &Tenant) -> Result<AccessToken, String> {
        tenant.tokens.token().await.map_err(|e| e.to_string())
    }

    fn invalidate(&self, tenant: &Tenant, token: &AccessToken) {
        tenant.tokens.invalidate(token);
    }

    async fn call(&self, token: &AccessToken, call: &Call) -> Reply {
        match call {
            Call::Unassign(device) => self.unassign(token, device).await,
            Call::List(url) => self.list(token, url.clone()).await,
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
        );
        let id = DeviceId::parse("7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e").unwrap();
        assert_eq!(
            client.unassign_url(&id).as_str(),
            "https://graph.microsoft.com/beta/deviceManagement/windowsAutopilotDeviceIdentities/7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e/unassignUserFromDevice"
        );
    }
}
