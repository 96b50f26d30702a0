//! Credential trouble pauses consumption and never dead-letters; a 401 gets one fresh token.

use crate::common;

use std::time::Duration;

use common::{Env, SECRET, TempFile, device, eventually, pki::TestCertificate};
use unassign_worker::sim::SimOptions;

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
    // The call refused 401 did not reach the action: it spends no attempt.
    assert_eq!(
        (after.data.outcome.as_str(), after.data.attempts),
        ("succeeded", 1)
    );
    assert_eq!(env.sim.stats().token_requests, 2);
    assert_eq!(env.sim.stats().responses_by_status.get(&401), Some(&1));
    env.finish().await;
}

/// Waits for the pause `/readyz` reports, then checks `jobs` are back in the queue, nothing was
/// dead-lettered and no outcome was published beyond the `events` already seen.
async fn assert_paused_without_dead_letters(env: &Env, jobs: u32, events: usize) {
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
    assert_eq!(env.events.len(), events);
}

/// Mid-run, the secret stops working and every token already issued is revoked: the next call's
/// 401 finds no fresh token to be had, and the worker pauses with the rest still queued.
#[tokio::test]
async fn credentials_revoked_mid_run_pause_and_resume() {
    let env = Env::start("revoked").await;
    for i in 0..5 {
        env.broker
            .publish_request(&format!("early-{i}"), &device())
            .await;
    }
    env.events.wait_for(5, WAIT).await;
    env.sim.update(|b| b.client_secret = "revoked".to_owned());
    env.sim.revoke_tokens();
    for i in 0..10 {
        env.broker
            .publish_request(&format!("late-{i}"), &device())
            .await;
    }
    assert_paused_without_dead_letters(&env, 10, 5).await;

    env.sim.update(|b| b.client_secret = SECRET.to_owned());
    let events = env.events.wait_for(15, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    env.finish().await;
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
    assert_paused_without_dead_letters(&env, 10, 0).await;
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
    assert_paused_without_dead_letters(&env, 10, 0).await;

    env.sim.update(|b| b.forbid = false);
    let events = env.events.wait_for(10, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    // The calls refused 403 spent none of their jobs' retry budgets.
    let attempts: Vec<u32> = events.iter().map(|e| e.event().data.attempts).collect();
    assert_eq!(attempts, [1; 10]);
    assert!(env.sim.stats().responses_by_status.get(&403) >= Some(&1));
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}

#[tokio::test]
async fn an_unreachable_token_endpoint_pauses() {
    let env = Env::start("tokenoutage").await;
    env.sim.update(|b| b.token_outage = true);
    env.broker.publish_request("t-1", &device()).await;
    assert_paused_without_dead_letters(&env, 1, 0).await;
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
    assert_paused_without_dead_letters(&env, 1, 0).await;
    // The Secret is rotated (Kubernetes rewrites the mounted file): the next probe uses it.
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let event = env.events.wait_for(1, WAIT).await[0].event();
    assert_eq!(event.data.outcome, "succeeded");
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
    let _ = std::fs::remove_file(file);
}

/// Publishes `n` requests named `{prefix}-{i}`.
async fn publish(env: &Env, prefix: &str, n: usize) {
    for i in 0..n {
        env.broker
            .publish_request(&format!("{prefix}-{i}"), &device())
            .await;
    }
}

fn tokens_by(env: &Env, credential: &str) -> u64 {
    let stats = env.sim.stats();
    stats
        .tokens_by_credential
        .get(credential)
        .copied()
        .unwrap_or(0)
}

/// A worker authenticating with the PEM in `pem`, against an app registration holding the
/// certificates in `registered` (graph-sim's `--client-certificate`).
async fn start_with_certificate(test: &str, registered: &str, pem: &TempFile) -> Env {
    let registered = TempFile::new(registered);
    let sim = SimOptions {
        client_certificates: vec![registered.0.clone()],
        ..common::sim_options()
    };
    Env::start_with(test, sim, |s| {
        s.auth.client_secret = None;
        s.auth.client_certificate_path = Some(pem.0.clone());
    })
    .await
}

#[tokio::test]
async fn a_certificate_the_app_does_not_know_pauses_until_it_is_registered() {
    let known = TestCertificate::generate();
    let unknown = TestCertificate::generate();
    let pem = TempFile::new(&unknown.pem());
    let env = start_with_certificate("cert", &known.cert_pem, &pem).await;
    publish(&env, "cert", 5).await;
    // AADSTS700027: the assertion names a certificate the app registration does not hold.
    assert_paused_without_dead_letters(&env, 5, 0).await;
    assert_eq!(env.sim.stats().action_calls, 0);

    env.sim
        .update(|b| b.client_certificates.push(unknown.cert_pem.clone()));
    let events = env.events.wait_for(5, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    assert!(tokens_by(&env, "certificate") >= 1);
    assert_eq!(tokens_by(&env, "secret"), 0);
    env.worker.wait_ready().await;
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_read_again_and_a_mismatched_key_pauses() {
    let first = TestCertificate::generate();
    let second = TestCertificate::generate();
    let pem = TempFile::new(&first.pem());
    let registered = format!("{}{}", first.cert_pem, second.cert_pem);
    let env = start_with_certificate("certrot", &registered, &pem).await;
    publish(&env, "before", 1).await;
    env.events.wait_for(1, WAIT).await;

    // A botched rotation: the new key with the old certificate. Nothing can be signed that
    // Entra ID would accept, so the worker pauses instead of draining the queue.
    pem.write(&format!("{}{}", second.key_pem, first.cert_pem));
    env.sim.revoke_tokens();
    publish(&env, "botched", 3).await;
    assert_paused_without_dead_letters(&env, 3, 1).await;

    pem.write(&second.pem());
    let events = env.events.wait_for(4, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    assert_eq!(
        tokens_by(&env, "certificate"),
        2,
        "one token per certificate"
    );
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}

#[tokio::test]
async fn a_rotated_federated_token_is_read_again_and_an_expired_one_pauses() {
    // The simulated cluster that signs tokens starts with the simulator, after this file.
    let token = TempFile::new("not-yet-a-token");
    let env = Env::start_with("federated", common::sim_options(), |s| {
        s.auth.client_secret = None;
        s.auth.federated_token_file = Some(token.0.clone());
    })
    .await;
    let subject = SimOptions::default().federated_subject;
    token.write(&env.sim.federated_token(&subject, 3600));
    publish(&env, "fed", 1).await;
    env.events.wait_for(1, WAIT).await;
    assert_eq!(tokens_by(&env, "federated"), 1);

    // Kubelet failed to refresh the projected token: AADSTS700024 until it does.
    token.write(&env.sim.federated_token(&subject, -3600));
    env.sim.revoke_tokens();
    publish(&env, "stale", 3).await;
    assert_paused_without_dead_letters(&env, 3, 1).await;

    token.write(&env.sim.federated_token(&subject, 3600));
    let events = env.events.wait_for(4, WAIT).await;
    assert!(events.iter().all(|e| e.event().data.outcome == "succeeded"));
    assert_eq!(tokens_by(&env, "federated"), 2);
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}
