//! Whatever Graph answers and whatever the world does meanwhile, the planner never panics, never
//! calls past a budget, never waits past the clamp, and its outcome never claims a call that was
//! not made.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::retry::MAX_RETRY_AFTER;

/// What the executor brings back for an action.
#[derive(Debug, Clone)]
enum Fate {
    /// Graph's status, a Retry-After, and which body a 200 carries.
    Answer(u16, Option<String>, u8),
    NoToken,
    Interrupted,
}

/// The world at one step: a tenant hold, a pause, a stopping session, the jitter, time passing.
type World = (Option<u64>, Option<u64>, bool, f64, u64);

fn fate() -> impl Strategy<Value = Fate> {
    let status = prop_oneof![
        Just(200u16),
        Just(204),
        Just(429),
        Just(503),
        Just(401),
        Just(403),
        Just(404),
        Just(400),
        any::<u16>()
    ];
    let retry_after =
        proptest::option::of(prop_oneof!["[0-9]{1,6}(\\.[0-9]{1,3})?", any::<String>()]);
    prop_oneof![
        8 => (status, retry_after, 0..4u8).prop_map(|(s, ra, b)| Fate::Answer(s, ra, b)),
        1 => Just(Fate::NoToken),
        1 => Just(Fate::Interrupted),
    ]
}

fn world() -> impl Strategy<Value = World> {
    (
        proptest::option::of(0..100u64),
        proptest::option::of(0..100u64),
        proptest::bool::weighted(0.05),
        0.0..1.0f64,
        0..5_000u64,
    )
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Device(id(A))),
        Just(Target::Serial("S1".to_owned())),
        Just(Target::User("u@x".to_owned())),
    ]
}

fn body(kind: u8) -> Vec<u8> {
    let next = format!("{BASE}deviceManagement/windowsAutopilotDeviceIdentities?$skiptoken=1");
    let reply = match kind {
        0 => page(&[(A, "S1")], None),
        1 => page(&[(A, "u@x"), (B, "u@x")], Some(&next)),
        2 => page(&[], None),
        _ => return b"garbage".to_vec(),
    };
    reply.response().map(|r| r.body.clone()).unwrap_or_default()
}

proptest! {
    #[test]
    fn the_planner_keeps_its_promises(
        target in target(),
        max_attempts in 1..6u32,
        park_after in 0..10u64,
        deadline in proptest::option::of(0..600u64),
        steps in proptest::collection::vec((fate(), world()), 1..120),
    ) {
        let policy = Policy {
            retry: retry::Policy { max_attempts, ..policy().retry },
            park_after: Duration::from_secs(park_after),
            ..policy()
        };
        let not_after = deadline.map(|s| t0() + Duration::from_secs(s));
        let mut job = JobState::new(Request { not_after, ..request(target) }, Carried::fresh(t0()), &policy);
        let mut at = t0();
        let mut event = Event::Start;
        let mut spent = 0u32;
        let mut per_call: HashMap<String, u32> = HashMap::new();
        let mut sent_ids: HashSet<String> = HashSet::new();
        let mut unassigned: HashSet<String> = HashSet::new();
        for (n, (fate, (held, paused, stopping, jitter, pass))) in steps.into_iter().enumerate() {
            let now = Now {
                at,
                jitter,
                held_for: held.map(Duration::from_secs),
                paused_for: paused.map(Duration::from_secs),
                stopping,
            };
            event = match plan(&mut job, event, &policy, &now).action {
                Action::Call(call) => match fate {
                    Fate::Answer(status, retry_after, kind) => {
                        let reply = Reply {
                            client_request_id: format!("c-{n}"),
                            answer: Answer::Answered(Response {
                                status,
                                retry_after,
                                body: if status == 200 { body(kind) } else { Vec::new() },
                                ..Response::default()
                            }),
                        };
                        if retry::spends_attempt(&reply.answer) {
                            let calls = per_call.entry(format!("{call:?}")).or_default();
                            *calls += 1;
                            prop_assert!(*calls <= max_attempts, "{call:?} called {calls} times");
                            if let Call::Unassign(device) = &call {
                                spent += 1;
                                if (200..300).contains(&status) {
                                    unassigned.insert(device.to_string());
                                }
                            }
                        }
                        sent_ids.insert(reply.client_request_id.clone());
                        Event::Answered(reply)
                    }
                    Fate::NoToken => Event::NoToken,
                    Fate::Interrupted => Event::Interrupted,
                },
                Action::Wait(delay) => {
                    prop_assert!(!policy.parks(delay), "{delay:?} should have been parked");
                    prop_assert!(delay <= MAX_RETRY_AFTER.max(policy.retry.max_delay));
                    at = at_most_after(at, delay);
                    match fate {
                        Fate::Interrupted => Event::Interrupted,
                        _ => Event::Waited,
                    }
                }
                Action::Pause(_) => Event::Interrupted,
                Action::Settle(Settlement::Finish(outcome)) => {
                    prop_assert_eq!(outcome.attempts, spent);
                    if let Some(id) = &outcome.client_request_id {
                        prop_assert!(sent_ids.contains(id), "{id} was never sent");
                    }
                    for done in outcome.progress().done {
                        prop_assert!(unassigned.contains(&done.to_string()), "{done} claimed, never unassigned");
                    }
                    return Ok(());
                }
                Action::Settle(Settlement::HandBack(back)) => {
                    prop_assert_eq!(back.carried.retry.attempts, spent);
                    prop_assert!(back.tier.is_none() || back.carried.retry.retry_at.is_some());
                    for done in &back.carried.progress.done {
                        prop_assert!(unassigned.contains(&done.to_string()), "{done} claimed, never unassigned");
                    }
                    return Ok(());
                }
            };
            at = at_most_after(at, Duration::from_millis(pass));
        }
    }
}
