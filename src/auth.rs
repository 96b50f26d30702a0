//! Access tokens for Graph by the OAuth 2.0 client-credentials grant, authenticated by whichever
//! [`Credential`](crate::credential::Credential) is configured. One token is cached and
//! refreshed five minutes before it expires; a still-valid token outlives a failed refresh, as
//! the Azure SDKs do.
//!
//! A token endpoint that hangs or fails must cost one request, not one per caller: concurrent
//! callers share the request in flight and its result, success or error, and for a few seconds
//! after a failure callers get its error at once. No lock is held across the request.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::{sync::OnceCell, time::Instant};
use url::Url;

use crate::{
    config::{Credentials, TenantName},
    metrics::Metrics,
};

const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// The longest `expires_in` believed. Entra ID issues tokens for 60–90 minutes; the value is the
/// token endpoint's data, and an absurd one must neither overflow an `Instant` nor keep a token
/// (revoked long since) in use for ever.
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// After a failed token request, callers get its error at once for this long instead of each
/// sending one more request to an endpoint that is down or refusing. A probe after a pause
/// clears it ([`TokenSource::clear`]).
const COOL_DOWN: Duration = Duration::from_secs(5);

/// A bearer token. Cloning shares it; `Debug` never shows it.
#[derive(Clone)]
pub struct AccessToken(Arc<SecretString>);

impl AccessToken {
    pub fn bearer(&self) -> &str {
        self.0.expose_secret()
    }

    fn same_as(&self, other: &AccessToken) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken([REDACTED])")
    }
}

/// Why no token could be had. The text carries Entra ID's error code and description (AADSTS…),
/// never the secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("token endpoint refused the credentials: HTTP {status} {error}: {description}")]
    Rejected {
        status: u16,
        error: String,
        description: String,
    },
    #[error("token endpoint unavailable: {0}")]
    Unavailable(String),
    /// The credential itself could not be presented (file unreadable, certificate unusable).
    #[error("client credential unusable: {0}")]
    Credential(String),
}

struct Cached {
    token: AccessToken,
    /// When a new token is fetched: five minutes before expiry, or half-way through a shorter
    /// lifetime.
    refresh_at: Instant,
    expires_at: Instant,
}

/// One token request, shared by every caller that wants a token while it is in flight. If the
/// caller driving it is cancelled, the next waiter sends the request again.
type Flight = Arc<OnceCell<Result<AccessToken, AuthError>>>;

/// What a caller of [`TokenSource::token`] does next.
enum Next {
    Ready(AccessToken),
    Failed(AuthError),
    Join(Flight),
}

#[derive(Default)]
struct State {
    cached: Option<Cached>,
    flight: Option<Flight>,
    /// The last request's error and when it came, while no request has succeeded since.
    failed: Option<(AuthError, Instant)>,
}

impl State {
    fn next(&mut self, now: Instant) -> Next {
        if let Some(c) = self.cached.as_ref().filter(|c| c.refresh_at > now) {
            return Next::Ready(c.token.clone());
        }
        if let Some((error, at)) = &self.failed
            && now < *at + COOL_DOWN
        {
            return match self.still_valid(now) {
                Some(token) => Next::Ready(token),
                None => Next::Failed(error.clone()),
            };
        }
        Next::Join(self.flight.get_or_insert_with(Flight::default).clone())
    }

    /// The request of `flight` answered: its token is cached, or its error starts the cool-down.
    fn land(
        &mut self,
        flight: &Flight,
        result: Result<Cached, AuthError>,
        now: Instant,
    ) -> Result<AccessToken, AuthError> {
        if self.flight.as_ref().is_some_and(|f| Arc::ptr_eq(f, flight)) {
            self.flight = None;
        }
        match result {
            Ok(fresh) => {
                let token = fresh.token.clone();
                self.cached = Some(fresh);
                self.failed = None;
                Ok(token)
            }
            Err(e) => {
                if self.still_valid(now).is_some() {
                    tracing::warn!(error = %e, "token refresh failed; using the current token until it expires");
                }
                self.failed = Some((e.clone(), now));
                Err(e)
            }
        }
    }

    fn still_valid(&self, now: Instant) -> Option<AccessToken> {
        let cached = self.cached.as_ref().filter(|c| c.expires_at > now)?;
        Some(cached.token.clone())
    }
}

pub struct TokenSource {
    http: reqwest::Client,
    credentials: Credentials,
    token_url: Url,
    state: Mutex<State>,
    /// The tenant profile, for its metrics.
    tenant: TenantName,
    metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    /// Usually a number; some authorities send a string.
    expires_in: serde_json::Value,
}

#[derive(Deserialize, Default)]
struct TokenErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenSource {
    pub fn new(
        http: reqwest::Client,
        credentials: Credentials,
        tenant: TenantName,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            http,
            token_url: credentials.token_url(),
            credentials,
            state: Mutex::default(),
            tenant,
            metrics,
        }
    }

    /// A token valid for at least five more minutes, fetching one if needed. Concurrent callers
    /// share the one request in flight and its result; within [`COOL_DOWN`] of a failed one
    /// they get its error (or the token still valid) at once.
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        let flight = match self.lock().next(Instant::now()) {
            Next::Ready(token) => return Ok(token),
            Next::Failed(e) => return Err(e),
            Next::Join(flight) => flight,
        };
        let fetched = flight
            .get_or_init(|| async {
                let result = self.fetch().await;
                self.lock().land(&flight, result, Instant::now())
            })
            .await;
        fetched
            .clone()
            .or_else(|e| self.lock().still_valid(Instant::now()).ok_or(e))
    }

    /// Forgets `used` after Graph rejected it (401), so the next call fetches a new one.
    /// A token that was already replaced is left alone.
    pub fn invalidate(&self, used: &AccessToken) {
        let mut state = self.lock();
        if state.cached.as_ref().is_some_and(|c| c.token.same_as(used)) {
            state.cached = None;
        }
    }

    /// Forgets whatever is cached, and the cool-down of a failure, so that the next call asks
    /// the token endpoint (or joins a request already in flight); used when probing after a
    /// pause.
    pub fn clear(&self) {
        let mut state = self.lock();
        state.cached = None;
        state.failed = None;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data updated under the lock: a poisoned lock still holds a consistent value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn fetch(&self) -> Result<Cached, AuthError> {
        let result = self.request().await;
        self.metrics.token_request(&self.tenant, result.is_ok());
        if let Err(e) = &result {
            tracing::warn!(error = %e, "token request failed");
        }
        result
    }

    async fn request(&self) -> Result<Cached, AuthError> {
        let c = &self.credentials;
        let proof = c
            .credential
            .fields(&c.client_id, self.token_url.as_str())
            .map_err(|e| AuthError::Credential(e.0))?;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", c.client_id.as_str()),
            ("scope", c.scope.as_str()),
        ];
        form.extend(proof.iter().map(|(k, v)| (*k, v.expose_secret())));
        let started = Instant::now();
        let response = self
            .http
            .post(self.token_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| AuthError::Unavailable(describe(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| AuthError::Unavailable(describe(&e)))?;
        if !status.is_success() {
            let err: TokenErrorBody = serde_json::from_slice(&body).unwrap_or_default();
            if status.is_server_error() || status.as_u16() == 429 {
                return Err(AuthError::Unavailable(format!(
                    "HTTP {status} {}",
                    err.error
                )));
            }
            return Err(AuthError::Rejected {
                status: status.as_u16(),
                error: err.error,
                description: first_line(&err.error_description),
            });
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| AuthError::Unavailable(format!("unreadable token response: {e}")))?;
        let lifetime = lifetime(&parsed.expires_in).ok_or_else(|| {
            AuthError::Unavailable(
                "token response without a usable expires_in (seconds, at least 0)".to_owned(),
            )
        })?;
        tracing::debug!(expires_in = ?lifetime, "obtained an access token");
        Ok(Cached {
            token: AccessToken(Arc::new(SecretString::from(parsed.access_token))),
            refresh_at: started + lifetime - REFRESH_BEFORE_EXPIRY.min(lifetime / 2),
            expires_at: started + lifetime,
        })
    }
}

/// A token response's `expires_in`, in seconds: usually a number, a string from some
/// authorities. Capped at [`MAX_LIFETIME`]; a negative, NaN or non-numeric one is `None`, and
/// zero is a token to be used once.
fn lifetime(expires_in: &serde_json::Value) -> Option<Duration> {
    let seconds = match expires_in {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    // Infinity is capped like any long lifetime.
    if seconds.is_nan() || seconds < 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(seconds.min(MAX_LIFETIME.as_secs_f64())).ok()
}

/// reqwest's error text names the URL, which holds no secret here (the proof is in the body).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    format!("{kind}: {e}")
}

/// AADSTS descriptions run to several lines of trace ids; the first line says what is wrong.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use serde_json::json;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path},
    };

    use super::*;
    use crate::{
        contract::TenantId,
        credential::{ClientSecret, Credential},
    };

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const TOKEN_PATH: &str = "/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token";

    fn source(server: &MockServer) -> Arc<TokenSource> {
        let credentials = Credentials {
            authority_host: server.uri().parse().unwrap(),
            tenant_id: TenantId::parse(TENANT).unwrap(),
            client_id: "app".to_owned(),
            credential: Credential::Secret(ClientSecret::Value("secret".into())),
            scope: "https://graph.microsoft.com/.default".to_owned(),
        };
        Arc::new(TokenSource::new(
            crate::graph::http_client(Duration::from_secs(30)),
            credentials,
            TenantName::default_profile(),
            Arc::new(Metrics::new()),
        ))
    }

    fn granted(token: &str, expires_in: serde_json::Value) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "Bearer",
            "access_token": token,
            "expires_in": expires_in,
        }))
    }

    fn refused() -> ResponseTemplate {
        ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided.",
        }))
    }

    async fn requests(server: &MockServer) -> usize {
        server.received_requests().await.unwrap().len()
    }

    /// `n` callers at once; their results, in order.
    async fn concurrently(
        tokens: &Arc<TokenSource>,
        n: usize,
    ) -> Vec<Result<AccessToken, AuthError>> {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let tokens = Arc::clone(tokens);
                tokio::spawn(async move { tokens.token().await })
            })
            .collect();
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await.unwrap());
        }
        results
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_request() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(granted("t1", json!(3599)).set_delay(Duration::from_secs(1)))
            .mount(&server)
            .await;
        let tokens = source(&server);
        let results = concurrently(&tokens, 20).await;
        assert!(results.iter().all(|r| r.as_ref().unwrap().bearer() == "t1"));
        assert_eq!(requests(&server).await, 1);
        tokens.token().await.unwrap();
        assert_eq!(requests(&server).await, 1, "cached");
    }

    /// A token endpoint that refuses (slowly): the callers waiting on the request share its
    /// error instead of each sending one more, and callers within the cool-down get it at once —
    /// until a probe clears it.
    #[tokio::test]
    async fn a_failure_is_shared_and_cools_down() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(refused().set_delay(Duration::from_millis(500)))
            .mount(&server)
            .await;
        let tokens = source(&server);
        let results = concurrently(&tokens, 20).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(AuthError::Rejected { status: 400, .. })))
        );
        assert_eq!(
            requests(&server).await,
            1,
            "one request for all the waiters"
        );

        let started = Instant::now();
        assert!(tokens.token().await.is_err());
        assert!(started.elapsed() < Duration::from_millis(100), "at once");
        assert_eq!(
            requests(&server).await,
            1,
            "no request within the cool-down"
        );

        tokens.clear();
        assert!(tokens.token().await.is_err());
        assert_eq!(requests(&server).await, 2, "a probe forces a fresh request");
    }

    /// The token is refreshed ahead of its expiry (half-way through a short lifetime); when the
    /// refresh fails, the token still valid is used, and the failure cools down.
    #[tokio::test]
    async fn a_still_valid_token_outlives_a_failed_refresh() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(granted("t1", json!("4")))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        let tokens = source(&server);
        let first = tokens.token().await.unwrap();
        assert_eq!(tokens.token().await.unwrap().bearer(), "t1");
        assert_eq!(requests(&server).await, 1);

        tokio::time::sleep(Duration::from_millis(2100)).await;
        let again = tokens.token().await.unwrap();
        assert!(again.same_as(&first), "refresh failed: the current token");
        assert_eq!(requests(&server).await, 2);
        tokens.token().await.unwrap();
        assert_eq!(requests(&server).await, 2, "cooling down");

        tokens.invalidate(&first);
        assert!(matches!(
            tokens.token().await,
            Err(AuthError::Unavailable(_))
        ));
    }

    /// `expires_in` is the token endpoint's data: 2^64 − 1 seconds overflowed an `Instant`
    /// (a panic in the tenant's probe task kept the tenant paused for ever).
    #[tokio::test]
    async fn an_absurd_expires_in_is_capped() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(granted("t1", json!(u64::MAX)))
            .mount(&server)
            .await;
        let tokens = source(&server);
        assert_eq!(tokens.token().await.unwrap().bearer(), "t1");
        let expires_at = tokens.lock().cached.as_ref().unwrap().expires_at;
        assert!(expires_at <= Instant::now() + MAX_LIFETIME);
    }

    #[test]
    fn expires_in_forms() {
        let secs = |v: serde_json::Value| lifetime(&v).map(|d| d.as_secs_f64());
        assert_eq!(secs(json!(3599)), Some(3599.0));
        assert_eq!(secs(json!("3599")), Some(3599.0));
        assert_eq!(secs(json!(" 86399.5 ")), Some(86399.5));
        assert_eq!(secs(json!(0)), Some(0.0), "used once");
        assert_eq!(secs(json!(u64::MAX)), Some(86_400.0));
        assert_eq!(secs(json!("1e999")), Some(86_400.0), "infinity is long");
        for unusable in [
            json!(-1),
            json!("-5"),
            json!("NaN"),
            json!("soon"),
            json!(null),
            json!([1]),
        ] {
            assert_eq!(lifetime(&unusable), None, "{unusable}");
        }
    }

    proptest! {
        #[test]
        fn expires_in_parsing_never_panics_and_is_capped(
            value in prop_oneof![
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                any::<String>().prop_map(serde_json::Value::from),
                "-?[0-9]{1,400}(\\.[0-9]{0,20})?(e-?[0-9]{1,4})?".prop_map(serde_json::Value::from),
            ],
        ) {
            if let Some(lifetime) = lifetime(&value) {
                prop_assert!(lifetime <= MAX_LIFETIME, "{value}: {lifetime:?}");
            }
        }
    }
}
