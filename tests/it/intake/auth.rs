//! Who may post, and how often: signed and bearer posts become outcome events through a worker
//! (any line of the secrets file verifies); wrong, stale, future, tampered or replayed signatures
//! and missing or wrong tokens are 401 and publish nothing; the tokens file rotates without a
//! restart; each credential has its own rate, a sender over it gets 429.

use std::collections::BTreeSet;

use super::*;
use crate::common::Env;

#[tokio::test]
async fn signed_and_bearer_posts_become_outcome_events() {
    let env = Env::start("intake-e2e").await;
    let intake = Intake::start(env.settings()).await;

    let signed = request("e2e-signed");
    let answer = intake.signed(&signed.to_string(), SECRET, None).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(
        answer.body,
        json!({"accepted": 1, "request_ids": ["e2e-signed"]})
    );
    let rotated = intake
        .signed(&request("e2e-rotated").to_string(), RETIRED, None)
        .await;
    assert_eq!(rotated.status, 202, "any line of the secrets file verifies");

    let lines = format!(
        "{}\n\n{}\n",
        request("e2e-bearer-1"),
        request("e2e-bearer-2")
    );
    let answer = intake.bearer(&lines, &[]).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(
        answer.body["request_ids"],
        json!(["e2e-bearer-1", "e2e-bearer-2"])
    );

    let events = env.events.wait_for(4, WAIT).await;
    let done: BTreeSet<String> = events
        .iter()
        .map(|e| e.event())
        .inspect(|e| assert_eq!(e.data.outcome, "succeeded", "{e:?}"))
        .map(|e| e.data.request_id)
        .collect();
    let want = ["e2e-bearer-1", "e2e-bearer-2", "e2e-rotated", "e2e-signed"];
    assert_eq!(done, want.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        intake
            .metric("unassign_intake_requests_total{code=\"202\"}")
            .await,
        3.0
    );
    assert_eq!(
        intake
            .metric("unassign_intake_messages_published_total")
            .await,
        4.0
    );
    intake.stop().await;
    env.finish().await;
}

#[tokio::test]
async fn wrong_stale_or_replayed_signatures_are_401_and_publish_nothing() {
    let (sim, broker, requests) = broker_only("intake-auth").await;
    let intake = Intake::start(&broker.settings).await;
    let body = request("auth-replayed").to_string();

    let first = intake.signed(&body, SECRET, Some(now())).await;
    assert_eq!(first.status, 202);
    // Another t: the same body and t would make the same signature, a replay.
    let t = now() - 10;
    let signature = sign(SECRET, t, body.as_bytes());
    let good_once = intake
        .post(&body, &[("x-unassign-signature", &signature)])
        .await;
    assert_eq!(
        good_once.status, 202,
        "a fresh signature of a repeat is fine"
    );
    let replayed = intake
        .post(&body, &[("x-unassign-signature", &signature)])
        .await;
    assert_eq!(replayed.status, 401, "{replayed:?}");

    let cases = [
        ("wrong-secret", "not-the-secret-0123456789", 0),
        ("stale", SECRET, -301),
        ("future", SECRET, 301),
    ];
    for (what, secret, offset) in cases {
        let body = request(&format!("auth-{what}")).to_string();
        let answer = intake.signed(&body, secret, Some(now() + offset)).await;
        assert_eq!(answer.status, 401, "{what}: {answer:?}");
    }
    let garbage = intake
        .post(
            &request("auth-garbage").to_string(),
            &[("x-unassign-signature", "t=1,v1=zz")],
        )
        .await;
    assert_eq!(garbage.status, 401);
    let tampered = intake
        .post(
            &request("auth-tampered").to_string(),
            &[("x-unassign-signature", &signature)],
        )
        .await;
    assert_eq!(tampered.status, 401);
    let no_credentials = intake.post(&request("auth-none").to_string(), &[]).await;
    assert_eq!(no_credentials.status, 401);
    let bad_token = intake
        .post(
            &request("auth-token").to_string(),
            &[("authorization", "Bearer bearer-token-for-tests-012345678")],
        )
        .await;
    assert_eq!(bad_token.status, 401);

    assert_eq!(
        published_ids(&intake, &requests).await,
        ["auth-replayed"],
        "only the one accepted message (the repeat was not published again)"
    );
    assert_eq!(
        intake
            .metric("unassign_intake_auth_failures_total{reason=\"replayed\"}")
            .await,
        1.0
    );
    finish(intake, broker, sim).await;
}

/// Rotation without a restart: the tokens file is rewritten while the intake runs.
#[tokio::test]
async fn tokens_rotate_without_a_restart() {
    let (sim, broker, requests) = broker_only("intake-rotate").await;
    let intake = Intake::start(&broker.settings).await;
    assert_eq!(
        intake
            .bearer(&request("rot-1").to_string(), &[])
            .await
            .status,
        202
    );
    let new = "bearer-token-after-rotation-9876543210";
    intake.files.0.write(&format!("# rotated\n{new}\n"));
    let old = intake.bearer(&request("rot-2").to_string(), &[]).await;
    assert_eq!(old.status, 401, "the removed token is refused at once");
    let auth = format!("Bearer {new}");
    let rotated = intake
        .post(&request("rot-3").to_string(), &[("authorization", &auth)])
        .await;
    assert_eq!(rotated.status, 202);
    let ids = ids_once(&requests, 2).await;
    assert_eq!(ids, ["rot-1", "rot-3"]);
    finish(intake, broker, sim).await;
}

#[tokio::test]
async fn a_sender_over_its_rate_is_429_and_others_go_ahead() {
    let (sim, broker, requests) = broker_only("intake-limits").await;
    let intake = Intake::start_with(&broker.settings, |s| {
        s.intake.rate_limit_per_second = 0.5.try_into().unwrap();
    })
    .await;
    let first = intake
        .signed(&request("rate-1").to_string(), SECRET, None)
        .await;
    assert_eq!(first.status, 202);
    let second = intake
        .signed(&request("rate-2").to_string(), SECRET, None)
        .await;
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.retry_after.as_deref(), Some("2"));
    let other_client = intake.bearer(&request("rate-3").to_string(), &[]).await;
    assert_eq!(
        other_client.status, 202,
        "each credential has its own bucket"
    );
    // In order on one channel: a wrongly published rate-2 would come before rate-3.
    let ids = ids_once(&requests, 2).await;
    assert_eq!(ids, ["rate-1", "rate-3"]);
    finish(intake, broker, sim).await;
}
