//! Requests by serial number or user: the listing planner and the devices it finds.

use super::*;

fn list_url(action: Action) -> Url {
    match action {
        Action::Call(Call::List(url)) => url,
        other => panic!("expected a list call, got {other:?}"),
    }
}

#[test]
fn a_serial_is_looked_up_then_its_one_device_unassigned() {
    let mut j = job(Target::Serial("PF-3ABCDE-12".to_owned()));
    let url = list_url(step(&mut j, Event::Start));
    assert!(
        url.as_str()
            .contains("contains%28serialNumber%2C%273ABCDE%27%29"),
        "{url}"
    );
    let action = step(
        &mut j,
        Event::Answered(page(&[(A, "pf-3abcde-12"), (B, "PF-3ABCDE-1")], None)),
    );
    assert!(matches!(action, Action::Call(Call::Unassign(d)) if d == id(A)));
    let outcome = finished(step(&mut j, Event::Answered(reply(204, None))));
    assert_eq!(
        (outcome.device_id, kind_of(&outcome.devices)),
        (Some(id(A)), vec![None])
    );
    assert_eq!(outcome.attempts, 1, "reads are not attempts");
}

fn kind_of(devices: &Option<Vec<DeviceOutcome>>) -> Vec<Option<ErrorKind>> {
    let devices = devices.as_deref().unwrap_or_default();
    devices
        .iter()
        .map(|d| d.error.as_ref().map(|e| e.kind))
        .collect()
}

#[test]
fn a_serial_must_name_exactly_one_device() {
    let mut j = job(Target::Serial("S1".to_owned()));
    step(&mut j, Event::Start);
    let outcome = finished(step(&mut j, Event::Answered(page(&[], None))));
    assert_eq!(
        (kind(&outcome), outcome.devices),
        (Some(ErrorKind::DeviceNotFound), Some(vec![]))
    );
    let mut j = job(Target::Serial("S1".to_owned()));
    step(&mut j, Event::Start);
    let outcome = finished(step(
        &mut j,
        Event::Answered(page(&[(A, "S1"), (B, "s1")], None)),
    ));
    assert_eq!(kind(&outcome), Some(ErrorKind::AmbiguousDevice));
}

#[test]
fn a_refused_user_filter_becomes_a_scan_and_a_refused_serial_filter_fails() {
    let refused = || Reply {
        answer: Answer::Answered(Response {
            status: 400,
            error: Some(retry::GraphError {
                code: Some("BadRequest".into()),
                message: "no".into(),
                activity_id: None,
            }),
            ..Response::default()
        }),
        ..reply(400, None)
    };
    let mut j = job(Target::User("u@x".to_owned()));
    step(&mut j, Event::Start);
    let scan = list_url(step(&mut j, Event::Answered(refused())));
    assert_eq!(scan.query(), None, "every identity");
    let mut j = job(Target::Serial("S1".to_owned()));
    step(&mut j, Event::Start);
    let outcome = finished(step(&mut j, Event::Answered(refused())));
    let error = outcome.error.unwrap();
    assert_eq!(error.kind, ErrorKind::GraphRejected);
    assert!(
        error
            .message
            .starts_with("listing Autopilot devices: Graph answered 400")
    );
}

/// Each page has its own retry budget: four faults on page 1 and four on page 2 still list.
#[test]
fn pages_are_followed_each_with_a_budget_of_its_own() {
    let next = format!("{BASE}deviceManagement/windowsAutopilotDeviceIdentities?$skiptoken=2");
    let mut j = job(Target::User("u@x".to_owned()));
    step(&mut j, Event::Start);
    for page_reply in [page(&[(B, "u@x")], Some(&next)), page(&[(A, "U@X")], None)] {
        for _ in 0..4 {
            assert!(matches!(
                step(&mut j, Event::Answered(reply(503, None))),
                Action::Wait(_)
            ));
            step(&mut j, Event::Waited);
        }
        let action = step(&mut j, Event::Answered(page_reply));
        if let Action::Call(Call::List(url)) = &action {
            assert_eq!(url.as_str(), next);
        }
    }
    // Both found, unassigned in id order: A, then B.
    assert!(
        matches!(step(&mut j, Event::Answered(reply(204, None))), Action::Call(Call::Unassign(d)) if d == id(B))
    );
    let outcome = finished(step(&mut j, Event::Answered(reply(204, None))));
    assert_eq!(
        (outcome.attempts, kind_of(&outcome.devices)),
        (2, vec![None, None])
    );
}

#[test]
fn a_next_link_elsewhere_or_a_bad_page_fails_the_lookup() {
    for bad in [
        page(&[], Some("https://evil.example/beta/x")),
        page(&[("not-a-guid", "u@x")], None),
    ] {
        let mut j = job(Target::User("u@x".to_owned()));
        step(&mut j, Event::Start);
        let outcome = finished(step(&mut j, Event::Answered(bad)));
        assert_eq!(
            (kind(&outcome), outcome.devices),
            (Some(ErrorKind::GraphRejected), Some(vec![]))
        );
    }
}

/// Devices done in an earlier delivery are not redone; the one a hand-back interrupted keeps
/// the calls it spent; a later failure fails the request with every device's result.
#[test]
fn devices_done_are_skipped_and_a_partial_failure_is_summarised() {
    let carried = Carried {
        retry: RetryState {
            attempts: 3,
            ..RetryState::fresh(t0())
        },
        progress: Progress {
            done: vec![id(A)],
            device_calls: Some(2),
        },
    };
    let mut j = JobState::new(request(Target::User("u@x".to_owned())), carried, &policy());
    step(&mut j, Event::Start);
    let action = step(
        &mut j,
        Event::Answered(page(&[(A, "u@x"), (B, "u@x")], None)),
    );
    assert!(matches!(action, Action::Call(Call::Unassign(d)) if d == id(B)));
    step(&mut j, Event::Answered(reply(503, None)));
    let back = handed_back(step(&mut j, Event::Interrupted));
    assert_eq!(back.carried.progress.device_calls, Some(3), "2 carried + 1");
    assert_eq!(back.carried.progress.done, vec![id(A)]);

    let mut j = JobState::new(
        request(Target::User("u@x".to_owned())),
        back.carried,
        &policy(),
    );
    step(&mut j, Event::Start);
    step(
        &mut j,
        Event::Answered(page(&[(A, "u@x"), (B, "u@x")], None)),
    );
    let outcome = finished(step(&mut j, Event::Answered(reply(404, None))));
    assert_eq!(
        kind_of(&outcome.devices),
        vec![None, Some(ErrorKind::DeviceNotFound)]
    );
    assert!(
        outcome
            .error
            .unwrap()
            .message
            .starts_with("1 of 2 device(s) failed")
    );
    assert_eq!(outcome.attempts, 5);
}
