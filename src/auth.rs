//! Access tokens for Graph by the OAuth 2.0 client-credentials grant, authenticated by whichever
//! [`Credential`](crate::credential::Credential) is configured. One token is cached and
//! refreshed five minutes before it expires, by one request at a time; a still-valid token
//! outlives a failed refresh, as the Azure SDKs do.

use std::{sync::Arc, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::{sync::Mutex, time::Instant};
use url::Url;

use crate::{
    config::{Credentials, TenantName},
    metrics::Metrics,
};

const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);

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
    expires_at: Instant,
}

pub struct TokenSource {
    http: reqwest::Client,
    credentials: Credentials,
    token_url: Url,
    cached: Mutex<Option<Cached>>,
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
            cached: Mutex::new(None),
            tenant,
            metrics,
        }
    }

    /// A token valid for at least five more minutes, fetching one if needed. Concurrent callers
    /// wait for the one refresh in flight instead of starting their own.
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        let mut cached = self.cached.lock().await;
        let now = Instant::now();
        if let Some(c) = cached
            .as_ref()
            .filter(|c| c.expires_at > now + REFRESH_BEFORE_EXPIRY)
        {
            return Ok(c.token.clone());
        }
        match self.fetch().await {
            Ok(fresh) => {
                let token = fresh.token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
            Err(e) => match cached.as_ref().filter(|c| c.expires_at > Instant::now()) {
                Some(still_valid) => {
                    tracing::warn!(error = %e, "token refresh failed; using the current token until it expires");
                    Ok(still_valid.token.clone())
                }
                None => Err(e),
            },
        }
    }

    /// Forgets `used` after Graph rejected it (401), so the next call fetches a new one.
    /// A token that was already replaced is left alone.
    pub async fn invalidate(&self, used: &AccessToken) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token.same_as(used)) {
            *cached = None;
        }
    }

    /// Forgets whatever is cached; used when probing after a pause.
    pub async fn clear(&self) {
        *self.cached.lock().await = None;
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
        let expires_in = match &parsed.expires_in {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .ok_or_else(|| AuthError::Unavailable("token response without expires_in".to_owned()))?;
        tracing::debug!(expires_in, "obtained an access token");
        Ok(Cached {
            token: AccessToken(Arc::new(SecretString::from(parsed.access_token))),
            expires_at: started + Duration::from_secs(expires_in),
        })
    }
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
