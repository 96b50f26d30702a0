//! Replicas share one tenant's budget through the control exchange on the real broker: a
//! Retry-After heard by one replica holds the other, a 429's decrease reaches the other, and a
//! replica cut off from the broker runs on its own and rejoins when it is back. Two workers,
//! each with its own connections, gates and control plane, serve one queue.

use crate::common;

use std::time::Duration;

use common::{Env, Worker, device, eventually, relay::Relay};
use unassign_worker::{config::Settings, sim::Scripted};

const WAIT: Duration = Duration::from_secs(30);

/// Worker A (in `env`) and worker B on the same queue and control exchange.
async fn pair(test: &str, tweak: impl Fn(&mut Settings)) -> (Env, Worker) {
    let tweak = |s: &mut Settings| {
        // Quick heartbeats: membership settles in a second, not three.
        s.replicas.heartbeat_ms = 200;
        tweak(s);
    };
    let env = Env::start_with(test, common::sim_options(), tweak).await;
    let mut settings = env.settings().clone();
    tweak(&mut settings);
    let b = Worker::start(settings).await;
    b.wait_ready().await;
    (env, b)
}

async fn live_becomes(worker: &Worker, n: f64) {
    eventually("live replicas", WAIT, || async {
        (worker.metric("unassign_replicas_live").await == n).then_some(())
    })
    .await;
}

async fn both_metric(a: &Worker, b: &Worker, sample: &str) -> f64 {
    a.metric(sample).await + b.metric(sample).await
}

fn throttled(retry_after: &str) -> Scripted {
    Scripted {
        status: 429,
        retry_after: Some(retry_after.to_owned()),
        delay_ms: 0,
    }
}

#[tokio::test]
async fn a_retry_after_heard_by_one_replica_holds_the_other() {
    let (env, b) = pair("rep_hold", |s| s.worker.concurrency = 1.try_into().unwrap()).await;
    live_becomes(&env.worker, 2.0).await;
    live_becomes(&b, 2.0).await;
    env.sim.push_script([throttled("3.000")]);
    env.broker.publish_request("rep_hold-0", &device()).await;
    // Whoever got the 429 told the other, which is held as well.
    eventually("the hold reached the other replica", WAIT, || async {
        let received = both_metric(&env.worker, &b, "unassign_replica_holds_received_total").await;
        let held = both_metric(&env.worker, &b, "unassign_throttled").await;
        (received == 1.0 && held == 2.0).then_some(())
    })
    .await;
    for i in 1..7 {
        env.broker
            .publish_request(&format!("rep_hold-{i}"), &device())
            .await;
    }
    let events = env.events.wait_for(7, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    let stats = env.sim.stats();
    assert_eq!(stats.responses_by_status.get(&429), Some(&1));
    assert_eq!(
        (stats.early_calls, stats.late_calls),
        (0, 0),
        "no replica called while the tenant was told to wait"
    );
    assert_eq!(env.dead.len(), 0);
    b.stop().await;
    live_becomes(&env.worker, 1.0).await;
    env.finish().await;
}

#[tokio::test]
async fn a_decrease_in_one_replica_is_a_decrease_in_both() {
    let (env, b) = pair("rep_congestion", |_| {}).await;
    live_becomes(&env.worker, 2.0).await;
    live_becomes(&b, 2.0).await;
    let shared = "unassign_tenant_shared_budget_per_second{budget=\"writes\"}";
    let ceiling = env.settings().graph.max_requests_per_second.get();
    assert_eq!(env.worker.metric(shared).await, ceiling);
    env.sim.push_script([throttled("0.200")]);
    env.broker
        .publish_request("rep_congestion", &device())
        .await;
    env.events.wait_for(1, WAIT).await;
    let (a_rate, b_rate) = eventually("both budgets decreased", WAIT, || async {
        let (a, b) = (env.worker.metric(shared).await, b.metric(shared).await);
        (a < ceiling && b < ceiling).then_some((a, b))
    })
    .await;
    assert_eq!(a_rate, b_rate, "one shared budget");
    // Each replica sends half of it.
    let share = env.worker.metric("unassign_rate_limit_per_second").await;
    assert!((share - a_rate / 2.0).abs() < 1e-9, "{share} of {a_rate}");
    b.stop().await;
    env.finish().await;
}

#[tokio::test]
async fn a_replica_cut_off_from_the_broker_runs_alone_and_rejoins() {
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let behind_relay = format!("amqp://guest:guest@{}/%2f", relay.addr);
    let env = Env::start_with("rep_cut", common::sim_options(), |s| {
        s.replicas.heartbeat_ms = 200;
    })
    .await;
    let mut settings = env.settings().clone();
    settings.amqp.url = behind_relay.parse().unwrap();
    let b = Worker::start(settings).await;
    b.wait_ready().await;
    live_becomes(&env.worker, 2.0).await;
    live_becomes(&b, 2.0).await;
    relay.down();
    // Each side is on its own within a few heartbeats: the whole budget, no stall.
    live_becomes(&env.worker, 1.0).await;
    live_becomes(&b, 1.0).await;
    let connected = "unassign_replica_control_connected";
    assert_eq!(b.metric(connected).await, 0.0);
    let share = "unassign_rate_limit_per_second";
    let shared = "unassign_tenant_shared_budget_per_second{budget=\"writes\"}";
    assert_eq!(
        env.worker.metric(share).await,
        env.worker.metric(shared).await
    );
    for i in 0..3 {
        env.broker
            .publish_request(&format!("rep_cut-{i}"), &device())
            .await;
    }
    let events = env.events.wait_for(3, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    relay.up();
    live_becomes(&env.worker, 2.0).await;
    live_becomes(&b, 2.0).await;
    assert_eq!(b.metric(connected).await, 1.0);
    b.stop().await;
    env.finish().await;
}
