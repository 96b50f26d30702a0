//! The success path and the failures that need no retry: event fields, ack, dead letters.

use crate::common;

use std::time::Duration;

use common::{Env, device, eventually, schema::Validator};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use unassign_worker::contract::{header_int, header_str};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn success_publishes_one_event_and_drains_the_queue() {
    let env = Env::start("success").await;
    let dev = device();
    env.broker.publish_request("hr-4711", &dev).await;

    let events = env.events.wait_for(1, WAIT).await;
    let received = &events[0];
    assert_eq!(
        received
            .properties
            .content_type()
            .as_ref()
            .unwrap()
            .as_str(),
        "application/cloudevents+json"
    );
    assert_eq!(
        received
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "hr-4711"
    );
    assert_eq!(received.properties.delivery_mode(), &Some(2));
    let event = received.event();
    assert_eq!(
        received.properties.message_id().as_ref().unwrap().as_str(),
        event.id
    );
    assert_eq!(event.specversion, "1.0");
    assert_eq!(event.event_type, "autopilot.unassign.succeeded");
    assert_eq!(event.subject.as_deref(), Some(dev.as_str()));
    assert!(event.source.starts_with("unassign-worker/"));
    let data = &event.data;
    assert_eq!(
        (
            data.request_id.as_str(),
            data.outcome.as_str(),
            data.attempts
        ),
        ("hr-4711", "succeeded", 1)
    );
    assert_eq!(data.device_id.as_deref(), Some(dev.as_str()));
    assert!(data.error.is_none());
    assert!(data.graph_request_id.is_some() && data.client_request_id.is_some());
    assert_eq!(
        (data.requested_by.as_deref(), data.reason.as_deref()),
        (Some("tests"), Some("offboarding"))
    );

    assert_eq!(env.sim.stats().calls_by_device.get(&dev), Some(&1));
    eventually("metrics", WAIT, || async {
        (env.worker
            .metric("unassign_jobs_total{outcome=\"succeeded\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    let queue = env.settings().amqp.queue.clone();
    assert_eq!(env.broker.depth(&queue).await, 0);
    assert_eq!(env.dead.len(), 0);
    assert_eq!(env.worker.get("/healthz").await.0, 200);
    assert_eq!(
        env.worker.get("/readyz").await,
        (200, r#"{"ready":true}"#.to_owned())
    );
    env.finish().await;
}

#[tokio::test]
async fn reply_to_and_traceparent_are_honoured() {
    let env = Env::start("replyto").await;
    let reply_queue = format!("{}.replies", env.settings().amqp.queue);
    let channel = env.broker.connection.create_channel().await.unwrap();
    let options = lapin::options::QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    channel
        .queue_declare(reply_queue.as_str().into(), options, FieldTable::default())
        .await
        .unwrap();
    let replies = env.broker.collect(&reply_queue).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    let body = serde_json::json!({"device_id": device()}).to_string();
    let properties = BasicProperties::default()
        .with_message_id("msg-id-as-request-id".into())
        .with_reply_to(reply_queue.as_str().into())
        .with_headers(headers);
    env.broker.publish(body.as_bytes(), properties).await;

    let reply = &replies.wait_for(1, WAIT).await[0];
    let event = reply.event();
    assert_eq!(
        event.data.request_id, "msg-id-as-request-id",
        "message-id is the fallback id"
    );
    // The job continues the producer's trace as a span of its own: same trace id, new span id.
    let continued = event.traceparent.clone().expect("traceparent on the event");
    assert!(
        continued.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{continued}"
    );
    assert_ne!(continued, traceparent);
    assert_eq!(
        header_str(&reply.header(), "traceparent").as_deref(),
        Some(continued.as_str())
    );
    assert_eq!(
        env.events.wait_for(1, WAIT).await[0].event().id,
        event.id,
        "same event on both routes"
    );
    env.finish().await;
}

#[tokio::test]
async fn unknown_device_fails_with_device_not_found_and_is_dead_lettered() {
    let known = device();
    let file = std::env::temp_dir().join(format!("devices-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, serde_json::json!([{"id": known, "serialNumber": "SN-1", "userPrincipalName": "a@contoso.com"}]).to_string()).unwrap();
    let sim = unassign_worker::sim::SimOptions {
        devices: Some(file.clone()),
        ..common::sim_options()
    };
    let env = Env::start_with("notfound", sim, |_| {}).await;
    let unknown = device();
    env.broker.publish_request("gone-1", &unknown).await;
    env.broker.publish_request("known-1", &known).await;

    let events = env.events.wait_for(2, WAIT).await;
    let failed = events
        .iter()
        .map(|e| e.event())
        .find(|e| e.data.request_id == "gone-1")
        .unwrap();
    assert_eq!(failed.event_type, "autopilot.unassign.failed");
    let error = failed.data.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "device_not_found");
    assert_eq!(error.http_status, Some(404));
    assert_eq!(error.graph_code.as_deref(), Some("ResourceNotFound"));
    assert!(
        error.message.contains("An error has occurred"),
        "Intune's wrapped message unwrapped: {}",
        error.message
    );
    assert_eq!(failed.data.attempts, 1);

    let dead = &env.dead.wait_for(1, WAIT).await[0];
    assert_eq!(dead.json()["request_id"], "gone-1", "the original body");
    assert_eq!(
        dead.properties.content_type().as_ref().unwrap().as_str(),
        "application/json",
        "original properties"
    );
    let h = dead.header();
    assert_eq!(
        header_str(&h, "x-unassign-error-kind").as_deref(),
        Some("device_not_found")
    );
    assert!(header_str(&h, "x-unassign-error-message").is_some());
    assert_eq!(header_int(&h, "x-unassign-http-status"), Some(404));
    assert_eq!(header_int(&h, "x-unassign-attempts"), Some(1));
    assert!(header_str(&h, "x-unassign-failed-at").is_some());
    assert_eq!(header_int(&h, "x-unassign-replay-count"), Some(0));
    eventually("dead-letter metric", WAIT, || async {
        (env.worker
            .metric("unassign_dead_letters_total{kind=\"device_not_found\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(env.dead.len(), 1, "the known device succeeded");
    env.finish().await;
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn invalid_messages_are_dead_lettered_and_the_worker_keeps_going() {
    let env = Env::start("invalid").await;
    let with_id = BasicProperties::default().with_message_id("m-1".into());
    env.broker.publish(b"{not json", with_id).await;
    env.broker
        .publish(b"\"no id anywhere\"", BasicProperties::default())
        .await;
    let injection = serde_json::json!({"request_id": "inj-1", "device_id": "../../me"}).to_string();
    env.broker
        .publish(injection.as_bytes(), BasicProperties::default())
        .await;
    let serial =
        serde_json::json!({"request_id": "ser-1", "serial_number": "SN\u{7}1"}).to_string();
    env.broker
        .publish(serial.as_bytes(), BasicProperties::default())
        .await;
    env.broker.publish_request("ok-1", &device()).await;

    let dead = env.dead.wait_for(4, WAIT).await;
    let events = env.events.wait_for(4, WAIT).await;
    let by_id = |id: &str| {
        events
            .iter()
            .map(|e| e.event())
            .find(|e| e.data.request_id == id)
            .unwrap_or_else(|| panic!("no event for {id}"))
    };
    for id in ["m-1", "inj-1", "ser-1"] {
        let event = by_id(id);
        assert_eq!(
            event.data.error.as_ref().unwrap().kind.as_str(),
            "invalid_request",
            "{id}"
        );
        assert!(
            event.subject.is_none(),
            "untrusted input is never the subject"
        );
        assert_eq!(event.data.attempts, 0);
    }
    assert!(
        by_id("ser-1")
            .data
            .error
            .unwrap()
            .message
            .contains("control characters")
    );
    assert!(by_id("inj-1").data.error.unwrap().message.contains("GUID"));
    assert_eq!(by_id("ok-1").data.outcome, "succeeded");
    assert!(
        dead.iter().any(|d| d.body == b"\"no id anywhere\""),
        "dead-lettered without an event"
    );
    for d in &dead {
        assert_eq!(
            header_str(&d.header(), "x-unassign-error-kind").as_deref(),
            Some("invalid_request")
        );
        assert_eq!(header_int(&d.header(), "x-unassign-http-status"), None);
    }
    let stats = env.sim.stats();
    assert_eq!(
        stats.action_calls, 1,
        "only the valid request reached Graph"
    );
    assert!(
        stats.unexpected_requests.is_empty(),
        "{:?}",
        stats.unexpected_requests
    );
    assert_eq!(env.events.len(), 4);
    env.finish().await;
}

/// A validator for one of the JSON Schemas in `docs/schemas/`, formats (`date-time`) checked.
fn schema(name: &str) -> Validator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/schemas")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let schema: serde_json::Value = serde_json::from_str(&text).expect("the schema is JSON");
    Validator::new(schema)
        .unwrap_or_else(|e| panic!("{name} is not a valid draft 2020-12 schema: {e}"))
}

/// The request schema accepts what the worker's parser accepts and refuses what it refuses
/// (beyond what a schema cannot say: the size limit, duplicate keys, `null` as absent).
#[test]
fn the_request_schema_agrees_with_the_parser() {
    use serde_json::json;
    let validator = schema("request.schema.json");
    let guid = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
    let cases = [
        json!({"request_id": "hr-1", "device_id": guid}),
        json!({"device_id": guid.to_uppercase()}),
        json!({"request_id": "a.b:c_d-E9", "serial_number": "PF-3ABCDE-12", "unknown": [1]}),
        json!({"user_principal_name": "Ann@Contoso.com", "tenant_id": guid}),
        json!({"device_id": guid, "requested_by": "w", "reason": "r".repeat(1024)}),
        json!({"device_id": guid, "not_after": "2026-12-31T23:59:59.5+01:00"}),
        json!({"device_id": guid, "reason": "r".repeat(1025)}),
        json!({"device_id": guid, "requested_by": ""}),
        json!({"device_id": format!("{{{guid}}}")}),
        json!({"device_id": format!(" {guid}")}),
        json!({"device_id": "7b7c4c1e6f5a4c399a432b1e5b0c1d2e"}),
        json!({"device_id": guid, "serial_number": "SN"}),
        json!({"request_id": "hr-1"}),
        json!({"serial_number": "SN\u{7}1"}),
        json!({"serial_number": "S".repeat(129)}),
        json!({"user_principal_name": "ann"}),
        json!({"user_principal_name": "a@b@c"}),
        json!({"user_principal_name": "@contoso.com"}),
        json!({"device_id": guid, "tenant_id": "contoso"}),
        json!({"device_id": guid, "not_after": "tomorrow"}),
        json!({"request_id": "hr 1", "device_id": guid}),
        json!({"request_id": "r".repeat(129), "device_id": guid}),
        json!({"request_id": 4711, "device_id": guid}),
        json!({"device_id": 7}),
        json!([{"device_id": guid}]),
    ];
    for body in cases {
        let parsed =
            unassign_worker::contract::parse_request(body.to_string().as_bytes(), Some("m"));
        assert_eq!(
            validator.is_valid(&body),
            parsed.is_ok(),
            "{body}: schema {:?}, parser {parsed:?}",
            validator.errors(&body)
        );
    }
}

/// Real messages the worker produced — events of every kind of request and outcome, and the
/// dead letters — validate against `docs/schemas/`, as a producer's or consumer's tools would.
#[tokio::test]
async fn real_requests_and_events_validate_against_the_published_schemas() {
    use serde_json::json;
    use unassign_worker::sim::{Device, SimOptions};

    let requests = schema("request.schema.json");
    let events_schema = schema("event.schema.json");
    let (ann_1, ann_2, dup_1, dup_2) = (device(), device(), device(), device());
    let inventory = vec![
        Device::new(&ann_1, "SN-1", "ann@contoso.com"),
        Device::new(&ann_2, "SN-2", "Ann@Contoso.com"),
        Device::new(&dup_1, "DUP-9", ""),
        Device::new(&dup_2, "DUP-9", ""),
    ];
    let sim = SimOptions {
        inventory: Some(inventory),
        ..common::sim_options()
    };
    let env = Env::start_with("schemas", sim, |_| {}).await;
    let valid = [
        json!({"request_id": "s-device", "device_id": dup_1, "requested_by": "hr", "reason": "left"}),
        json!({"request_id": "s-serial", "serial_number": "sn-2"}),
        json!({"request_id": "s-user", "user_principal_name": "ANN@contoso.com", "not_after": "2099-01-01T00:00:00Z"}),
        json!({"request_id": "s-nobody", "user_principal_name": "nobody@contoso.com"}),
        json!({"request_id": "s-unknown", "device_id": device()}),
        json!({"request_id": "s-ambiguous", "serial_number": "DUP-9"}),
    ];
    let invalid = json!({"request_id": "s-invalid", "device_id": "{not-a-guid}", "reason": "x"});
    for body in &valid {
        let errors = requests.errors(body);
        assert!(errors.is_empty(), "{body}: {errors:?}");
    }
    assert!(
        !requests.is_valid(&invalid),
        "the schema refuses what the worker refuses"
    );

    let mut headers = FieldTable::default();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    for body in valid.iter().chain([&invalid]) {
        let properties = BasicProperties::default().with_headers(headers.clone());
        env.broker
            .publish(body.to_string().as_bytes(), properties)
            .await;
    }

    let events = env.events.wait_for(valid.len() + 1, WAIT).await;
    let mut outcomes = std::collections::BTreeMap::new();
    for received in &events {
        let event = received.json();
        let errors = events_schema.errors(&event);
        assert!(errors.is_empty(), "{event:#}\n{errors:?}");
        let data = &event["data"];
        let kind = data["error"]["kind"].as_str().unwrap_or("succeeded");
        outcomes.insert(
            data["request_id"].as_str().unwrap().to_owned(),
            kind.to_owned(),
        );
    }
    let expected = [
        ("s-ambiguous", "ambiguous_device"),
        ("s-device", "succeeded"),
        ("s-invalid", "invalid_request"),
        ("s-nobody", "succeeded"),
        ("s-serial", "succeeded"),
        ("s-unknown", "device_not_found"),
        ("s-user", "succeeded"),
    ];
    let expected = expected.map(|(id, kind)| (id.to_owned(), kind.to_owned()));
    assert_eq!(
        outcomes,
        expected.into_iter().collect(),
        "every kind of outcome was seen"
    );

    // A dead letter is the request as the producer sent it: the schema holds for it as well.
    let dead = env.dead.wait_for(3, WAIT).await;
    for letter in &dead {
        let body = letter.json();
        let headers = letter.header();
        let kind = header_str(&headers, "x-unassign-error-kind").expect("error kind");
        assert_eq!(
            requests.is_valid(&body),
            kind != "invalid_request",
            "{kind}: {body}"
        );
    }
    env.finish().await;
}
