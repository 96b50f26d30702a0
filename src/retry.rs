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
pub fn spends_attempt(answer: &Answer<'_>) -> bool {
    !matches!(
        answer,
        Answer::Status {
            code: 401 | 403,
            ..
        }
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

pub use crate::throttle::MAX_RETRY_AFTER;

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
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_attempts: 5,
        base_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(300),
        max_elapsed: Duration::from_secs(3600),
    };

    /// The defaults' attempt budget, for schedules longer than [`POLICY`] allows.
    const POLICY_20: Policy = Policy {
        max_attempts: 20,
        ..POLICY
    };

    /// The defaults' elapsed budget.
    const POLICY_DAY: Policy = Policy {
        max_elapsed: Duration::from_secs(86_400),
        ..POLICY
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

    /// A pause and resume must not cost every job in flight an attempt.
    #[test]
    fn only_credential_refusals_spend_no_attempt() {
        assert!(!spends_attempt(&status(401)));
        assert!(!spends_attempt(&status(403)));
        for answer in [
            status(200),
            status(404),
            status(429),
            status(503),
            Answer::Timeout,
        ] {
            assert!(spends_attempt(&answer), "{answer:?}");
        }
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
            let busy = Attempt {
                elapsed: Duration::from_secs(3000),
                ..attempt(1)
            };
            match decide(&answer, busy, &POLICY_DAY, now(), 0.5) {
                Decision::Retry { reason, .. } => assert_eq!(reason, want, "{answer:?}"),
                other => panic!("{answer:?} gave {other:?}"),
            }
        }
    }

    /// Graph down for minutes, answering 503 with `Retry-After: 1` each time, or throttling
    /// that keeps saying "retry in a second": the job backs off as for any 5xx, while the tenant
    /// hold stays Graph's Retry-After.
    #[test]
    fn a_long_outage_or_throttle_backs_off_despite_a_short_retry_after() {
        for code in [503, 429] {
            let answer = Answer::Status {
                code,
                retry_after: Some("1"),
            };
            match decide_at(answer, attempt(4)) {
                Decision::Retry {
                    delay, hold_tenant, ..
                } => {
                    assert_eq!(delay, Duration::from_secs(4), "{code}");
                    assert_eq!(hold_tenant, Some(Duration::from_secs(1)), "{code}");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    /// Sustained throttling that says "retry now" (`0`, or a date already past) must not spend
    /// the 20 attempts in seconds: each retry waits at least the exponential backoff.
    #[test]
    fn a_429_saying_retry_now_still_backs_off_exponentially() {
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(10));
        for retry_after in ["0", "0.0", past.as_str()] {
            let answer = Answer::Status {
                code: 429,
                retry_after: Some(retry_after),
            };
            let delays: Vec<_> = (1..=6)
                .map(
                    |calls| match decide(&answer, attempt(calls), &POLICY_20, now(), 0.5) {
                        Decision::Retry {
                            delay, hold_tenant, ..
                        } => {
                            assert_eq!(hold_tenant, Some(Duration::ZERO), "Graph's word holds");
                            delay.as_millis()
                        }
                        other => panic!("{retry_after:?}: {other:?}"),
                    },
                )
                .collect();
            assert_eq!(
                delays,
                [500, 1000, 2000, 4000, 8000, 16000],
                "{retry_after:?}"
            );
        }
    }

    /// A Retry-After of 2^64 seconds (or ten years) is honoured up to the ceiling: no overflow
    /// of `elapsed + delay`, no tenant held for ever, and a job with too little budget left
    /// fails as retries exhausted.
    #[test]
    fn an_absurd_retry_after_is_capped_not_an_overflow() {
        let ten_years = httpdate::fmt_http_date(now() + Duration::from_secs(10 * 365 * 86_400));
        for retry_after in ["18446744073709549568", "315360000", ten_years.as_str()] {
            let answer = Answer::Status {
                code: 429,
                retry_after: Some(retry_after),
            };
            let busy = Attempt {
                elapsed: Duration::from_secs(3000),
                ..attempt(1)
            };
            match decide(&answer, busy, &POLICY_DAY, now(), 0.5) {
                Decision::Retry {
                    delay, hold_tenant, ..
                } => {
                    assert_eq!(delay, MAX_RETRY_AFTER, "{retry_after:?}");
                    assert_eq!(hold_tenant, Some(MAX_RETRY_AFTER), "{retry_after:?}");
                }
                other => panic!("{retry_after:?}: {other:?}"),
            }
            let late = Attempt {
                elapsed: Duration::MAX,
                ..attempt(1)
            };
            assert_eq!(
                decide_at(answer, late),
                Decision::Fail(ErrorKind::RetriesExhausted),
                "{retry_after:?}"
            );
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
        for huge in ["99999999999999999999999", "18446744073709549568", "3601"] {
            assert_eq!(
                p(huge),
                Some(MAX_RETRY_AFTER),
                "a long wait is capped, not garbage nor a panic"
            );
        }
        let far = httpdate::fmt_http_date(now() + Duration::from_secs(86_400));
        assert_eq!(p(&far), Some(MAX_RETRY_AFTER));
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

    /// Every value in an answer is a producer's data: no status, header, attempt, budget,
    /// clock or jitter makes the decision panic, and the delays keep their promises.
    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Realistic values and the extremes alike.
        fn amount() -> impl Strategy<Value = u64> {
            prop_oneof![0..100_000u64, any::<u64>()]
        }

        fn duration() -> impl Strategy<Value = Duration> {
            (amount(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n))
        }

        fn policy() -> impl Strategy<Value = Policy> {
            (any::<u32>(), amount(), amount(), amount()).prop_map(
                |(attempts, base, max, elapsed)| Policy {
                    max_attempts: attempts,
                    base_delay: Duration::from_millis(base),
                    max_delay: Duration::from_secs(max),
                    max_elapsed: Duration::from_secs(elapsed),
                },
            )
        }

        /// Any instant an HTTP-date can name, as a clock.
        fn clock() -> impl Strategy<Value = SystemTime> {
            (0..253_402_300_799u64).prop_map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
        }

        /// Retry-After values: garbage, numbers of any length, and HTTP-dates, real or not.
        fn retry_after() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[0-9]{1,30}(\\.[0-9]{0,20})?",
                any::<u64>().prop_map(|n| n.to_string()),
                (clock()).prop_map(httpdate::fmt_http_date),
                "(Mon|Sun|Xyz), [0-9]{2} (Jan|Feb|Dec|Foo) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
            ]
        }

        fn answer() -> impl Strategy<Value = (u16, Option<String>, u8)> {
            let code = prop_oneof![Just(429u16), Just(503), Just(401), any::<u16>()];
            (code, proptest::option::of(retry_after()), 0..4u8)
        }

        fn attempt() -> impl Strategy<Value = Attempt> {
            (
                any::<u32>(),
                duration(),
                proptest::option::of(duration()),
                any::<bool>(),
            )
                .prop_map(|(calls, elapsed, until_deadline, token_refreshed)| {
                    Attempt {
                        calls,
                        elapsed,
                        until_deadline,
                        token_refreshed,
                    }
                })
        }

        proptest! {
            #[test]
            fn retry_after_parsing_never_panics_and_is_capped(
                value in retry_after(),
                now in clock(),
            ) {
                if let Some(wait) = parse_retry_after(&value, now) {
                    prop_assert!(wait <= MAX_RETRY_AFTER, "{value:?}: {wait:?}");
                }
            }

            #[test]
            fn decide_never_panics_and_keeps_its_promises(
                (code, header, kind) in answer(),
                a in attempt(),
                policy in policy(),
                now in clock(),
                jitter in any::<f64>(),
            ) {
                let answer = match kind {
                    0 => Answer::Timeout,
                    1 => Answer::ConnectError,
                    _ => Answer::Status { code, retry_after: header.as_deref() },
                };
                let decision = decide(&answer, a, &policy, now, jitter);
                let Decision::Retry { delay, hold_tenant, .. } = decision else {
                    return Ok(());
                };
                // The header counts on a 429 and a 5xx only.
                let ra = match answer {
                    Answer::Status { code: 429 | 500..=599, retry_after } => {
                        retry_after.and_then(|v| parse_retry_after(v, now))
                    }
                    _ => None,
                };
                // Graph's Retry-After is a floor…
                if let Some(ra) = ra {
                    prop_assert!(delay >= ra, "{delay:?} < Retry-After {ra:?}");
                    prop_assert_eq!(hold_tenant, Some(ra));
                }
                // …the schedule is capped, unless Graph said to wait longer…
                prop_assert!(delay <= policy.max_delay.max(ra.unwrap_or_default()));
                // …a Retry-After never shortens the backoff, a 429's included…
                prop_assert!(delay >= backoff(a.calls, &policy, jitter));
                // …and a retry fits every budget.
                prop_assert!(a.calls < policy.max_attempts);
                prop_assert!(a.elapsed.saturating_add(delay) <= policy.max_elapsed);
                prop_assert!(a.until_deadline.is_none_or(|left| delay < left));
                if code == 429 && kind >= 2 {
                    prop_assert!(hold_tenant.is_some(), "a 429 holds the tenant");
                }
            }
        }
    }
}
