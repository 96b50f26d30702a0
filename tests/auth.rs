//! Credential trouble pauses consumption and never dead-letters; a 401 gets one fresh token.

mod common;

use std::time::Duration;

use common::{Env, SECRET, device, eventually};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_401_fetches_a_fresh_token_and_retries() {
    let env = Env::start("refresh").await;
    env.broker.publish_request("before", &device()).await;
    env.events.wait_for(1, WAIT).await;
    env.sim.revoke_tokens();
    env.broker.publish_request("after", &device()).await;
    let events = env.events.wait_for(2, WAIT).await;
    let after = events
        .iter()
        .map(|e| e.event())
        .find(|e| e.data.request_id == "after")
        .unwrap();
    assert_eq!(
        (after.data.outcome.as_str(), after.data.attempts),
        ("succeeded", 2)
    );
    assert_eq!(env.sim.stats().token_requests, 2);
    assert_eq!(env.sim.stats().responses_by_status.get(&401), Some(&1));
    env.finish().await;
}

async fn assert_paused_without_dead_letters(env: &Env, jobs: u32) {
    let (status, body) = eventually("/readyz 503", WAIT, || async {
        let (status, body) = env.worker.get("/readyz").await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("credentials"), "{body}");
    let queue = env.settings().amqp.queue.clone();
    eventually("every request back in the queue", WAIT, || async {
        (env.broker.depth(&queue).await == jobs).then_some(())
    })
    .await;
    assert_eq!(
        env.dead.len(),
        0,
        "credential trouble must never dead-letter"
    );
    assert_eq!(env.events.len(), 0);
}

#[tokio::test]
async fn a_wrong_secret_pauses_and_resumes_when_the_secret_works() {
    let sim = unassign_worker::sim::SimOptions {
        client_secret: "rotated".to_owned(),
        ..common::sim_options()
    };
    let env = Env::start_with("wrongsecret", sim, |_| {}).await;
    for i in 0..10 {
        env.broker
            .publish_request(&format!("wait-{i}"), &device())
            .await;
    }
    assert_paused_without_dead_letters(&env, 10).await;
    assert_eq!(env.sim.stats().action_calls, 0);
    assert!(
        env.worker
            .metric("unassign_token_requests_total{result=\"error\"}")
            .await
            >= 1.0
    );

    env.sim.update(|b| b.client_secret = SECRET.to_owned());
    let events = env.events.wait_for(10, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    env.worker.wait_ready().await;
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}

#[tokio::test]
async fn a_403_pauses_instead_of_draining_the_queue() {
    let sim = unassign_worker::sim::SimOptions {
        forbid: true,
        ..common::sim_options()
    };
    let env = Env::start_with("forbidden", sim, |_| {}).await;
    for i in 0..10 {
        env.broker
            .publish_request(&format!("perm-{i}"), &device())
            .await;
    }
    assert_paused_without_dead_letters(&env, 10).await;

    env.sim.update(|b| b.forbid = false);
    let events = env.events.wait_for(10, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}

#[tokio::test]
async fn an_unreachable_token_endpoint_pauses() {
    let env = Env::start("tokenoutage").await;
    env.sim.update(|b| b.token_outage = true);
    env.broker.publish_request("t-1", &device()).await;
    assert_paused_without_dead_letters(&env, 1).await;
    env.sim.update(|b| b.token_outage = false);
    assert_eq!(
        env.events.wait_for(1, WAIT).await[0].event().data.outcome,
        "succeeded"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_rotated_secret_file_is_picked_up_without_a_restart() {
    let file = std::env::temp_dir().join(format!("secret-{}", uuid::Uuid::new_v4()));
    std::fs::write(&file, "expired-secret\n").unwrap();
    let env = Env::start_with("rotated", common::sim_options(), |s| {
        s.auth.client_secret = None;
        s.auth.client_secret_file = Some(file.clone());
    })
    .await;
    env.broker.publish_request("rot-1", &device()).await;
    assert_paused_without_dead_letters(&env, 1).await;
    // The Secret is rotated (Kubernetes rewrites the mounted file): the next probe uses it.
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let event = env.events.wait_for(1, WAIT).await[0].event();
    assert_eq!(event.data.outcome, "succeeded");
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
    let _ = std::fs::remove_file(file);
}
