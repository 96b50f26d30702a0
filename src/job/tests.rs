//! Every action and branch of the planner, without a broker, a network or a clock.

use super::{outcome::MAX_SUMMARY, *};
use crate::retry::{Answer, Response};

mod lookups;
mod properties;

const A: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
const B: &str = "8b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
const BASE: &str = "https://graph.example/beta/";

fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

fn policy() -> Policy {
    Policy {
        retry: retry::Policy {
            max_attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            max_elapsed: Duration::from_secs(3600),
        },
        park_after: Duration::from_secs(5),
        tiers: vec![4, 8, 16, 32, 64],
        graph_base: Url::parse(BASE).unwrap(),
    }
}

fn now() -> Now {
    Now {
        at: t0(),
        jitter: 0.5,
        held_for: None,
        paused_for: None,
        stopping: false,
    }
}

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn request(target: Target) -> Request {
    Request {
        request_id: "r-1".to_owned(),
        target,
        tenant_id: None,
        requested_by: None,
        reason: None,
        not_after: None,
    }
}

fn job(target: Target) -> JobState {
    JobState::new(request(target), Carried::fresh(t0()), &policy())
}

fn device_job() -> JobState {
    job(Target::Device(id(A)))
}

fn reply(status: u16, retry_after: Option<&str>) -> Reply {
    Reply {
        client_request_id: format!("c-{status}"),
        answer: Answer::Answered(Response {
            status,
            retry_after: retry_after.map(str::to_owned),
            ..Response::default()
        }),
    }
}

fn page(ids: &[(&str, &str)], next: Option<&str>) -> Reply {
    let value: Vec<_> = ids
        .iter()
        .map(|(id, who)| serde_json::json!({"id": id, "serialNumber": who, "userPrincipalName": who}))
        .collect();
    let mut body = serde_json::json!({ "value": value });
    if let Some(next) = next {
        body["@odata.nextLink"] = next.into();
    }
    Reply {
        client_request_id: "c-page".to_owned(),
        answer: Answer::Answered(Response {
            status: 200,
            body: body.to_string().into_bytes(),
            ..Response::default()
        }),
    }
}

fn step(job: &mut JobState, event: Event) -> Action {
    plan(job, event, &policy(), &now()).action
}

fn finished(action: Action) -> Outcome {
    match action {
        Action::Settle(Settlement::Finish(outcome)) => *outcome,
        other => panic!("expected an outcome, got {other:?}"),
    }
}

fn handed_back(action: Action) -> HandBack {
    match action {
        Action::Settle(Settlement::HandBack(back)) => back,
        other => panic!("expected a hand-back, got {other:?}"),
    }
}

fn kind(outcome: &Outcome) -> Option<ErrorKind> {
    outcome.error.as_ref().map(|e| e.kind)
}

#[test]
fn a_device_is_called_then_its_outcome_published() {
    let mut j = device_job();
    assert!(matches!(step(&mut j, Event::Start), Action::Call(Call::Unassign(d)) if d == id(A)));
    let next = plan(&mut j, Event::Answered(reply(204, None)), &policy(), &now());
    assert_eq!(next.decision, Some(Decision::Succeed));
    let outcome = finished(next.action);
    assert_eq!((outcome.attempts, kind(&outcome)), (1, None));
    assert_eq!(outcome.client_request_id.as_deref(), Some("c-204"));
}

/// CONTRACT section 6: a 429 with a fractional Retry-After at attempt 3 holds the tenant for
/// exactly that long and waits at least that long; the next call may succeed.
#[test]
fn a_fractional_retry_after_at_attempt_three_is_waited_then_called_again() {
    let mut j = device_job();
    step(&mut j, Event::Start);
    for _ in 0..2 {
        assert!(matches!(
            step(&mut j, Event::Answered(reply(503, None))),
            Action::Wait(_)
        ));
        assert!(matches!(step(&mut j, Event::Waited), Action::Call(_)));
    }
    let next = plan(
        &mut j,
        Event::Answered(reply(429, Some("2.128"))),
        &policy(),
        &now(),
    );
    let Some(Decision::Retry { hold_tenant, .. }) = next.decision else {
        panic!("{next:?}");
    };
    assert_eq!(hold_tenant, Some(Duration::from_millis(2128)));
    let Action::Wait(delay) = next.action else {
        panic!("{next:?}");
    };
    assert!(delay >= Duration::from_millis(2128) && delay <= Duration::from_secs(4));
    assert!(matches!(step(&mut j, Event::Waited), Action::Call(_)));
    let outcome = finished(step(&mut j, Event::Answered(reply(204, None))));
    assert_eq!((outcome.attempts, kind(&outcome)), (4, None));
}

#[test]
fn a_wait_longer_than_park_after_is_parked_in_the_tier_that_fits() {
    let mut j = device_job();
    step(&mut j, Event::Start);
    let back = handed_back(step(&mut j, Event::Answered(reply(429, Some("20")))));
    assert_eq!(back.tier, Some(Duration::from_secs(16)));
    let retry_at = back.carried.retry.retry_at.unwrap();
    assert!(
        retry_at >= t0() + Duration::from_secs(20),
        "the whole wait is owed"
    );
    assert_eq!(back.carried.retry.attempts, 1);
}

/// SIGTERM during a wait: the job goes back with the wait it still owes, straight to the queue
/// when that is short, and the tenant's hold if it is longer.
#[test]
fn an_interrupted_wait_hands_back_what_is_left_of_it() {
    let mut j = device_job();
    step(&mut j, Event::Start);
    let Action::Wait(delay) = step(&mut j, Event::Answered(reply(429, Some("3")))) else {
        panic!("a short wait is waited");
    };
    let later = Now {
        at: t0() + Duration::from_secs(1),
        stopping: true,
        ..now()
    };
    let back = handed_back(plan(&mut j, Event::Interrupted, &policy(), &later).action);
    assert_eq!(back.carried.retry.retry_at, Some(t0() + delay));
    assert_eq!((back.tier, back.carried.retry.attempts), (None, 1));
    let mut j = device_job();
    let held = Now {
        held_for: Some(Duration::from_secs(4)),
        ..now()
    };
    plan(&mut j, Event::Start, &policy(), &held);
    let back = handed_back(plan(&mut j, Event::Interrupted, &policy(), &held).action);
    assert_eq!(
        back.carried.retry.retry_at,
        Some(t0() + Duration::from_secs(4))
    );
}

#[test]
fn a_carried_wait_is_waited_first_and_a_past_one_is_not() {
    let carried = |at| Carried {
        retry: RetryState {
            retry_at: Some(at),
            ..RetryState::fresh(t0())
        },
        progress: Progress::default(),
    };
    let owed = carried(t0() + Duration::from_secs(2));
    let mut j = JobState::new(request(Target::Device(id(A))), owed, &policy());
    assert!(matches!(step(&mut j, Event::Start), Action::Wait(d) if d == Duration::from_secs(2)));
    assert!(matches!(step(&mut j, Event::Waited), Action::Call(_)));
    let past = carried(t0() - Duration::from_secs(2));
    let mut j = JobState::new(request(Target::Device(id(A))), past, &policy());
    assert!(matches!(step(&mut j, Event::Start), Action::Call(_)));
}

#[test]
fn a_passed_deadline_fails_before_any_call() {
    let mut j = JobState::new(
        Request {
            not_after: Some(t0() - Duration::from_secs(1)),
            ..request(Target::Device(id(A)))
        },
        Carried::fresh(t0()),
        &policy(),
    );
    let outcome = finished(step(&mut j, Event::Start));
    assert_eq!(kind(&outcome), Some(ErrorKind::DeadlineExceeded));
    let message = &outcome.error.unwrap().message;
    assert_eq!(message, "not_after passed before any call was made");
}

#[test]
fn a_deadline_too_close_for_the_retry_fails_as_deadline_exceeded() {
    let mut j = JobState::new(
        Request {
            not_after: Some(t0() + Duration::from_secs(2)),
            ..request(Target::Device(id(A)))
        },
        Carried::fresh(t0()),
        &policy(),
    );
    step(&mut j, Event::Start);
    let outcome = finished(step(&mut j, Event::Answered(reply(429, Some("5")))));
    let error = outcome.error.unwrap();
    assert_eq!(
        (error.kind, error.http_status),
        (ErrorKind::DeadlineExceeded, Some(429))
    );
    assert!(
        error
            .message
            .starts_with("not_after passed after 1 call(s) in 0ns; last: Graph answered 429"),
        "{}",
        error.message
    );
}

#[test]
fn a_paused_tenant_parks_its_job_until_the_probe_unless_the_session_stops() {
    let paused = Now {
        paused_for: Some(Duration::from_secs(1)),
        ..now()
    };
    let mut j = device_job();
    let back = handed_back(plan(&mut j, Event::Start, &policy(), &paused).action);
    // Rounded up to a whole tier past park_after, plus the slack.
    assert_eq!(back.tier, Some(Duration::from_secs(8)));
    let owed = back.carried.retry.retry_at.unwrap() - t0();
    assert_eq!(owed, time::Duration::milliseconds(8250));
    let stopping = Now {
        stopping: true,
        ..paused
    };
    let mut j = device_job();
    let back = handed_back(plan(&mut j, Event::Start, &policy(), &stopping).action);
    assert_eq!((back.tier, back.carried.retry.retry_at), (None, None));
}

#[test]
fn a_long_tenant_hold_parks_and_a_short_one_is_waited_at_the_gate() {
    let held = |secs| Now {
        held_for: Some(Duration::from_secs(secs)),
        ..now()
    };
    let mut j = device_job();
    let back = handed_back(plan(&mut j, Event::Start, &policy(), &held(40)).action);
    assert_eq!(back.tier, Some(Duration::from_secs(32)));
    let mut j = device_job();
    assert!(matches!(
        plan(&mut j, Event::Start, &policy(), &held(3)).action,
        Action::Call(_)
    ));
}

#[test]
fn a_401_refreshes_the_token_once_then_pauses_without_spending_attempts() {
    let mut j = device_job();
    step(&mut j, Event::Start);
    let next = plan(&mut j, Event::Answered(reply(401, None)), &policy(), &now());
    assert_eq!(next.decision, Some(Decision::RefreshToken));
    assert!(matches!(next.action, Action::Call(_)));
    let next = plan(&mut j, Event::Answered(reply(401, None)), &policy(), &now());
    assert!(matches!(
        next.action,
        Action::Pause(PauseReason::Unauthorized)
    ));
    let back = handed_back(step(&mut j, Event::Interrupted));
    assert_eq!(
        back.carried.retry.attempts, 0,
        "credential refusals spend no attempt"
    );
    let mut j = device_job();
    step(&mut j, Event::Start);
    assert!(matches!(
        step(&mut j, Event::Answered(reply(403, None))),
        Action::Pause(PauseReason::Forbidden)
    ));
    let mut j = device_job();
    step(&mut j, Event::Start);
    assert!(matches!(
        step(&mut j, Event::NoToken),
        Action::Pause(PauseReason::NoToken)
    ));
}

#[test]
fn permanent_answers_fail_with_graphs_status() {
    for (status, want) in [
        (404, ErrorKind::DeviceNotFound),
        (400, ErrorKind::GraphRejected),
    ] {
        let mut j = device_job();
        step(&mut j, Event::Start);
        let outcome = finished(step(&mut j, Event::Answered(reply(status, None))));
        let error = outcome.error.unwrap();
        assert_eq!((error.kind, error.http_status), (want, Some(status)));
        assert_eq!(error.message, format!("Graph answered {status}"));
    }
}

#[test]
fn the_retry_budget_ends_in_retries_exhausted() {
    let mut j = device_job();
    step(&mut j, Event::Start);
    for _ in 1..5 {
        assert!(matches!(
            step(&mut j, Event::Answered(reply(503, None))),
            Action::Wait(_)
        ));
        step(&mut j, Event::Waited);
    }
    let outcome = finished(step(&mut j, Event::Answered(reply(503, None))));
    let error = outcome.error.unwrap();
    assert_eq!(
        (error.kind, outcome.attempts),
        (ErrorKind::RetriesExhausted, 5)
    );
    assert!(
        error
            .message
            .starts_with("retry budget spent after 5 call(s)"),
        "{}",
        error.message
    );
}

#[test]
fn a_settled_job_goes_back_rather_than_act_twice() {
    let mut j = device_job();
    step(&mut j, Event::Start);
    finished(step(&mut j, Event::Answered(reply(204, None))));
    handed_back(step(&mut j, Event::Answered(reply(204, None))));
}

#[test]
fn a_user_with_nothing_assigned_succeeds_and_says_so() {
    let (error, note) = outcome::verdict(Lookup::User("u@x"), &[]);
    assert_eq!(error, None);
    assert!(note.unwrap().contains("nothing to unassign"));
    let done = [DeviceOutcome::new(&id(A), None)];
    assert_eq!(outcome::verdict(Lookup::User("u@x"), &done), (None, None));
}

#[test]
fn a_partial_failure_fails_with_the_first_kind_and_every_detail() {
    let failure = Failure {
        http_status: Some(400),
        ..Failure::new(ErrorKind::GraphRejected, "nope")
    };
    let results = [
        DeviceOutcome::new(&id(A), None),
        DeviceOutcome::new(&id(B), Some(failure)),
    ];
    let (error, note) = outcome::verdict(Lookup::User("u@x"), &results);
    let error = error.unwrap();
    assert_eq!(
        (error.kind, error.http_status),
        (ErrorKind::GraphRejected, Some(400))
    );
    assert!(
        error.message.starts_with("1 of 2 device(s) failed"),
        "{}",
        error.message
    );
    assert!(
        error
            .message
            .contains(&format!("{B}: graph_rejected (nope)"))
    );
    assert_eq!(note, None);
    let long = Failure::new(ErrorKind::GraphRejected, "x".repeat(5000));
    let (error, _) = outcome::verdict(
        Lookup::User("u@x"),
        &[DeviceOutcome::new(&id(B), Some(long))],
    );
    assert_eq!(error.unwrap().message.chars().count(), MAX_SUMMARY + 1);
}

#[test]
fn tiers_fit_waits_and_round_paused_ones_up() {
    let p = policy();
    let tier = |ms| p.tier_for(Duration::from_millis(ms)).map(|t| t.as_secs());
    assert_eq!(
        (tier(3_999), tier(4_000), tier(15_999)),
        (None, Some(4), Some(8))
    );
    assert_eq!(tier(3_600_000), Some(64), "long waits chain");
    let at_least = |ms| p.tier_at_least(Duration::from_millis(ms)).as_secs();
    assert_eq!((at_least(0), at_least(4_000), at_least(4_001)), (4, 4, 8));
    assert_eq!(
        at_least(600_000),
        64,
        "the longest, when none is long enough"
    );
    assert!(!p.parks(Duration::from_secs(5)) && p.parks(Duration::from_millis(5001)));
    assert!(p.paused_wait(Duration::ZERO) >= p.park_after);
}
