//! Poison and hostile input against a live worker: floods of garbage and injection attempts,
//! an oversized body, and a message that crashes its worker every time it is delivered. Each
//! must end in the dead-letter queue without reaching Graph and without harming the worker.

use crate::common;

use std::{
    collections::BTreeMap,
    process::{Child, Stdio},
    time::Duration,
};

use common::{Env, bin, device, eventually};
use futures_util::{StreamExt, stream};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use rand::{RngExt, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::{Value, json};
use unassign_worker::{
    contract::{MAX_BODY_BYTES, header_str, parse_request},
    sim::{Device, Scripted, Sim, SimOptions},
};

const WAIT: Duration = Duration::from_secs(20);
const GUID: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";

/// Device ids that try to leave the `/deviceManagement/windowsAutopilotDeviceIdentities/{id}`
/// path segment, or pass for a GUID at a glance.
const INJECTED_IDS: &[&str] = &[
    "../../me",
    "x?$select=y",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fme",
    "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e/../x",
    "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e?$select=id",
    "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e#x",
    "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e%2f",
    "{7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e}",
    " 7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e",
    "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e\n",
    "7b7c4c1e6f5a4c399a432b1e5b0c1d2e",
    "7b7c4c1é-6f5a-4c39-9a43-2b1e5b0c1d2",
    "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2\u{0}",
    "me",
    "",
    "/",
    "..",
];

/// One random body, deterministic in `rng`: random bytes, random JSON, or a request-shaped
/// object carrying an injected id, a wrong type, or a duplicate key.
fn hostile_body(rng: &mut StdRng, i: usize) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => {
            let len = rng.random_range(0..256);
            (0..len).map(|_| rng.random()).collect()
        }
        1 => random_json(rng, 3).to_string().into_bytes(),
        2 => {
            let id = *INJECTED_IDS.choose(rng).unwrap();
            let mut object = json!({"request_id": format!("hostile-{i}"), "device_id": id});
            if rng.random_bool(0.3) {
                object["reason"] = json!("offboarding");
            }
            object.to_string().into_bytes()
        }
        _ => {
            // A valid GUID, spoilt by a wrong type, a duplicate key or a second target.
            let spoilt = [
                format!(r#"{{"request_id":"hostile-{i}","device_id":["{GUID}"]}}"#),
                format!(r#"{{"request_id":"hostile-{i}","device_id":{{"id":"{GUID}"}}}}"#),
                format!(
                    r#"{{"request_id":"hostile-{i}","device_id":"{GUID}","device_id":"../../me"}}"#
                ),
                format!(
                    r#"{{"request_id":"hostile-{i}","device_id":"{GUID}","serial_number":"SN"}}"#
                ),
                format!(r#"{{"request_id":"../../me","device_id":"{GUID}"}}"#),
                format!(r#"{{"device_id":"{GUID}"}}"#),
                format!(r#"[{{"request_id":"hostile-{i}","device_id":"{GUID}"}}]"#),
                format!(r#"{{"request_id":"hostile-{i}","device_id":"{GUID}","tenant_id":"x"}}"#),
            ];
            spoilt.choose(rng).unwrap().clone().into_bytes()
        }
    }
}

fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    let pick = if depth == 0 {
        rng.random_range(0..4)
    } else {
        rng.random_range(0..6)
    };
    match pick {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>()),
        3 => {
            let len = rng.random_range(0..24);
            let s: String = (0..len).map(|_| rng.random::<char>()).collect();
            json!(s)
        }
        4 => (0..rng.random_range(0..4))
            .map(|_| random_json(rng, depth - 1))
            .collect(),
        _ => {
            let keys = ["request_id", "device_id", "serial_number", "tenant_id", "x"];
            let map = (0..rng.random_range(0..4))
                .map(|_| {
                    let key = (*keys.choose(rng).unwrap()).to_owned();
                    (key, random_json(rng, depth - 1))
                })
                .collect();
            Value::Object(map)
        }
    }
}

fn header_string(headers: &FieldTable, name: &str) -> String {
    header_str(headers, name)
        .map(|s| s.into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_bodies_are_dead_lettered_and_never_reach_graph() {
    const N: usize = 1000;
    let env = Env::start("hostile").await;
    let mut rng = StdRng::seed_from_u64(0x5eed_4057);
    let bodies: Vec<Vec<u8>> = (0..N).map(|i| hostile_body(&mut rng, i)).collect();
    for body in &bodies {
        assert!(
            parse_request(body, None).is_err(),
            "the generator made a valid request: {}",
            String::from_utf8_lossy(body)
        );
    }

    // Pipelined publishes: up to 64 awaiting their confirm at once.
    let publisher = env.broker.publisher().await;
    let a = &env.settings().amqp;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    stream::iter(&bodies)
        .map(|body| {
            let (publisher, properties) = (publisher.clone(), properties.clone());
            async move {
                publisher
                    .publish(&a.exchange, &a.routing_key, body, properties, true)
                    .await
                    .expect("publish confirmed")
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;

    let dead = env.dead.wait_for(N, Duration::from_secs(25)).await;
    assert_eq!(dead.len(), N);
    for d in &dead {
        let headers = d.header();
        assert_eq!(
            header_string(&headers, "x-unassign-error-kind"),
            "invalid_request",
            "{}",
            String::from_utf8_lossy(&d.body)
        );
        assert!(
            !header_string(&headers, "x-unassign-error-message").is_empty(),
            "{}",
            String::from_utf8_lossy(&d.body)
        );
    }
    // Every body dead-lettered exactly once, unchanged.
    let mut sent = bodies.clone();
    let mut got: Vec<Vec<u8>> = dead.iter().map(|d| d.body.clone()).collect();
    sent.sort();
    got.sort();
    assert!(sent == got, "the dead letters are not the bodies sent");

    let stats = env.sim.stats();
    assert_eq!(stats.action_calls, 0, "{:?}", stats.calls_by_device);
    assert!(
        stats.unexpected_requests.is_empty(),
        "{:?}",
        stats.unexpected_requests
    );

    // The worker is unharmed: a valid request still succeeds.
    env.broker.publish_request("after-hostile", &device()).await;
    eventually("the valid request's event", WAIT, || async {
        env.events
            .all()
            .iter()
            .map(|e| e.event())
            .find(|e| e.data.request_id == "after-hostile")
            .map(|e| assert_eq!(e.data.outcome, "succeeded"))
    })
    .await;
    assert_eq!(env.sim.stats().action_calls, 1);
    assert_eq!(env.dead.len(), N, "nothing else was dead-lettered");
    assert_eq!(env.worker.get("/healthz").await.0, 200);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_mebibyte_body_is_refused_unparsed() {
    let env = Env::start("huge").await;
    // A request that would be valid but for its size. lapin reads the body once into the
    // delivery; the worker checks its length against MAX_BODY_BYTES and never parses it.
    // RabbitMQ's default max message size is 128 MiB, so the broker accepts it.
    let filler = "x".repeat(10 * 1024 * 1024);
    let body = json!({"request_id": "huge-1", "device_id": GUID, "reason": filler}).to_string();
    assert!(body.len() > 10 * 1024 * 1024);
    env.broker
        .publish(
            body.as_bytes(),
            BasicProperties::default().with_message_id("huge-1".into()),
        )
        .await;

    let dead = env.dead.wait_for(1, WAIT).await;
    let headers = dead[0].header();
    assert_eq!(dead[0].body.len(), body.len(), "the original body is kept");
    assert_eq!(
        header_string(&headers, "x-unassign-error-kind"),
        "invalid_request"
    );
    let message = header_string(&headers, "x-unassign-error-message");
    assert!(
        message.contains("limit") && message.contains(&MAX_BODY_BYTES.to_string()),
        "{message}"
    );
    assert_eq!(env.sim.stats().action_calls, 0);

    // Correlated through message-id (the body is never read for its request_id).
    let events = env.events.wait_for(1, WAIT).await;
    let event = events[0].event();
    assert_eq!(event.data.request_id, "huge-1");
    assert_eq!(
        event.data.error.as_ref().unwrap().kind.as_str(),
        "invalid_request"
    );
    assert_eq!(event.subject, None);

    env.broker.publish_request("after-huge", &device()).await;
    let events = env.events.wait_for(2, WAIT).await;
    let after = events
        .iter()
        .map(|e| e.event())
        .find(|e| e.data.request_id == "after-huge")
        .expect("the valid request's event");
    assert_eq!(after.data.outcome, "succeeded");
    assert_eq!(env.sim.stats().action_calls, 1);
    env.finish().await;
}

/// A worker process, SIGKILLed when dropped so a failing test leaves none behind.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The reason of the newest `x-death` entry the broker wrote.
fn death_reason(headers: &FieldTable) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    match deaths.as_slice().first()? {
        AMQPValue::FieldTable(entry) => header_str(entry, "reason").map(|s| s.into_owned()),
        _ => None,
    }
}

/// A message that kills its worker each time ends in the dead-letter queue by the broker's
/// delivery limit, not in a crash loop.
///
/// The crash is a SIGKILL of the worker binary. Aborting the in-process worker's task is not the
/// same thing (checked with a throw-away probe): the broker does requeue the message at once,
/// but the job is a task of its own (a `TaskTracker`) and runs on — it finished its Graph call
/// and published an outcome event on the publisher channel, which stayed open. A killed process
/// publishes nothing, which is what this test asserts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crashes_its_worker_is_dead_lettered_by_the_delivery_limit() {
    const DELIVERY_LIMIT: u32 = 2;
    // The call stays in flight long enough to kill the worker while it holds the message.
    let sim = Sim::start(SimOptions {
        latency_ms: 2000,
        ..common::sim_options()
    })
    .await
    .unwrap();
    let mut settings = common::settings(&sim, &common::prefix("crashloop"));
    settings.amqp.delivery_limit = DELIVERY_LIMIT;
    let broker = common::Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let dead = broker.collect(&settings.amqp.dead_letter_queue).await;
    let vars = bin::env_for(&sim, &settings);
    let dev = device();
    broker.publish_request("crash-1", &dev).await;

    let calls = || sim.stats().calls_by_device.get(&dev).copied().unwrap_or(0);
    let mut crashes = 0;
    while dead.len() == 0 {
        assert!(
            crashes <= DELIVERY_LIMIT + 2,
            "no dead letter after {crashes} crashes"
        );
        let mut worker = Process(
            bin::command(&vars)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the worker starts"),
        );
        // Either this worker picks the message up (and is killed holding it), or the broker
        // has dead-lettered it already.
        let holding = eventually("the worker to hold the message", WAIT, || {
            let holding = calls() > u64::from(crashes);
            let dead_lettered = dead.len() > 0;
            async move { (holding || dead_lettered).then_some(holding) }
        })
        .await;
        worker.0.kill().expect("SIGKILL");
        worker.0.wait().unwrap();
        if holding {
            crashes += 1;
            // The broker requeues (or dead-letters) once it sees the connection gone.
            eventually("the message back in a queue", WAIT, || async {
                let requeued = broker.depth(&settings.amqp.queue).await > 0;
                (requeued || dead.len() > 0).then_some(())
            })
            .await;
        }
    }

    let letters = dead.wait_for(1, WAIT).await;
    assert_eq!(letters.len(), 1);
    let headers = letters[0].header();
    assert_eq!(
        death_reason(&headers).as_deref(),
        Some("delivery_limit"),
        "{headers:?}"
    );
    assert!(
        header_str(&headers, "x-unassign-error-kind").is_none(),
        "the broker's dead letter, not the worker's"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&letters[0].body).unwrap()["request_id"],
        "crash-1"
    );
    assert_eq!(
        u64::from(crashes),
        calls(),
        "one Graph call per crashed delivery"
    );
    assert_eq!(
        crashes,
        DELIVERY_LIMIT + 1,
        "a delivery limit of {DELIVERY_LIMIT} allows that many returns; the next one dead-letters"
    );
    assert!(
        events.all().is_empty(),
        "no outcome event for a crashed request"
    );
    assert_eq!(broker.depth(&settings.amqp.queue).await, 0);
    broker.cleanup().await;
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// A hostile producer (issue 11): AMQP properties and headers are data, never orders.
// Header names are spelt out, so the tests read as what a producer would send.

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
