//! A lookup's Graph reads, budgeted and throttled apart from the writes: their own rate budget
//! with their 429s retried, a retry budget per page, a write's Retry-After holding the reads too,
//! `worker.concurrency` bounding lookups and actions together, and a 403 on a lookup pausing the
//! worker instead of dead-lettering.

use unassign_worker::sim::Stats;

use super::*;

fn assert_some_reads_throttled(stats: &Stats) {
    let throttled = stats.list_responses_by_status.get(&429);
    assert!(throttled.is_some_and(|n| *n > 0), "{stats:?}");
}

/// Ann's six devices, listed one a page.
fn six_devices_a_page_each() -> SimOptions {
    let users = (1..=6).map(|n| Device::new(&id(n), &format!("SN{n}"), ANN));
    SimOptions {
        page_size: 1,
        ..sim_with(users.collect())
    }
}

#[tokio::test]
async fn reads_have_their_own_budget_and_their_429s_are_retried() {
    let env = Env::start_with("read_budget", six_devices_a_page_each(), |s| {
        s.graph.max_reads_per_second = 5.0.try_into().unwrap();
    })
    .await;
    env.sim.update(|b| b.lagging_unassign = true);
    publish(
        &env,
        json!({"request_id": "paced", "user_principal_name": ANN}),
    )
    .await;
    let event = event_of(&env, "paced").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    let offsets = env.sim.stats().list_call_offsets_ms;
    assert_eq!(offsets.len(), 6);
    let span = offsets[5] - offsets[0];
    assert!(
        span >= 950,
        "six reads at 5/s span at least a second: {offsets:?}"
    );
    assert_eq!(
        env.worker
            .metric("unassign_read_rate_limit_per_second")
            .await,
        5.0
    );
    assert_eq!(
        env.worker.metric("unassign_rate_limit_per_second").await,
        1000.0,
        "the write budget is untouched by reads"
    );

    // Graph throttles reads: retried after the Retry-After, never dead-lettered, and no call
    // of either kind goes out before it.
    env.sim.reset_stats();
    env.sim.update(|b| {
        b.read_throttle_limit = 2;
        b.throttle_window_ms = 1000;
    });
    publish(
        &env,
        json!({"request_id": "throttled", "user_principal_name": ANN}),
    )
    .await;
    let event = event_of(&env, "throttled").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    let stats = env.sim.stats();
    assert_some_reads_throttled(&stats);
    assert_eq!(stats.list_responses_by_status.get(&200), Some(&6));
    assert_eq!((stats.early_calls, stats.early_reads), (0, 0), "{stats:?}");
    assert!(
        env.worker
            .metric("unassign_retries_total{reason=\"throttled\"}")
            .await
            > 0.0
    );
    assert!(env.dead.all().is_empty());
    env.finish().await;
}

/// Issue 11, item 6: each page of a lookup has its own retry budget. With a budget of three
/// calls, a throttled fourth page used to be `retries_exhausted` at once, its budget spent by
/// the pages read before it.
#[tokio::test]
async fn each_page_of_a_lookup_has_its_own_retry_budget() {
    let env = Env::start_with("page_budget", six_devices_a_page_each(), |s| {
        s.graph.max_reads_per_second = 1000.0.try_into().unwrap();
        s.retry.max_attempts = std::num::NonZeroU32::new(3).unwrap();
    })
    .await;
    env.sim.update(|b| {
        b.lagging_unassign = true;
        b.read_throttle_limit = 3;
        b.throttle_window_ms = 500;
    });
    publish(
        &env,
        json!({"request_id": "pages", "user_principal_name": ANN}),
    )
    .await;
    let event = event_of(&env, "pages").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(device_results(&event), ok(&[1, 2, 3, 4, 5, 6]));
    // A page past the third was throttled, and retried.
    assert_some_reads_throttled(&env.sim.stats());
    assert!(env.dead.all().is_empty());
    env.finish().await;
}

#[tokio::test]
async fn a_retry_after_on_a_write_holds_the_reads_too() {
    let env = Env::start_with("hold_reads", lagging_user(1), |_| {}).await;
    env.sim.push_script([Scripted {
        status: 429,
        retry_after: Some("2".into()),
        delay_ms: 0,
    }]);
    publish(&env, json!({"request_id": "w", "device_id": id(1)})).await;
    eventually("the 429", WAIT, || async {
        (env.sim.stats().action_calls == 1).then_some(())
    })
    .await;
    // Within the Retry-After: the lookup must wait it out like any call to the tenant.
    publish(&env, json!({"request_id": "r", "user_principal_name": ANN})).await;
    for request_id in ["w", "r"] {
        let event = event_of(&env, request_id).await;
        assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    }
    let stats = env.sim.stats();
    assert_eq!(stats.list_calls, 1);
    assert_eq!((stats.early_calls, stats.early_reads), (0, 0), "{stats:?}");
    env.finish().await;
}

#[tokio::test]
async fn worker_concurrency_bounds_lookups_and_actions_together() {
    let devices = (1..=8)
        .map(|n| Device::new(&id(n), &format!("SN{n}"), &format!("u{n}@contoso.com")))
        .collect();
    let sim = SimOptions {
        latency_ms: 100,
        ..sim_with(devices)
    };
    let env = Env::start_with("lookup_concurrency", sim, |s| {
        s.worker.concurrency = std::num::NonZeroUsize::new(2).unwrap();
    })
    .await;
    for n in 1..=8 {
        let body = json!({"request_id": format!("c-{n}"), "user_principal_name": format!("u{n}@contoso.com")});
        publish(&env, body).await;
    }
    let events = env.events.wait_for(8, WAIT).await;
    assert!(
        events
            .iter()
            .all(|e| e.json()["type"] == "autopilot.unassign.succeeded")
    );
    let stats = env.sim.stats();
    assert_eq!((stats.list_calls, stats.action_calls), (8, 8));
    assert_eq!(stats.max_in_flight, 2, "{stats:?}");
    env.finish().await;
}

#[tokio::test]
async fn a_403_on_a_lookup_pauses_instead_of_dead_lettering() {
    let env = Env::start_with("read_forbidden", lagging_user(1), |_| {}).await;
    env.sim.update(|b| b.forbid = true);
    publish(
        &env,
        json!({"request_id": "denied", "user_principal_name": ANN}),
    )
    .await;
    eventually("/readyz 503 for credentials", WAIT, || async {
        (env.worker.get("/readyz").await.0 == 503).then_some(())
    })
    .await;
    env.sim.update(|b| b.forbid = false);
    let event = event_of(&env, "denied").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(device_results(&event), ok(&[1]));
    assert!(env.dead.all().is_empty(), "paused, never dead-lettered");
    env.finish().await;
}
