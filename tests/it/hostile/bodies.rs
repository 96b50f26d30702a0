//! Poison bodies: a thousand random bodies, injected device ids and spoilt requests, each
//! dead-lettered once and unchanged as `invalid_request` without a Graph call; a 10 MiB body
//! refused unparsed, correlated through its message-id. The worker serves a valid request after.

use futures_util::{StreamExt, stream};
use rand::{RngExt, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use unassign_worker::contract::{MAX_BODY_BYTES, parse_request};

use super::*;

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
