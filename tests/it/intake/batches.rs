//! What a post publishes: all of it or nothing, and once. A batch with one bad line is 400 naming
//! it (a malformed body 400, another media type 415, over the limits 413), publishing nothing; a
//! repeated Idempotency-Key publishes one message, also when the repeats arrive while the first
//! post still waits for its confirms.

use super::*;
use crate::common::relay::Relay;

/// Also: a malformed body 400, another media type 415, over the limits 413; none publishes.
#[tokio::test]
async fn a_batch_with_one_bad_line_is_400_naming_it_and_publishes_nothing() {
    let (sim, broker, requests) = broker_only("intake-400").await;
    let intake = Intake::start(&broker.settings).await;

    let bad = json!({"request_id": "bad-2", "device_id": "{not-a-guid}"});
    let lines = format!("{}\n{bad}\n{}\n", request("bad-1"), request("bad-3"));
    let answer = intake.bearer(&lines, &[]).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    let errors = answer.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["line"], 2);
    assert_eq!(errors[0]["field"], "device_id");

    let array = json!([request("arr-1"), {"request_id": "arr-2", "serial_number": ""}]);
    let answer = intake.bearer(&array.to_string(), &[]).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["errors"][0]["line"], 2);
    assert_eq!(answer.body["errors"][0]["field"], "serial_number");

    let no_id = intake
        .bearer(&json!({"device_id": device()}).to_string(), &[])
        .await;
    assert_eq!(no_id.status, 400, "no request_id and no Idempotency-Key");
    assert_eq!(no_id.body["errors"][0]["field"], "request_id");
    assert_eq!(intake.bearer("{", &[]).await.status, 400);
    let auth = format!("Bearer {TOKEN}");
    let form = intake
        .post_as("text/plain", "device_id=x", &[("authorization", &auth)])
        .await;
    assert_eq!(form.status, 415, "{form:?}");

    // Over the limits: 413, nothing read further.
    let too_many: Vec<Value> = (0..101).map(|i| request(&format!("many-{i}"))).collect();
    let answer = intake.bearer(&json!(too_many).to_string(), &[]).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    let big = json!({"request_id": "big", "device_id": device(), "reason": "x".repeat(70_000)});
    assert_eq!(intake.bearer(&big.to_string(), &[]).await.status, 413);

    assert_eq!(
        published_ids(&intake, &requests).await,
        Vec::<String>::new()
    );
    finish(intake, broker, sim).await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_publishes_one_message() {
    let (sim, broker, requests) = broker_only("intake-idem").await;
    let intake = Intake::start(&broker.settings).await;

    let body = json!({"device_id": device(), "requested_by": "logic-apps"}).to_string();
    let key = [("idempotency-key", "leaver-4711")];
    let first = intake.bearer(&body, &key).await;
    assert_eq!(first.status, 202, "{first:?}");
    assert!(!first.replayed);
    let second = intake.bearer(&body, &key).await;
    assert_eq!((second.status, &second.body), (202, &first.body));
    assert!(second.replayed, "answered from the idempotency cache");
    assert_eq!(first.body["request_ids"], json!(["leaver-4711"]));

    let other = json!({"device_id": device()}).to_string();
    let conflict = intake.bearer(&other, &key).await;
    assert_eq!(conflict.status, 409, "the key reused for another request");

    assert_eq!(published_ids(&intake, &requests).await, ["leaver-4711"]);
    let message = requests
        .all()
        .into_iter()
        .find(|r| r.json()["request_id"] == "leaver-4711")
        .unwrap();
    let p = &message.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "leaver-4711");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(intake.metric("unassign_intake_duplicates_total").await, 1.0);
    finish(intake, broker, sim).await;
}

/// A sender that retries while its first attempt still waits for confirms (here: three identical
/// posts at once over a slowed broker link) gets 202 each time, and the messages are published
/// once: the later posts wait for the first instead of publishing again.
#[tokio::test]
async fn concurrent_repeats_of_a_post_publish_once() {
    let (sim, broker, requests) = broker_only("intake-race").await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let mut settings = broker.settings.clone();
    settings.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr)
        .parse()
        .unwrap();
    let intake = Intake::start(&settings).await;
    relay.slow(Duration::from_millis(200));

    let batch = json!([request("race-1"), request("race-2")]).to_string();
    let key = [("idempotency-key", "race")];
    let (a, b, c) = tokio::join!(
        intake.bearer(&batch, &key),
        intake.bearer(&batch, &key),
        intake.bearer(&batch, &key),
    );
    for answer in [&a, &b, &c] {
        assert_eq!(answer.status, 202, "{answer:?}");
        assert_eq!(answer.body, a.body);
    }
    assert_eq!(
        [&a, &b, &c].iter().filter(|x| x.replayed).count(),
        2,
        "two waited for the first and published nothing"
    );
    relay.slow(Duration::ZERO);
    assert_eq!(
        published_ids(&intake, &requests).await,
        ["race-1", "race-2"]
    );
    finish(intake, broker, sim).await;
}
