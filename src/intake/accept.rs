//! One post, from headers to answer: authenticate, read the bounded body, validate every item
//! with `enqueue`'s own rules, skip what was already confirmed, publish the rest and wait for
//! every confirm. Nothing is half-accepted: any failure answers an error, and what was
//! confirmed before it is remembered so the client's retry does not publish it again.

use std::time::Instant;

use axum::{
    body::Body,
    http::{HeaderMap, StatusCode, header},
};

use super::{
    Intake,
    auth::{Client, Rejected},
    routes::{ErrorItem, RETRY_AFTER_SECS, Refused},
};
use crate::ops::batch::{self, Ids, Parsed, Row};

const SIGNATURE: &str = "x-unassign-signature";
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Leaves room for `:<line>` within the 128 characters of a message-id used as request id.
const MAX_IDEMPOTENCY_KEY: usize = 100;

/// A post accepted: every request id, in the order of the body.
#[derive(Debug)]
pub struct Accepted {
    pub request_ids: Vec<String>,
    /// Nothing was published: every message was already confirmed within the window.
    pub replayed: bool,
}

impl Intake {
    pub async fn accept(
        &self,
        headers: &HeaderMap,
        body: Body,
        now: i64,
    ) -> Result<Accepted, Refused> {
        let signature = headers.get(SIGNATURE);
        // A bearer token is checked before the body is read: an unauthenticated client costs
        // nothing more than its headers.
        let bearer = match (signature, headers.get(header::AUTHORIZATION)) {
            (None, None) => return Err(self.unauthenticated(Rejected::Missing)),
            (None, Some(authorization)) => Some(
                self.auth
                    .bearer(authorization.as_bytes())
                    .map_err(|why| self.unauthenticated(why))?,
            ),
            (Some(_), _) => None,
        };
        let body = self.read_body(headers, body).await?;
        let (client, verified) = match (bearer, signature) {
            (Some(client), _) => (client, None),
            (None, Some(signature)) => {
                let verified = self
                    .auth
                    .signature(signature.as_bytes(), &body, now)
                    .map_err(|why| self.unauthenticated(why))?;
                (verified.client, Some(verified))
            }
            (None, None) => unreachable!("refused above"),
        };
        let answer = self.authenticated(client, headers, &body).await;
        if let (Err(_), Some(verified)) = (&answer, verified.as_ref()) {
            // Refused: the sender's identical retry (same signature) must not look a replay.
            self.auth.forget(verified);
        }
        answer
    }

    fn unauthenticated(&self, why: Rejected) -> Refused {
        self.metrics.auth_failed(why);
        Refused::new(StatusCode::UNAUTHORIZED, why.message())
    }

    /// The body, at most `intake.max_body_bytes`: a larger declared length is refused unread.
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Refused> {
        let too_large = || {
            Refused::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {} bytes", self.max_body),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large());
        }
        match axum::body::to_bytes(body, self.max_body).await {
            Ok(bytes) => Ok(bytes.to_vec()),
            Err(e) if over_limit(&e) => Err(too_large()),
            Err(_) => Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "the body could not be read",
            )),
        }
    }

    async fn authenticated(
        &self,
        client: Client,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Accepted, Refused> {
        self.limit.take(client, Instant::now()).map_err(|wait| {
            Refused::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded").retry_after(wait)
        })?;
        let key = idempotency_key(headers)?;
        let rows = self.parse(headers, body, key)?;
        let deadline = Instant::now() + self.broker.timeout();
        // The ids not yet confirmed, claimed against concurrent posts of the same ids.
        let (fresh, _claim) = loop {
            let fresh = self.unconfirmed(&rows)?;
            match self.inflight.claim(&fresh) {
                Ok(claim) => break (fresh, claim),
                Err(busy) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if !self.inflight.wait(busy, left).await {
                        return Err(Refused::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "a concurrent post of the same messages is still in progress",
                        )
                        .retry_after(RETRY_AFTER_SECS));
                    }
                }
            }
        };
        let duplicates = rows.len() - fresh.len();
        self.metrics.duplicates(duplicates as u64);
        if !fresh.is_empty() {
            let published = self
                .broker
                .publish(&fresh, |row, _| {
                    self.confirmed.remember(row, Instant::now());
                    self.metrics.published(1);
                })
                .await;
            if let Err(e) = published {
                tracing::warn!(error = %e, "post refused: not every message was confirmed");
                return Err(Refused::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the broker did not take every message; retry with the same body",
                )
                .retry_after(RETRY_AFTER_SECS));
            }
        }
        tracing::info!(
            accepted = rows.len(),
            published = fresh.len(),
            duplicates,
            "post accepted"
        );
        Ok(Accepted {
            request_ids: rows.into_iter().map(|r| r.request_id).collect(),
            replayed: fresh.is_empty(),
        })
    }

    /// The body's requests, validated by `enqueue`'s own code; any bad item refuses the post.
    fn parse(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        key: Option<&str>,
    ) -> Result<Vec<Row>, Refused> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase());
        let ids = Ids::Keyed(key);
        let parsed = match content_type.as_deref() {
            Some("application/json") => batch::parse_json(body, ids),
            Some("application/x-ndjson" | "application/jsonl") => batch::parse_jsonl(body, ids),
            _ => {
                return Err(Refused::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Content-Type must be application/json or application/x-ndjson",
                ));
            }
        };
        let Parsed { rows, bad, .. } =
            parsed.map_err(|e| Refused::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        if !bad.is_empty() {
            return Err(Refused {
                status: StatusCode::BAD_REQUEST,
                errors: bad.iter().map(ErrorItem::from).collect(),
                retry_after: None,
            });
        }
        if rows.is_empty() {
            return Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "the body holds no request",
            ));
        }
        if rows.len() > self.max_batch {
            return Err(Refused::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{} requests in one post; the limit is {}",
                    rows.len(),
                    self.max_batch
                ),
            ));
        }
        Ok(rows)
    }

    /// The rows whose message-id was not confirmed within the window; one confirmed with a
    /// different body refuses the post (409).
    fn unconfirmed(&self, rows: &[Row]) -> Result<Vec<Row>, Refused> {
        self.confirmed
            .unconfirmed(rows, Instant::now())
            .map_err(|conflicts| Refused {
                status: StatusCode::CONFLICT,
                errors: conflicts
                    .into_iter()
                    .map(|c| ErrorItem {
                        line: Some(c.line),
                        field: None,
                        message: format!(
                            "message-id {} was accepted with a different body within the \
                             idempotency window",
                            c.message_id
                        ),
                    })
                    .collect(),
                retry_after: None,
            })
    }
}

/// A body that went over the limit while being read (one sent without `Content-Length`), as
/// opposed to one that broke off.
fn over_limit(e: &axum::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
}

/// `Idempotency-Key`, if sent: the characters of a request id, at most
/// [`MAX_IDEMPOTENCY_KEY`] of them.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, Refused> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|k| {
            (1..=MAX_IDEMPOTENCY_KEY).contains(&k.len())
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b))
        })
        .map(Some)
        .ok_or_else(|| {
            Refused::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "Idempotency-Key must be 1–{MAX_IDEMPOTENCY_KEY} characters of A-Z a-z 0-9 . _ : -"
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[tokio::test]
    async fn a_body_over_the_limit_is_told_from_a_broken_one() {
        let e = axum::body::to_bytes(Body::from(vec![b'x'; 100]), 10)
            .await
            .unwrap_err();
        assert!(over_limit(&e));
        let broken = futures_util::stream::iter([Err::<Vec<u8>, _>(std::io::Error::other("cut"))]);
        let e = axum::body::to_bytes(Body::from_stream(broken), 10)
            .await
            .unwrap_err();
        assert!(!over_limit(&e));
    }

    #[test]
    fn idempotency_keys() {
        let key = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(v).unwrap());
            idempotency_key(&headers).map(|k| k.map(str::to_owned))
        };
        assert_eq!(
            key("leaver-4711:a.b_c").unwrap().as_deref(),
            Some("leaver-4711:a.b_c")
        );
        assert!(key(&"k".repeat(100)).is_ok());
        for bad in ["", "a b", "a/b", &"k".repeat(101)] {
            assert!(key(bad).is_err(), "{bad:?}");
        }
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
    }
}
