//! The broker beneath the intake failing: unreachable, a post is 503 and publishes nothing, and
//! /readyz says so, then 202 once it is back; taking only part of a batch, the post is 503 and its
//! retry publishes just the rest, so that every message is on the broker exactly once.

use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};

use super::*;
use crate::common::relay::Relay;

#[tokio::test]
async fn an_unreachable_broker_is_503_publishing_nothing_then_202_once_back() {
    let (sim, broker, requests) = broker_only("intake-503").await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let mut settings = broker.settings.clone();
    settings.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr)
        .parse()
        .unwrap();
    let intake = Intake::start(&settings).await;

    assert!(
        relay.down() >= 1,
        "the intake's connection went through the relay"
    );
    let batch = json!([request("down-1"), request("down-2")]).to_string();
    let answer = intake.bearer(&batch, &[]).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.retry_after.as_deref(), Some("5"));
    let (status, _) = get(&format!("{}/readyz", intake.ops)).await;
    assert_eq!(status, 503, "not ready while the broker is away");

    relay.up();
    let answer = eventually("a 202 once the broker is back", WAIT, || async {
        let answer = intake.bearer(&batch, &[]).await;
        (answer.status == 202).then_some(answer)
    })
    .await;
    assert_eq!(answer.body["accepted"], 2);
    assert!(intake.metric("unassign_intake_amqp_reconnects_total").await >= 1.0);
    let (status, _) = get(&format!("{}/readyz", intake.ops)).await;
    assert_eq!(status, 200);

    // The relay is back, so the sentinel goes through it too.
    let ids = published_ids(&intake, &requests).await;
    assert_eq!(ids, ["down-1", "down-2"], "each once, nothing from the 503");
    finish(intake, broker, sim).await;
}

/// Nothing is half-accepted: the broker takes only part of a batch — for the first post the
/// exchange routes to a classic queue of `x-max-length` 3 with `reject-publish` instead of the
/// request queue, so the first three messages are confirmed and the rest nacked — and the post is
/// 503. Once the request queue is bound again the same post is 202 and publishes only the 27 the
/// broker did not confirm, on a fresh channel (a nack retires the one it came on): every message
/// is on the broker exactly once.
#[tokio::test]
async fn a_broker_refusing_part_of_a_batch_is_503_and_the_retry_publishes_each_message_once() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("intake-partial"));
    let broker = Broker::connect(&settings).await;
    let intake = Intake::start(&settings).await;
    let a = &settings.amqp;
    let (exchange, key) = (a.exchange.as_str(), a.routing_key.as_str());
    let limiter = format!("{}.limiter", a.queue);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(3));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let channel = &broker.channel;
    channel
        .queue_declare(
            limiter.as_str().into(),
            QueueDeclareOptions::default(),
            args,
        )
        .await
        .unwrap();
    let bind = |queue: String, bound: bool| async move {
        let none = FieldTable::default();
        if bound {
            let options = QueueBindOptions::default();
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    key.into(),
                    options,
                    none,
                )
                .await
        } else {
            channel
                .queue_unbind(queue.as_str().into(), exchange.into(), key.into(), none)
                .await
        }
        .unwrap();
    };
    bind(a.queue.clone(), false).await;
    bind(limiter.clone(), true).await;

    let items: Vec<Value> = (0..30).map(|i| request(&format!("partial-{i}"))).collect();
    let batch = json!(items).to_string();
    let idempotency = [("idempotency-key", "partial-batch")];
    let refused = intake.bearer(&batch, &idempotency).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.retry_after.is_some());
    let reopens = "unassign_intake_amqp_channel_reopens_total";
    assert_eq!(
        intake.metric(reopens).await,
        0.0,
        "retired, not yet replaced"
    );

    bind(limiter.clone(), false).await;
    bind(a.queue.clone(), true).await;
    let accepted = intake.bearer(&batch, &idempotency).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    assert_eq!(accepted.body["accepted"], 30);
    // The nacks kept the connection but not the channel: the retry went out on a fresh one.
    assert_eq!(intake.metric(reopens).await, 1.0);
    let reconnects = "unassign_intake_amqp_reconnects_total";
    assert_eq!(intake.metric(reconnects).await, 0.0);
    assert_eq!(
        intake.metric("unassign_intake_duplicates_total").await,
        3.0,
        "the three confirmed before the 503 were not published again"
    );

    let requests = broker.collect(&a.queue).await;
    let mut ids = published_ids(&intake, &requests).await;
    assert_eq!(
        broker.depth(&limiter).await,
        3,
        "the first three, taken once"
    );
    ids.sort_by_key(|id| id["partial-".len()..].parse::<u32>().unwrap());
    let rest: Vec<String> = (3..30).map(|i| format!("partial-{i}")).collect();
    assert_eq!(ids, rest, "the other 27, each once");
    channel
        .queue_delete(limiter.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    finish(intake, broker, sim).await;
}
