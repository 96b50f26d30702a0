//! SIGTERM: the worker drains within its grace period and loses nothing; a shutdown that hangs is
//! ended by the watchdog with a non-zero exit; jobs waiting out a Retry-After are handed back at
//! once with what they still owe (once the calls in flight have answered), and the next worker
//! makes no call before the hold ends.

use std::collections::BTreeSet;

use unassign_worker::sim::Scripted;

use super::*;
use crate::common::relay::Relay;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_within_the_grace_period_and_loses_nothing() {
    let sim_options = unassign_worker::sim::SimOptions {
        latency_ms: 300,
        ..common::sim_options()
    };
    let sim = Sim::start(sim_options).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("sigterm"));
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let mut vars = env_for(&sim, &settings);
    vars.push(("UNASSIGN__WORKER__SHUTDOWN_GRACE_SECS".into(), "5".into()));
    vars.push(("UNASSIGN__WORKER__CONCURRENCY".into(), "4".into()));
    let ids: Vec<String> = (0..60).map(|i| format!("term-{i}")).collect();
    for id in &ids {
        broker.publish_request(id, &device()).await;
    }
    let child = spawn_worker(&vars);
    events.wait_for(4, WAIT).await;
    sigterm(&child);
    let (code, took, logs) = wait_exit(child, Duration::from_secs(10)).await;
    assert_eq!(code, 0, "{logs}");
    assert!(
        took < Duration::from_secs(10),
        "exit within grace + 5 s, took {took:?}"
    );

    // Every request has an outcome event or is back in the queue.
    let queued = drain_request_ids(&broker, &settings.amqp.queue).await;
    let done: BTreeSet<String> = events
        .all()
        .iter()
        .map(|e| e.event().data.request_id)
        .collect();
    let accounted: BTreeSet<String> = done.iter().cloned().chain(queued.iter().cloned()).collect();
    let missing: Vec<_> = ids.iter().filter(|id| !accounted.contains(*id)).collect();
    assert!(missing.is_empty(), "lost on shutdown: {missing:?}");
    assert!(
        !queued.is_empty(),
        "the test should interrupt work in progress"
    );
    broker.cleanup().await;
    sim.shutdown().await;
}

/// A shutdown that hangs (here: the broker link goes silent, so the consumer's cancel is never
/// answered) is ended by the watchdog after the grace period — with a non-zero exit code, since
/// it was not a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_the_watchdog_forces_exits_non_zero() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("forced"));
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let mut vars = env_for(&sim, &settings);
    vars.retain(|(k, _)| k != "AMQP_URL");
    vars.extend([
        (
            "AMQP_URL".into(),
            format!("amqp://guest:guest@{}/%2f", relay.addr),
        ),
        ("UNASSIGN__WORKER__SHUTDOWN_GRACE_SECS".into(), "1".into()),
        // Heartbeats must not notice the silent link before the watchdog fires.
        ("UNASSIGN__AMQP__HEARTBEAT_SECS".into(), "60".into()),
    ]);
    let child = spawn_worker(&vars);
    broker.publish_request("forced-1", &device()).await;
    events.wait_for(1, WAIT).await;
    // The consume connection and the replicas' control connection both go through it.
    assert!(
        relay.stall() >= 1,
        "the worker's connections went through the relay"
    );
    // Timed from before the signal is sent: the worker's clock starts when it arrives, later.
    let signalled = Instant::now();
    sigterm(&child);
    let (code, _, logs) = wait_exit(child, Duration::from_secs(15)).await;
    let took = signalled.elapsed();
    assert_eq!(code, 1, "a forced exit is not a clean one: {logs}");
    assert!(logs.contains("grace period exceeded"), "{logs}");
    assert!(
        took >= Duration::from_secs(5),
        "after grace + 4 s, took {took:?}"
    );
    broker.cleanup().await;
    sim.shutdown().await;
}

/// Six calls in flight at once all get a 429, one with `Retry-After: 4` and five with 2: every
/// job then waits in the process (waits under `retry.park_after_secs` are not parked), all until
/// the tenant's hold ends 4 s on. SIGTERM must hand them back at once with what they owe — not
/// wait it out, not drop them — and the next worker must not call before the hold ends, although
/// only the old process had learnt of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_throttled_hands_every_waiting_job_back() {
    // Answered after 200 ms, so that every call is on its way before the first 429 is in
    // (calls are admitted a millisecond apart, and a loopback answer can be quicker).
    let answers = ["4", "2", "2", "2", "2", "2"].map(|seconds| (seconds, 200));
    sigterm_while_throttled("term-throttled", &answers).await;
}

/// Two calls go out together: one is answered 429 `Retry-After: 2` after 200 ms, the other 429
/// `Retry-After: 4` after 1.5 s. A SIGTERM in between must not let the waiting job leave before
/// that second answer is in, or it would carry too short a wait. (Answered at once, the first
/// 429 could hold the second call back before it went out: calls are admitted a millisecond
/// apart, after the token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_in_flight_answer_before_handing_waits_back() {
    sigterm_while_throttled("term-inflight", &[("2", 200), ("4", 1500)]).await;
}

/// One job per `(Retry-After, answer delay in ms)`, each answered so; SIGTERM once every call
/// has reached graph-sim; then a second worker finishes them all.
async fn sigterm_while_throttled(test: &str, answers: &[(&str, u64)]) {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    sim.push_script(answers.iter().map(|(seconds, delay_ms)| Scripted {
        status: 429,
        retry_after: Some((*seconds).into()),
        delay_ms: *delay_ms,
    }));
    let settings = common::settings(&sim, &common::prefix(test));
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let mut vars = env_for(&sim, &settings);
    vars.push(("UNASSIGN__WORKER__SHUTDOWN_GRACE_SECS".into(), "20".into()));
    let jobs = answers.len();
    for i in 0..jobs {
        broker
            .publish_request(&format!("held-{i}"), &device())
            .await;
    }
    let child = spawn_worker(&vars);
    eventually("every call to arrive", WAIT, || async {
        (sim.stats().action_calls == jobs as u64).then_some(())
    })
    .await;
    sigterm(&child);
    let (code, took, first_logs) = wait_exit(child, Duration::from_secs(25)).await;
    assert_eq!(code, 0, "{first_logs}");
    assert!(
        took < Duration::from_secs(3),
        "held jobs are handed back, not waited out: exit took {took:?}"
    );
    assert_eq!(events.len(), 0, "nothing was finished");
    let depth = broker.depth(&settings.amqp.queue).await;
    assert_eq!(depth as usize, jobs, "every job is back");

    // Calls already on their way when the first 429 arrived count as early at the simulator;
    // the new worker must add none. It counts the calls the first one made.
    let early = sim.stats().early_calls;
    let child = spawn_worker(&vars);
    let done = events.wait_for(jobs, WAIT).await;
    assert!(done.iter().all(|e| e.event().data.error.is_none()));
    let attempts: u32 = done.iter().map(|e| e.event().data.attempts).sum();
    assert_eq!(
        u64::from(attempts),
        sim.stats().action_calls,
        "attempts count the first worker's calls too"
    );
    sigterm(&child);
    let (code, _, logs) = wait_exit(child, WAIT).await;
    assert_eq!(code, 0);
    assert_eq!(
        sim.stats().early_calls,
        early,
        "no call before the Retry-After:\n{first_logs}\n{logs}"
    );
    broker.cleanup().await;
    sim.shutdown().await;
}

async fn drain_request_ids(broker: &Broker, queue: &str) -> Vec<String> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let channel = broker.connection.create_channel().await.unwrap();
    let mut ids = Vec::new();
    while let Ok(Some(message)) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
    {
        let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
        ids.push(body["request_id"].as_str().unwrap().to_owned());
        message
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    ids
}
