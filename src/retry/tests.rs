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

fn status(code: u16) -> Answer {
    Answer::Answered(Response {
        status: code,
        ..Response::default()
    })
}

fn answer_ra(code: u16, retry_after: &str) -> Answer {
    Answer::Answered(Response {
        status: code,
        retry_after: Some(retry_after.to_owned()),
        ..Response::default()
    })
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn decide_at(answer: Answer, a: Attempt) -> Decision {
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
        (Answer::ConnectError(String::new()), RetryReason::Network),
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
        let answer = answer_ra(code, "1");
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
        let answer = answer_ra(429, retry_after);
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
        let answer = answer_ra(429, retry_after);
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

fn retry_delay(answer: Answer, jitter: f64) -> (Duration, Option<Duration>) {
    match decide(&answer, attempt(1), &POLICY, now(), jitter) {
        Decision::Retry {
            delay, hold_tenant, ..
        } => (delay, hold_tenant),
        other => panic!("expected a retry, got {other:?}"),
    }
}

#[test]
fn fractional_retry_after_is_a_floor_and_holds_the_tenant() {
    let ra = answer_ra(429, "2.128");
    for jitter in [0.0, 0.5, 0.999] {
        let (delay, hold) = retry_delay(ra.clone(), jitter);
        assert!(delay >= Duration::from_millis(2128), "{delay:?}");
        assert!(delay <= Duration::from_millis(2128 + 213), "{delay:?}");
        assert_eq!(hold, Some(Duration::from_millis(2128)));
    }
}

#[test]
fn integer_and_http_date_retry_after() {
    let (delay, _) = retry_delay(answer_ra(429, "7"), 0.0);
    assert_eq!(delay, Duration::from_secs(7));
    let date = httpdate::fmt_http_date(now() + Duration::from_secs(42));
    let (delay, hold) = retry_delay(answer_ra(429, &date), 0.0);
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
    let (delay, hold) = retry_delay(answer_ra(429, "soon"), 0.5);
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
    let (_, hold) = retry_delay(answer_ra(503, "4"), 0.5);
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
    let ra = answer_ra(429, "5");
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
        (any::<u32>(), amount(), amount(), amount()).prop_map(|(attempts, base, max, elapsed)| {
            Policy {
                max_attempts: attempts,
                base_delay: Duration::from_millis(base),
                max_delay: Duration::from_secs(max),
                max_elapsed: Duration::from_secs(elapsed),
            }
        })
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
            .prop_map(
                |(calls, elapsed, until_deadline, token_refreshed)| Attempt {
                    calls,
                    elapsed,
                    until_deadline,
                    token_refreshed,
                },
            )
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
                1 => Answer::ConnectError(String::new()),
                _ => Answer::Answered(Response { status: code, retry_after: header.clone(), ..Response::default() }),
            };
            let decision = decide(&answer, a, &policy, now, jitter);
            let Decision::Retry { delay, hold_tenant, .. } = decision else {
                return Ok(());
            };
            // The header counts on a 429 and a 5xx only.
            let ra = match &answer {
                Answer::Answered(Response { status: 429 | 500..=599, retry_after, .. }) => {
                    retry_after.as_deref().and_then(|v| parse_retry_after(v, now))
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
