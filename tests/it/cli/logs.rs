//! What the worker writes to its logs: JSON lines of a traced job carry its trace and span ids at
//! the top level; secrets, tokens, assertions and key material never appear, even at `trace`
//! level and through token errors.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};

use super::*;
use crate::common::SECRET;

/// Log stores link a line to its trace on top-level `trace_id` and `span_id` (Loki's derived
/// fields, Elastic's `trace.id`): every JSON line the worker writes for a job sent with a
/// `traceparent` has them — the producer's trace and the job's own span, the one its outcome
/// event carries on — and a line outside any job has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_of_a_traced_job_carry_its_trace_and_span_ids_at_the_top_level() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("traced"));
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let mut vars = env_for(&sim, &settings);
    vars.push(("UNASSIGN__LOG__FORMAT".into(), "json".into()));
    let (trace_id, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(format!("00-{trace_id}-{parent}-01").into()),
    );
    let body = serde_json::json!({"request_id": "traced-1", "device_id": device()});
    broker
        .publish(
            body.to_string().as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await;
    let child = spawn_worker(&vars);
    let event = events.wait_for(1, WAIT).await[0].event();
    sigterm(&child);
    let (code, _, logs) = wait_exit(child, Duration::from_secs(15)).await;
    assert_eq!(code, 0, "{logs}");

    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let (job, outside): (Vec<_>, Vec<_>) = lines
        .iter()
        .partition(|l| l["span"]["request_id"] == "traced-1");
    assert!(!job.is_empty(), "no line of the job:\n{logs}");
    let continued = event.traceparent.expect("traceparent on the event");
    for line in job {
        assert_eq!(line["trace_id"], trace_id, "{line}");
        let span_id = line["span_id"].as_str().expect("a top-level span_id");
        assert_eq!(line["span"]["span_id"], span_id, "{line}");
        assert_ne!(span_id, parent, "the job is a span of its own: {line}");
        assert_eq!(continued, format!("00-{trace_id}-{span_id}-01"));
    }
    assert!(
        outside
            .iter()
            .any(|l| l.get("trace_id").is_none() && l.get("span_id").is_none()),
        "lines outside a job carry no trace context:\n{logs}"
    );
    broker.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs_even_at_trace_level() {
    let sim = Sim::start(unassign_worker::sim::SimOptions {
        client_secret: "not-yet".into(),
        ..common::sim_options()
    })
    .await
    .unwrap();
    let settings = common::settings(&sim, &common::prefix("secrets"));
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let mut vars = env_for(&sim, &settings);
    vars.push(("RUST_LOG".into(), "trace".into()));
    let child = spawn_worker(&vars);
    broker.publish_request("s-1", &device()).await;
    eventually("a token failure", WAIT, || async {
        (sim.stats().token_failures >= 1).then_some(())
    })
    .await;
    sim.update(|b| b.client_secret = SECRET.to_owned());
    events.wait_for(1, WAIT).await;
    sigterm(&child);
    let (code, _, logs) = wait_exit(child, Duration::from_secs(40)).await;
    assert_eq!(code, 0);
    assert!(logs.contains("token"), "the run logged its token trouble");
    let tokens = sim.issued_tokens();
    assert!(!tokens.is_empty());
    for secret in tokens
        .iter()
        .map(String::as_str)
        .chain([SECRET, "guest:guest"])
    {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
    broker.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assertions_and_keys_never_reach_the_logs_even_at_trace_level() {
    let (pki, sim) = sim_with_certificate().await;
    let subject = unassign_worker::sim::SimOptions::default().federated_subject;
    let pem = TempFile::new(&pki.pem());
    let token = TempFile::new(&sim.federated_token(&subject, 3600));
    let credentials = [
        ("AZURE_CLIENT_CERTIFICATE_PATH", &pem.0),
        ("AZURE_FEDERATED_TOKEN_FILE", &token.0),
    ];
    for (i, (name, path)) in credentials.into_iter().enumerate() {
        let settings = common::settings(&sim, &common::prefix("tracecred"));
        let broker = Broker::connect(&settings).await;
        let events = broker.collect(&settings.amqp.outcomes_queue).await;
        let mut vars = with_credential(&sim, &settings, (name, path));
        vars.push(("RUST_LOG".into(), "trace".into()));
        let child = spawn_worker(&vars);
        broker.publish_request("t-1", &device()).await;
        events.wait_for(1, WAIT).await;
        sigterm(&child);
        let (code, _, logs) = wait_exit(child, Duration::from_secs(40)).await;
        assert_eq!(code, 0, "{name}");
        assert!(
            logs.contains("access token"),
            "{name}: the run logged its token"
        );
        let stats = sim.stats();
        assert_eq!(
            stats.tokens_by_credential.values().sum::<u64>(),
            i as u64 + 1
        );
        let mut secrets = sim.received_assertions();
        secrets.extend(sim.issued_tokens());
        secrets.push(key_material(&pki));
        assert!(!secrets.is_empty());
        for secret in &secrets {
            assert!(
                !logs.contains(secret.as_str()),
                "{name}: a secret reached the logs"
            );
        }
        broker.cleanup().await;
    }
    sim.shutdown().await;
}
