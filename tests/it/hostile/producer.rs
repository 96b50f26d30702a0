//! A hostile producer (issue 11): AMQP properties and headers are data, never orders. `CC`,
//! `BCC` and `reply-to` are never obeyed, `expiration` and `priority` never reach a dead letter,
//! another broker user's `user_id` is never copied, and the worker's own state headers, forged,
//! are ignored. Header names are spelt out, so the tests read as what a producer would send.

use std::collections::BTreeMap;

use unassign_worker::sim::{Device, Scripted, Sim, SimOptions};

use super::*;

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

fn queues(names: &[&str]) -> AMQPValue {
    AMQPValue::FieldArray(names.iter().map(|n| long(n)).collect::<Vec<_>>().into())
}

fn request(request_id: &str, device: &str) -> Vec<u8> {
    json!({"request_id": request_id, "device_id": device})
        .to_string()
        .into_bytes()
}

/// A 429 whose Retry-After is longer than the worker holds a delivery: the job is handed back
/// through a delay queue, so its hand-back is a publish of the worker's own.
fn throttled_once() -> Scripted {
    Scripted {
        status: 429,
        retry_after: Some("2".into()),
        delay_ms: 0,
    }
}

/// The events seen for `request_id`.
fn events_of(env: &Env, request_id: &str) -> usize {
    env.events
        .all()
        .iter()
        .filter(|e| e.event().data.request_id == request_id)
        .count()
}

/// `CC` and `BCC` naming the worker's own queues, on a request that is handed back and on one
/// that is dead-lettered, and a `reply-to` naming the request queue: each request gets exactly
/// one outcome, and nothing the worker publishes is copied anywhere else. On ef4ea5f the
/// hand-back looped at confirm speed and the dead letter came back as a new request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_directives_on_a_request_are_never_obeyed() {
    let env = Env::start_with("cc_bcc", common::sim_options(), |s| {
        s.retry.park_after = std::time::Duration::from_secs(1);
    })
    .await;
    let a = env.settings().amqp.clone();
    let mut headers = FieldTable::default();
    let own = [
        a.queue.as_str(),
        a.outcomes_queue.as_str(),
        a.dead_letter_queue.as_str(),
    ];
    headers.insert("CC".into(), queues(&own));
    headers.insert("BCC".into(), queues(&own));
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_reply_to(a.queue.as_str().into());

    let (parked, dead) = (device(), device());
    env.sim.update(|b| {
        b.failing_devices.insert(dead.clone(), 404);
    });
    env.sim.push_script([throttled_once()]);
    env.broker
        .publish(&request("cc-parked", &parked), properties.clone())
        .await;
    eventually("the throttled call", WAIT, || async {
        (env.sim.stats().action_calls == 1).then_some(())
    })
    .await;
    env.broker
        .publish(&request("cc-dead", &dead), properties.clone())
        .await;

    let letters = env.dead.wait_for(1, WAIT).await;
    assert_eq!(letters[0].json()["request_id"], "cc-dead");
    eventually("the parked request's outcome", WAIT, || async {
        (events_of(&env, "cc-parked") > 0).then_some(())
    })
    .await;
    // One more trip through the longest delay tier: a copy looping through the queues would
    // have shown itself by then.
    let quiet = eventually("a quiet broker", WAIT, || async {
        let depth = env.broker.depth(&a.queue).await;
        (depth == 0).then_some(())
    });
    quiet.await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    assert_eq!(events_of(&env, "cc-parked"), 1, "exactly one outcome");
    assert_eq!(events_of(&env, "cc-dead"), 1, "exactly one outcome");
    assert_eq!(
        env.events.len(),
        2,
        "nothing else reached the outcomes queue"
    );
    assert_eq!(
        env.dead.len(),
        1,
        "nothing else reached the dead-letter queue"
    );
    let calls = env.sim.stats().calls_by_device;
    assert_eq!(calls.get(&parked), Some(&2), "throttled, then done once");
    assert_eq!(calls.get(&dead), Some(&1));
    let headers = letters[0].header();
    for directive in ["CC", "BCC"] {
        assert!(
            headers.inner().get(directive).is_none(),
            "{directive} on the dead letter"
        );
    }
    assert_eq!(
        env.worker.metric("unassign_amqp_reconnects_total").await,
        0.0
    );
    env.finish().await;
}

/// `expiration` and `priority` set by the producer never reach the dead letter: it stays in
/// the dead-letter queue past the would-be TTL (quorum queues honour per-message TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_does_not_inherit_the_producers_ttl() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("expiry"));
    let broker = common::Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let worker = common::Worker::start(settings.clone()).await;
    worker.wait_ready().await;
    let gone = device();
    sim.update(|b| {
        b.failing_devices.insert(gone.clone(), 404);
    });
    let properties = BasicProperties::default()
        .with_expiration("500".into())
        .with_priority(9);
    broker.publish(&request("ttl-1", &gone), properties).await;
    events.wait_for(1, WAIT).await;
    let dlq = &settings.amqp.dead_letter_queue;
    eventually("the dead letter", WAIT, || async {
        (broker.depth(dlq).await == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        broker.depth(dlq).await,
        1,
        "the dead letter outlived the producer's TTL"
    );
    let letters = broker.collect(dlq).await.wait_for(1, WAIT).await;
    assert_eq!(letters[0].properties.expiration(), &None);
    assert_eq!(letters[0].properties.priority(), &None);
    assert_eq!(letters[0].properties.delivery_mode(), &Some(2));
    worker.stop().await;
    broker.cleanup().await;
    sim.shutdown().await;
}

/// A broker user of the producer's own, with a validated `user_id`: the worker (another broker
/// user) must not copy it onto its publishes, or the broker closes the worker's channel with
/// PRECONDITION_FAILED — on ef4ea5f, a reconnect per delivery until the delivery limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_from_another_broker_user_is_not_copied() {
    const USER: &str = "uw-test-producer";
    const PASSWORD: &str = "uw-test-producer-pw";
    common::broker_user(USER, PASSWORD);
    let env = Env::start_with("user_id", common::sim_options(), |s| {
        s.retry.park_after = std::time::Duration::from_secs(1);
    })
    .await;
    let url = common::amqp_url().replacen("guest:guest", &format!("{USER}:{PASSWORD}"), 1);
    let producer = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("the producer's own broker user connects");
    let publisher = unassign_worker::amqp::Publisher::open(&producer)
        .await
        .unwrap();
    let a = env.settings().amqp.clone();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_user_id(USER.into());
    let (parked, gone) = (device(), device());
    env.sim.update(|b| {
        b.failing_devices.insert(gone.clone(), 404);
    });
    env.sim.push_script([throttled_once()]);
    for (id, dev) in [("uid-parked", &parked), ("uid-gone", &gone)] {
        publisher
            .publish(
                &a.exchange,
                &a.routing_key,
                &request(id, dev),
                properties.clone(),
                true,
            )
            .await
            .expect("the broker validates the producer's own user_id");
        // The scripted 429 is for the first request's call, not the second's.
        eventually("its first call", WAIT, || async {
            env.sim
                .stats()
                .calls_by_device
                .contains_key(dev)
                .then_some(())
        })
        .await;
    }
    let events = env.events.wait_for(2, WAIT).await;
    let kinds: BTreeMap<String, String> = events
        .iter()
        .map(|e| {
            let e = e.event();
            (e.data.request_id.clone(), e.data.outcome.clone())
        })
        .collect();
    assert_eq!(kinds["uid-parked"], "succeeded");
    assert_eq!(kinds["uid-gone"], "failed");
    let letters = env.dead.wait_for(1, WAIT).await;
    assert_eq!(
        header_string(&letters[0].header(), "x-unassign-error-kind"),
        "device_not_found"
    );
    assert_eq!(letters[0].properties.user_id(), &None);
    assert_eq!(
        env.worker.metric("unassign_amqp_reconnects_total").await,
        0.0
    );
    assert_eq!(env.sim.stats().calls_by_device.get(&parked), Some(&2));
    let _ = producer.close(200, "done".into()).await;
    env.finish().await;
}

/// The worker's own state headers, forged by a producer, are ignored: no panic, no parking for
/// ever, no budget spent that was not spent, no device skipped. On ef4ea5f a retry-at in 9999
/// with an odd offset panicked the job, one in 2126 parked it for ever, a forged attempt count
/// dead-lettered at the first transient fault, and a forged devices-done list was reported as
/// unassigned while Graph was never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_state_headers_are_ignored() {
    let (ann_1, ann_2) = (device(), device());
    let singles: Vec<String> = (0..5).map(|_| device()).collect();
    let mut inventory = vec![
        Device::new(&ann_1, "SN-A1", "ann@contoso.com"),
        Device::new(&ann_2, "SN-A2", "ann@contoso.com"),
    ];
    for (n, id) in singles.iter().enumerate() {
        inventory.push(Device::new(
            id,
            &format!("SN-{n}"),
            &format!("u{n}@contoso.com"),
        ));
    }
    let sim = SimOptions {
        inventory: Some(inventory),
        ..common::sim_options()
    };
    let env = Env::start_with("forged", sim, |s| {
        s.retry.max_attempts = std::num::NonZeroU32::new(3).unwrap()
    })
    .await;
    let forge = |pairs: &[(&str, AMQPValue)]| {
        let mut headers = FieldTable::default();
        for (name, value) in pairs {
            headers.insert((*name).into(), value.clone());
        }
        BasicProperties::default().with_headers(headers)
    };
    let cases: Vec<(&str, BasicProperties)> = vec![
        (
            "retry-at-9999",
            forge(&[("x-unassign-retry-at", long("9999-12-31T23:59:59-23:59"))]),
        ),
        (
            "retry-at-2126",
            forge(&[("x-unassign-retry-at", long("2126-01-01T00:00:00Z"))]),
        ),
        (
            "spent-budget",
            forge(&[
                ("x-unassign-attempts", AMQPValue::LongLongInt(3)),
                ("x-unassign-first-received-at", long("1970-01-01T00:00:00Z")),
            ]),
        ),
        (
            "attempts-max",
            forge(&[("x-unassign-attempts", AMQPValue::LongUInt(u32::MAX))]),
        ),
        (
            "bad-mac",
            forge(&[
                (
                    "x-unassign-state",
                    long(r#"{"v":1,"attempts":3,"retry_at":"2126-01-01T00:00:00Z"}"#),
                ),
                ("x-unassign-state-mac", long(&"0".repeat(64))),
            ]),
        ),
    ];
    // One at a time, each first answered by a transient fault: a forged, spent budget would
    // dead-letter its request as retries_exhausted right there.
    let transient = Scripted {
        status: 503,
        retry_after: None,
        delay_ms: 0,
    };
    for ((id, properties), dev) in cases.iter().zip(&singles) {
        env.sim.push_script([transient.clone()]);
        env.broker
            .publish(&request(id, dev), properties.clone())
            .await;
        let events = env.events.wait_for(env.events.len() + 1, WAIT).await;
        let e = events.last().unwrap().event();
        assert_eq!(e.data.request_id, *id);
        assert_eq!(e.data.outcome, "succeeded", "{e:?}");
        assert_eq!(e.data.attempts, 2, "{id}: the 503, then the success");
        assert_eq!(env.sim.stats().calls_by_device.get(dev), Some(&2), "{id}");
    }
    let both = format!("{ann_1},{ann_2}");
    env.broker
        .publish(
            json!({"request_id": "devices-done", "user_principal_name": "ann@contoso.com"})
                .to_string()
                .as_bytes(),
            forge(&[
                ("x-unassign-devices-done", long(&both)),
                ("x-unassign-device-calls", AMQPValue::LongLongInt(0)),
            ]),
        )
        .await;
    let events = env.events.wait_for(cases.len() + 1, WAIT).await;
    let e = events.last().unwrap().event();
    assert_eq!(e.data.outcome, "succeeded", "{e:?}");
    let calls = env.sim.stats().calls_by_device;
    assert_eq!(
        calls.get(&ann_1),
        Some(&1),
        "Graph was asked for each device"
    );
    assert_eq!(
        calls.get(&ann_2),
        Some(&1),
        "Graph was asked for each device"
    );
    assert!(env.dead.all().is_empty());
    assert!(
        env.worker.metric("unassign_state_rejected_total").await >= cases.len() as f64,
        "every forgery counted"
    );
    env.finish().await;
}
