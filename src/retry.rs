//! What to do with a Graph answer: a pure function of the answer, the attempt and the budgets,
//! so every branch is unit-tested without a network. The vocabulary (`Decision`) is what the
//! pipeline acts on.

use std::time::{Duration, SystemTime};

use crate::{config::RetrySettings, contract::ErrorKind, metrics::RetryReason};

/// A Graph call's result as far as the decision is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<'a> {
    Status {
        code: u16,
        retry_after: Option<&'a str>,
    },
    Timeout,
    ConnectError,
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

impl From<&RetrySettings> for Policy {
    fn from(r: &RetrySettings) -> Self {
        Self {
            max_attempts: r.max_attempts,
            base_delay: Duration::from_millis(r.base_delay_ms),
            max_delay: Duration::from_secs(r.max_delay_secs),
            max_elapsed: r.max_elapsed(),
        }
    }
}

/// The decision. `now` resolves HTTP-date Retry-After; `jitter` is uniform in [0, 1).
pub fn decide(
    answer: &Answer<'_>,
    attempt: Attempt,
    policy: &Policy,
    now: SystemTime,
    jitter: f64,
) -> Decision {
    let (reason, retry_after, throttled) = match *answer {
        Answer::Status {
            code: 200..=299, ..
        } => return Decision::Succeed,
        Answer::Status { code: 401, .. } if !attempt.token_refreshed => {
            return Decision::RefreshToken;
        }
        Answer::Status { code: 401, .. } => return Decision::Pause(PauseReason::Unauthorized),
        Answer::Status { code: 403, .. } => return Decision::Pause(PauseReason::Forbidden),
        Answer::Status { code: 404, .. } => return Decision::Fail(ErrorKind::DeviceNotFound),
        Answer::Status {
            code: 429,
            retry_after,
        } => (
            RetryReason::Throttled,
            retry_after.and_then(|v| parse_retry_after(v, now)),
            true,
        ),
        Answer::Status { code: 408, .. } => (RetryReason::Network, None, false),
        Answer::Status {
            code: 500..=599,
            retry_after,
        } => {
            let ra = retry_after.and_then(|v| parse_retry_after(v, now));
            // A 503/504 that names a Retry-After speaks for the whole tenant, like a 429.
            (RetryReason::ServerError, ra, ra.is_some())
        }
        Answer::Status { .. } => return Decision::Fail(ErrorKind::GraphRejected),
        Answer::Timeout | Answer::ConnectError => (RetryReason::Network, None, false),
    };
    let mut delay = delay(attempt.calls, retry_after, policy, jitter);
    if reason == RetryReason::ServerError {
        // An outage that keeps answering 503 with a short Retry-After is still an outage: back
        // off as for any 5xx, or a two-minute one would spend the attempt budget.
        delay = delay.max(backoff(attempt.calls, policy, jitter));
    }
    if attempt.calls >= policy.max_attempts || attempt.elapsed + delay > policy.max_elapsed {
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

/// Exponential backoff with full jitter; a Retry-After is a floor that jitter only lengthens
/// (by up to a tenth of it, at most one base delay, so waiters do not wake in one herd).
/// `max_delay` caps the schedule but never cuts a Retry-After short: Graph's word wins.
pub fn delay(calls: u32, retry_after: Option<Duration>, policy: &Policy, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    let delay = match retry_after {
        Some(ra) => ra + (ra / 10).min(policy.base_delay).mul_f64(jitter),
        None => backoff(calls, policy, jitter),
    };
    match retry_after {
        Some(ra) if delay > policy.max_delay => policy.max_delay.max(ra),
        _ => delay.min(policy.max_delay),
    }
}

/// `base_delay × 2^(calls − 1)`, capped at `max_delay`, scaled by `jitter` (full jitter).
fn backoff(calls: u32, policy: &Policy, jitter: f64) -> Duration {
    let exp = 2u32.saturating_pow(calls.saturating_sub(1).min(31));
    policy
        .base_delay
        .saturating_mul(exp)
        .min(policy.max_delay)
        .mul_f64(jitter.clamp(0.0, 1.0))
}

/// Parses every Retry-After form Graph sends: delta-seconds, fractional seconds (`2.128`) and
/// an HTTP-date (RFC 9110). A date in the past means "now"; anything else is `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let is_number = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && value.bytes().filter(|&b| b == b'.').count() <= 1
        && value.as_bytes()[0].is_ascii_digit();
    if is_number {
        return value
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_attempts: 5,
        base_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(300),
        max_elapsed: Duration::from_secs(3600),
    };

    fn attempt(calls: u32) -> Attempt {
        Attempt {
            calls,
            elapsed: Duration::ZERO,
            until_deadline: None,
            token_refreshed: false,
        }
    }

    fn status(code: u16) -> Answer<'static> {
        Answer::Status {
            code,
            retry_after: None,
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn decide_at(answer: Answer<'_>, a: Attempt) -> Decision {
        decide(&answer, a, &POLICY, now(), 0.5)
    }

    #[test]
    fn success_statuses() {
        for code in [200, 202, 204] {
            assert_eq!(decide_at(status(code), attempt(1)), Decision::Succeed);
        }
    }

    #[test]
    fn permanent_failures() {
        assert_eq!(
            decide_at(status(404), attempt(1)),
            Decision::Fail(ErrorKind::DeviceNotFound)
        );
        for code in [400, 405, 409, 410, 412, 422, 301, 100] {
            assert_eq!(
                decide_at(status(code), attempt(1)),
                Decision::Fail(ErrorKind::GraphRejected),
                "{code}"
            );
        }
    }

    #[test]
    fn credential_trouble_refreshes_once_then_pauses() {
        assert_eq!(decide_at(status(401), attempt(1)), Decision::RefreshToken);
        let refreshed = Attempt {
            token_refreshed: true,
            ..attempt(2)
        };
        assert_eq!(
            decide_at(status(401), refreshed),
            Decision::Pause(PauseReason::Unauthorized)
        );
        assert_eq!(
            decide_at(status(403), attempt(1)),
            Decision::Pause(PauseReason::Forbidden)
        );
        // Credential trouble never exhausts retries, however many calls were made.
        assert_eq!(
            decide_at(status(403), attempt(99)),
            Decision::Pause(PauseReason::Forbidden)
        );
    }

    #[test]
    fn transient_trouble_retries_with_the_right_reason() {
        let cases = [
            (status(500), RetryReason::ServerError),
            (status(502), RetryReason::ServerError),
            (status(503), RetryReason::ServerError),
            (status(504), RetryReason::ServerError),
            (status(408), RetryReason::Network),
            (status(429), RetryReason::Throttled),
            (Answer::Timeout, RetryReason::Network),
            (Answer::ConnectError, RetryReason::Network),
        ];
        for (answer, want) in cases {
            match decide_at(answer.clone(), attempt(1)) {
                Decision::Retry { reason, .. } => assert_eq!(reason, want, "{answer:?}"),
                other => panic!("{answer:?} gave {other:?}"),
            }
        }
    }

    /// Graph down for minutes, answering 503 with `Retry-After: 1` each time: the job backs off
    /// as for any 5xx (the tenant hold stays the Retry-After), while a 429 keeps Graph's word.
    #[test]
    fn a_long_outage_backs_off_despite_a_short_retry_after() {
        let answer = |code| Answer::Status {
            code,
            retry_after: Some("1"),
        };
        match decide_at(answer(503), attempt(4)) {
            Decision::Retry {
                delay, hold_tenant, ..
            } => {
                assert_eq!(delay, Duration::from_secs(4));
                assert_eq!(hold_tenant, Some(Duration::from_secs(1)));
            }
            other => panic!("{other:?}"),
        }
        match decide_at(answer(429), attempt(4)) {
            Decision::Retry { delay, .. } => assert!(delay < Duration::from_secs(2), "{delay:?}"),
            other => panic!("{other:?}"),
        }
    }

    fn retry_delay(answer: Answer<'_>, jitter: f64) -> (Duration, Option<Duration>) {
        match decide(&answer, attempt(1), &POLICY, now(), jitter) {
            Decision::Retry {
                delay, hold_tenant, ..
            } => (delay, hold_tenant),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn fractional_retry_after_is_a_floor_and_holds_the_tenant() {
        let ra = Answer::Status {
            code: 429,
            retry_after: Some("2.128"),
        };
        for jitter in [0.0, 0.5, 0.999] {
            let (delay, hold) = retry_delay(ra.clone(), jitter);
            assert!(delay >= Duration::from_millis(2128), "{delay:?}");
            assert!(delay <= Duration::from_millis(2128 + 213), "{delay:?}");
            assert_eq!(hold, Some(Duration::from_millis(2128)));
        }
    }

    #[test]
    fn integer_and_http_date_retry_after() {
        let (delay, _) = retry_delay(
            Answer::Status {
                code: 429,
                retry_after: Some("7"),
            },
            0.0,
        );
        assert_eq!(delay, Duration::from_secs(7));
        let date = httpdate::fmt_http_date(now() + Duration::from_secs(42));
        let (delay, hold) = retry_delay(
            Answer::Status {
                code: 429,
                retry_after: Some(&date),
            },
            0.0,
        );
        assert_eq!(delay, Duration::from_secs(42));
        assert_eq!(hold, Some(Duration::from_secs(42)));
    }

    #[test]
    fn retry_after_parsing() {
        let p = |v: &str| parse_retry_after(v, now());
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(p(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(p("0.5"), Some(Duration::from_millis(500)));
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(10));
        assert_eq!(p(&past), Some(Duration::ZERO));
        for garbage in [
            "",
            "-1",
            "1e3",
            "abc",
            "1.2.3",
            ".5",
            "NaN",
            "inf",
            "Tue, 99 Foo",
        ] {
            assert_eq!(p(garbage), None, "{garbage:?}");
        }
        assert_eq!(
            p("99999999999999999999999"),
            None,
            "overflow is garbage, not a panic"
        );
    }

    #[test]
    fn garbage_retry_after_falls_back_to_backoff() {
        let (delay, hold) = retry_delay(
            Answer::Status {
                code: 429,
                retry_after: Some("soon"),
            },
            0.5,
        );
        assert_eq!(
            delay,
            Duration::from_millis(500),
            "full jitter of 1 s base at call 1"
        );
        assert_eq!(
            hold,
            Some(delay),
            "a 429 without a usable Retry-After still holds the tenant"
        );
    }

    #[test]
    fn server_errors_hold_the_tenant_only_with_retry_after() {
        assert_eq!(retry_delay(status(503), 0.5).1, None);
        let (_, hold) = retry_delay(
            Answer::Status {
                code: 503,
                retry_after: Some("4"),
            },
            0.5,
        );
        assert_eq!(hold, Some(Duration::from_secs(4)));
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let d = |calls, jitter| delay(calls, None, &POLICY, jitter);
        assert_eq!(d(1, 0.999_999).as_millis(), 999);
        assert_eq!(d(3, 0.5), Duration::from_secs(2));
        assert_eq!(d(10, 0.999_999).as_secs(), 299, "capped at max_delay");
        assert_eq!(d(u32::MAX, 1.0), Duration::from_secs(300), "no overflow");
        assert_eq!(d(5, 0.0), Duration::ZERO, "full jitter reaches zero");
    }

    #[test]
    fn retry_after_beyond_max_delay_is_still_honoured() {
        let ra = Some(Duration::from_secs(600));
        assert_eq!(delay(1, ra, &POLICY, 0.9), Duration::from_secs(600));
        let ra = Some(Duration::from_secs(300));
        assert_eq!(
            delay(1, ra, &POLICY, 0.9),
            Duration::from_secs(300),
            "jitter is capped"
        );
    }

    #[test]
    fn budgets_end_retries() {
        let last = attempt(POLICY.max_attempts);
        assert_eq!(
            decide_at(status(503), last),
            Decision::Fail(ErrorKind::RetriesExhausted)
        );
        let old = Attempt {
            elapsed: Duration::from_secs(3599),
            ..attempt(1)
        };
        let ra = Answer::Status {
            code: 429,
            retry_after: Some("5"),
        };
        assert_eq!(
            decide_at(ra.clone(), old),
            Decision::Fail(ErrorKind::RetriesExhausted)
        );
        let near = Attempt {
            until_deadline: Some(Duration::from_secs(3)),
            ..attempt(1)
        };
        assert_eq!(
            decide_at(ra.clone(), near),
            Decision::Fail(ErrorKind::DeadlineExceeded)
        );
        let far = Attempt {
            until_deadline: Some(Duration::from_secs(30)),
            ..attempt(1)
        };
        assert!(matches!(decide_at(ra, far), Decision::Retry { .. }));
    }
}
