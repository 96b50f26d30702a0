//! Long retry waits go through the delay queues: they hold no delivery, survive a restart with
//! their attempt count and budgets intact, and a throttle burst makes every job wait on one gate.

use crate::common;

use std::time::{Duration, Instant};

use common::{Broker, Collector, Worker, device, eventually};
use unassign_worker::{
    config::Settings,
    sim::{Scripted, Sim, SimOptions},
};

const WAIT: Duration = Duration::from_secs(30);

fn answer(status: u16, retry_after: &str) -> Scripted {
    Scripted {
        status,
        retry_after: Some(retry_after.to_owned()),
        delay_ms: 0,
    }
}

/// Simulator, broker objects and collectors, with waits over 1 s parked in the 2 s / 4 s tiers.
async fn start(
    test: &str,
    tweak: impl FnOnce(&mut Settings),
) -> (Sim, Broker, Collector, Collector) {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let mut settings = common::settings(&sim, &common::prefix(test));
    settings.retry.park_after = std::time::Duration::from_secs(1);
    settings.retry.max_delay = std::time::Duration::from_secs(30);
    tweak(&mut settings);
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let dead = broker.collect(&settings.amqp.dead_letter_queue).await;
    (sim, broker, events, dead)
}

#[tokio::test]
async fn a_long_retry_is_parked_and_survives_a_worker_restart() {
    let (sim, broker, events, dead) = start("parked", |_| {}).await;
    let settings = broker.settings.clone();
    sim.push_script([answer(503, "3")]);
    let worker = Worker::start(settings.clone()).await;
    broker.publish_request("parked-1", &device()).await;
    eventually("the first call", WAIT, || async {
        (sim.stats().action_calls == 1).then_some(())
    })
    .await;
    let throttled_at = Instant::now();
    let tier = settings.amqp.tier_queue(2);
    eventually("the request in the 2 s delay queue", WAIT, || async {
        (broker.depth(&tier).await == 1).then_some(())
    })
    .await;
    // The worker holds nothing while the request waits: stopping it is instant and loses nothing.
    worker.stop().await;
    let worker = Worker::start(settings).await;
    let event = events.wait_for(1, WAIT).await[0].event();
    let waited = throttled_at.elapsed();
    assert_eq!(
        (event.data.outcome.as_str(), event.data.attempts),
        ("succeeded", 2),
        "attempts survive"
    );
    assert_eq!(sim.stats().early_calls, 0, "no call before the Retry-After");
    assert!(
        waited < Duration::from_secs(3) + Duration::from_millis(1500),
        "delay precision: {waited:?}"
    );
    assert_ne!(event.data.received_at, event.data.completed_at);
    assert_eq!(dead.len(), 0);
    worker.stop().await;
    broker.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn max_elapsed_holds_across_a_restart() {
    let (sim, broker, events, _dead) = start("elapsed", |s| {
        s.retry.max_elapsed = std::time::Duration::from_secs(4)
    })
    .await;
    let settings = broker.settings.clone();
    sim.push_script([answer(503, "2.5"), answer(503, "2.5")]);
    let worker = Worker::start(settings.clone()).await;
    broker.publish_request("elapsed-1", &device()).await;
    let tier = settings.amqp.tier_queue(2);
    eventually("the request in the delay queue", WAIT, || async {
        (broker.depth(&tier).await == 1).then_some(())
    })
    .await;
    worker.stop().await;
    let worker = Worker::start(settings).await;
    // 2.5 s spent, the next Retry-After would end at 5 s > max_elapsed 4 s: only a worker that
    // remembers when the request was first received can know.
    let event = events.wait_for(1, WAIT).await[0].event();
    let error = event.data.error.expect("failed");
    assert_eq!(
        (error.kind.as_str(), event.data.attempts),
        ("retries_exhausted", 2)
    );
    assert_eq!(sim.stats().action_calls, 2);
    worker.stop().await;
    broker.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_throttle_burst_holds_every_job_on_one_gate() {
    // 5 calls per second per tenant; the worker starts at Intune's 5/s and probes upwards.
    let options = SimOptions {
        throttle_limit: 5,
        throttle_window_ms: 1000,
        ..common::sim_options()
    };
    let sim = Sim::start(options).await.unwrap();
    let mut settings = common::settings(&sim, &common::prefix("burst"));
    settings.worker.concurrency = std::num::NonZeroUsize::new(8).unwrap();
    settings.graph.max_requests_per_second = 0.0.try_into().unwrap();
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    for i in 0..40 {
        broker
            .publish_request(&format!("burst-{i}"), &device())
            .await;
    }
    let worker = Worker::start(settings).await;
    let all = events.wait_for(40, Duration::from_secs(60)).await;
    assert!(all.iter().all(|e| e.event().data.outcome == "succeeded"));
    let stats = sim.stats();
    assert!(
        stats.responses_by_status.get(&429).copied().unwrap_or(0) >= 1,
        "the burst was throttled"
    );
    // `late_calls`, not `early_calls`: a call the gate let out just before the 429 arrives
    // after it, through no fault of the worker's; one sent once the worker had heard is late.
    assert_eq!(
        stats.late_calls, 0,
        "a call arrived well inside a Retry-After the tenant had been given"
    );
    let rate = worker.metric("unassign_rate_limit_per_second").await;
    assert!(
        rate > 0.0 && rate < 10.0,
        "the budget adapted to the tenant's limit: {rate}"
    );
    worker.stop().await;
    broker.cleanup().await;
    sim.shutdown().await;
}
