//! What a Graph answer means: a pure function of the answer, the attempt and the budgets, so
//! every branch is unit-tested without a network. [`Answer`] is the one spelling of "the call
//! answered / timed out / could not connect" — the Graph adapter produces it, the planner
//! ([`crate::job`]) decides on it, the observer labels metrics with it.

use std::{
    borrow::Cow,
    time::{Duration, SystemTime},
};

use crate::contract::ErrorKind;

/// How one Graph call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Answered(Response),
    Timeout,
    ConnectError(String),
}

/// An HTTP answer from Graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<String>,
    /// Graph's `request-id`, for support cases.
    pub request_id: Option<String>,
    pub error: Option<GraphError>,
    /// A successful read's body; empty for actions and errors.
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

/// One call's result, with the `client-request-id` it was sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub client_request_id: String,
    pub answer: Answer,
}

impl Answer {
    pub fn response(&self) -> Option<&Response> {
        match self {
            Self::Answered(r) => Some(r),
            _ => None,
        }
    }

    /// The `status` label of `unassign_graph_requests_total`: an HTTP code, `timeout` or
    /// `connect_error` — a bounded set by construction.
    pub fn label(&self) -> Cow<'static, str> {
        match self {
            Self::Answered(r) => r.status.to_string().into(),
            Self::Timeout => "timeout".into(),
            Self::ConnectError(_) => "connect_error".into(),
        }
    }
}

impl Reply {
    pub fn response(&self) -> Option<&Response> {
        self.answer.response()
    }

    /// A one-line account of the call for events, dead letters and logs.
    pub fn describe(&self) -> String {
        match &self.answer {
            Answer::Answered(r) => match &r.error {
                Some(e) => format!(
                    "Graph answered {} {}: {}",
                    r.status,
                    e.code.as_deref().unwrap_or("(no code)"),
                    e.message
                ),
                None => format!("Graph answered {}", r.status),
            },
            Answer::Timeout => "Graph did not answer in time".to_owned(),
            Answer::ConnectError(e) => format!("could not reach Graph: {e}"),
        }
    }
}

/// Why a Graph call is retried (`unassign_retries_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    Throttled,
    ServerError,
    Network,
}

impl RetryReason {
    pub const ALL: [Self; 3] = [Self::Throttled, Self::ServerError, Self::Network];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::ServerError => "server_error",
            Self::Network => "network",
        }
    }
}

/// Why consumption must pause (credentials or permissions), never dead-letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// 401 even with a freshly fetched token.
    Unauthorized,
    /// 403: the app registration lacks the permission.
    Forbidden,
    /// The token endpoint refused or could not be reached.
    NoToken,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "graph answered 401 with a fresh token",
            Self::Forbidden => {
                "graph answered 403: the app lacks DeviceManagementServiceConfig.ReadWrite.All"
            }
            Self::NoToken => "no access token could be obtained",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Succeed,
    /// Call again after `delay`. `hold_tenant` is set when Graph throttled the tenant: every call
    /// to it must wait that long, not just this one.
    Retry {
        delay: Duration,
        reason: RetryReason,
        hold_tenant: Option<Duration>,
    },
    /// 401 on a token not yet refreshed: drop it and call again at once with a fresh one.
    RefreshToken,
    Fail(ErrorKind),
    Pause(PauseReason),
}

/// Where the job stands when the answer arrives.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// Graph action calls made for this request so far, including the one answered.
    pub calls: u32,
    /// Since the request was first received.
    pub elapsed: Duration,
    /// Until the request's `not_after`; `None` when it has none.
    pub until_deadline: Option<Duration>,
    /// The call was made with a token fetched after a 401.
    pub token_refreshed: bool,
}

/// The retry budgets and delay schedule.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub max_elapsed: Duration,
}

/// The decision. `now` resolves HTTP-date Retry-After; `jitter` is uniform in [0, 1).
pub fn decide(
    answer: &Answer,
    attempt: Attempt,
    policy: &Policy,
    now: SystemTime,
    jitter: f64,
) -> Decision {
    let header = |r: &Response| {
        r.retry_after
            .as_deref()
            .and_then(|v| parse_retry_after(v, now))
    };
    let (reason, retry_after, throttled) = match answer {
        Answer::Answered(r) => match r.status {
            200..=299 => return Decision::Succeed,
            401 if !attempt.token_refreshed => return Decision::RefreshToken,
            401 => return Decision::Pause(PauseReason::Unauthorized),
            403 => return Decision::Pause(PauseReason::Forbidden),
            404 => return Decision::Fail(ErrorKind::DeviceNotFound),
            429 => (RetryReason::Throttled, header(r), true),
            408 => (RetryReason::Network, None, false),
            500..=599 => {
                let ra = header(r);
                // A 503/504 that names a Retry-After speaks for the whole tenant, like a 429.
                (RetryReason::ServerError, ra, ra.is_some())
            }
            _ => return Decision::Fail(ErrorKind::GraphRejected),
        },
        Answer::Timeout | Answer::ConnectError(_) => (RetryReason::Network, None, false),
    };
    let delay = delay(attempt.calls, retry_after, policy, jitter);
    if attempt.calls >= policy.max_attempts
        || attempt.elapsed.saturating_add(delay) > policy.max_elapsed
    {
        return Decision::Fail(ErrorKind::RetriesExhausted);
    }
    if attempt.until_deadline.is_some_and(|left| delay >= left) {
        return Decision::Fail(ErrorKind::DeadlineExceeded);
    }
    let hold_tenant = throttled.then(|| retry_after.unwrap_or(delay));
    Decision::Retry {
        delay,
        reason,
        hold_tenant,
    }
}

/// Whether a call answered `answer` spends the job's retry budget (and counts in `data.attempts`).
/// A call refused for credentials (401, 403) never reached the action: it refreshes the token or
/// pauses the tenant, and a pause and resume must not cost every job in flight an attempt.
pub fn spends_attempt(answer: &Answer) -> bool {
    !matches!(
        answer.response(),
        Some(Response {
            status: 401 | 403,
            ..
        })
    )
}

/// Exponential backoff with full jitter, and Graph's Retry-After as a floor that jitter only
/// lengthens (by up to a tenth of it, at most one base delay, so waiters do not wake in one herd).
/// The backoff applies under a Retry-After too: throttling or an outage that keeps saying "retry
/// in a second" (or `0`, or a date in the past) is still going on, and calling again at its word
/// each time would spend the attempt budget in seconds. `max_delay` caps the schedule but never
/// cuts a Retry-After short: Graph's word wins.
pub fn delay(calls: u32, retry_after: Option<Duration>, policy: &Policy, jitter: f64) -> Duration {
    let backoff = backoff(calls, policy, jitter);
    let Some(ra) = retry_after else {
        return backoff;
    };
    let spread = scaled((ra / 10).min(policy.base_delay), jitter);
    let floor = ra.saturating_add(spread).min(policy.max_delay.max(ra));
    floor.max(backoff)
}

/// `base_delay × 2^(calls − 1)`, capped at `max_delay`, scaled by `jitter` (full jitter).
fn backoff(calls: u32, policy: &Policy, jitter: f64) -> Duration {
    let exp = 2u32.saturating_pow(calls.saturating_sub(1).min(31));
    scaled(
        policy.base_delay.saturating_mul(exp).min(policy.max_delay),
        jitter,
    )
}

/// `d × jitter`, the jitter taken as a fraction in [0, 1] (NaN as 0), never panicking, even
/// for a `d` near `Duration::MAX` (which `Duration::mul_f64` would overflow on rounding).
fn scaled(d: Duration, jitter: f64) -> Duration {
    let fraction = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    Duration::try_from_secs_f64(d.as_secs_f64() * fraction).map_or(d, |scaled| scaled.min(d))
}

/// The longest Retry-After honoured (the contract's bound on every wait a job carries).
pub use crate::contract::MAX_RETRY_AFTER;

/// Parses every Retry-After form Graph sends: delta-seconds, fractional seconds (`2.128`) and
/// an HTTP-date (RFC 9110), capped at [`MAX_RETRY_AFTER`]. A date in the past means "now";
/// anything else is `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let is_number = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && value.bytes().filter(|&b| b == b'.').count() <= 1
        && value.as_bytes()[0].is_ascii_digit();
    let wait = if is_number {
        // Digits and one dot always parse, to a finite non-negative number, or to infinity when
        // too long for an f64 — which the cap below turns into the longest wait.
        let seconds = value.parse::<f64>().ok()?;
        Duration::try_from_secs_f64(seconds.min(MAX_RETRY_AFTER.as_secs_f64())).ok()?
    } else {
        let date = httpdate::parse_http_date(value).ok()?;
        date.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests;
