//! Transient trouble is retried — honouring every Retry-After form, tenant-wide — until the
//! budgets say stop; only then is a request dead-lettered.

use crate::common;

use std::time::{Duration, SystemTime};

use common::{Env, device, eventually};
use unassign_worker::{contract::header_int, sim::Scripted};

const WAIT: Duration = Duration::from_secs(30);

fn answer(status: u16, retry_after: Option<String>) -> Scripted {
    Scripted {
        status,
        retry_after,
        delay_ms: 0,
    }
}

async fn throttled_once_then_succeeds(test: &str, retry_after: impl Fn() -> String) {
    // One call in flight at a time, so every call after the 429 was sent knowing of it (the
    // simulator cannot tell a call already on the wire from an early one). The gate still has
    // to hold the other jobs: each would call the moment the slot frees.
    let env = Env::start_with(test, common::sim_options(), |s| {
        s.worker.concurrency = std::num::NonZeroUsize::new(1).unwrap()
    })
    .await;
    // The first call of a burst is throttled; every other call to the tenant must wait too.
    env.sim.push_script([answer(429, Some(retry_after()))]);
    for i in 0..5 {
        env.broker
            .publish_request(&format!("{test}-{i}"), &device())
            .await;
    }
    let events = env.events.wait_for(5, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    let stats = env.sim.stats();
    assert_eq!(
        stats.early_calls, 0,
        "a call arrived before the Retry-After had passed"
    );
    assert_eq!(stats.responses_by_status.get(&429), Some(&1));
    assert_eq!(env.dead.len(), 0);
    eventually("retry metric", WAIT, || async {
        (env.worker
            .metric("unassign_retries_total{reason=\"throttled\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    env.finish().await;
}

#[tokio::test]
async fn fractional_retry_after_holds_the_whole_tenant() {
    throttled_once_then_succeeds("ra_fraction", || "1.250".to_owned()).await;
}

#[tokio::test]
async fn integer_retry_after() {
    throttled_once_then_succeeds("ra_integer", || "1".to_owned()).await;
}

#[tokio::test]
async fn http_date_retry_after() {
    throttled_once_then_succeeds("ra_date", || {
        httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2))
    })
    .await;
}

#[tokio::test]
async fn throttling_without_retry_after_backs_off() {
    let env = Env::start("ra_absent").await;
    env.sim.push_script([answer(429, None), answer(429, None)]);
    env.broker.publish_request("absent-1", &device()).await;
    let event = env.events.wait_for(1, WAIT).await[0].event();
    assert_eq!(
        (event.data.outcome.as_str(), event.data.attempts),
        ("succeeded", 3)
    );
    env.finish().await;
}

#[tokio::test]
async fn server_error_burst_then_success() {
    let env = Env::start("burst503").await;
    env.sim
        .push_script([answer(503, None), answer(500, None), answer(502, None)]);
    env.broker.publish_request("burst-1", &device()).await;
    let event = env.events.wait_for(1, WAIT).await[0].event();
    assert_eq!(
        (event.data.outcome.as_str(), event.data.attempts),
        ("succeeded", 4)
    );
    eventually("retry metric", WAIT, || async {
        (env.worker
            .metric("unassign_retries_total{reason=\"server_error\"}")
            .await
            == 3.0)
            .then_some(())
    })
    .await;
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}

#[tokio::test]
async fn a_slow_graph_is_retried_not_waited_on_forever() {
    let env = Env::start_with("timeout", common::sim_options(), |s| {
        s.graph.timeout = std::time::Duration::from_secs(1)
    })
    .await;
    env.sim.push_script([Scripted {
        status: 204,
        retry_after: None,
        delay_ms: 3000,
    }]);
    env.broker.publish_request("slow-1", &device()).await;
    let event = env.events.wait_for(1, WAIT).await[0].event();
    assert_eq!(
        (event.data.outcome.as_str(), event.data.attempts),
        ("succeeded", 2)
    );
    assert_eq!(
        env.worker
            .metric("unassign_graph_requests_total{status=\"timeout\"}")
            .await,
        1.0
    );
    env.finish().await;
}

#[tokio::test]
async fn retries_exhausted_is_dead_lettered() {
    let env = Env::start_with("exhausted", common::sim_options(), |s| {
        s.retry.max_attempts = std::num::NonZeroU32::new(3).unwrap()
    })
    .await;
    env.sim.push_script((0..5).map(|_| answer(503, None)));
    env.broker.publish_request("tired-1", &device()).await;
    let event = env.events.wait_for(1, WAIT).await[0].event();
    let error = event.data.error.as_ref().expect("failed");
    assert_eq!(error.kind.as_str(), "retries_exhausted");
    assert_eq!(error.http_status, Some(503));
    assert_eq!(event.data.attempts, 3);
    let dead = &env.dead.wait_for(1, WAIT).await[0];
    assert_eq!(header_int(&dead.header(), "x-unassign-attempts"), Some(3));
    assert_eq!(
        header_int(&dead.header(), "x-unassign-http-status"),
        Some(503)
    );
    assert_eq!(env.sim.stats().action_calls, 3);
    env.finish().await;
}

#[tokio::test]
async fn a_passed_deadline_fails_without_calling_graph() {
    let env = Env::start("deadline").await;
    let body = serde_json::json!({"request_id": "late-1", "device_id": device(), "not_after": "2020-01-01T00:00:00Z"});
    env.broker
        .publish(body.to_string().as_bytes(), Default::default())
        .await;
    let event = env.events.wait_for(1, WAIT).await[0].event();
    assert_eq!(event.data.error.unwrap().kind.as_str(), "deadline_exceeded");
    assert_eq!(event.data.attempts, 0);
    assert_eq!(env.sim.stats().action_calls, 0);
    env.dead.wait_for(1, WAIT).await;
    env.finish().await;
}

#[tokio::test]
async fn a_deadline_during_retries_stops_them() {
    let env = Env::start("deadline2").await;
    env.sim.push_script([answer(503, Some("30".to_owned()))]);
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(10);
    let not_after = not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let body =
        serde_json::json!({"request_id": "late-2", "device_id": device(), "not_after": not_after});
    env.broker
        .publish(body.to_string().as_bytes(), Default::default())
        .await;
    let event = env.events.wait_for(1, WAIT).await[0].event();
    let error = event.data.error.unwrap();
    assert_eq!(
        (error.kind.as_str(), error.http_status),
        ("deadline_exceeded", Some(503))
    );
    assert_eq!(event.data.attempts, 1);
    env.finish().await;
}
