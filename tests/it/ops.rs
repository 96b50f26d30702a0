//! The operator commands against the real broker: `dlq list` loses nothing and tells worker-made
//! from broker-made dead letters; `dlq replay` moves exactly what its filters select, clears
//! the failure and counts the replay, and duplicates rather than loses when interrupted;
//! `enqueue --file` validates every row before publishing any.

use crate::common;

use std::{
    collections::BTreeSet,
    ops::ControlFlow,
    time::{Duration, Instant},
};

use common::{
    Broker, Worker,
    bin::{command, env_for, output},
    device, eventually,
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicConsumeOptions, BasicGetOptions, BasicNackOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use unassign_worker::{
    config::Settings,
    contract::{self, ErrorKind, Failure, header_int, header_str, headers},
    ops::dlq::{self, DELIVERY_LIMIT, DeadLetter, DlqError, Filter, ReplayOptions},
    sim::{Scripted, Sim},
};

const WAIT: Duration = Duration::from_secs(30);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A simulator, the test's broker objects (delivery limit 2) and no worker running.
struct Ops {
    sim: Sim,
    broker: Broker,
}

impl Ops {
    async fn start(test: &str) -> Ops {
        let sim = Sim::start(common::sim_options()).await.unwrap();
        let mut settings = common::settings(&sim, &common::prefix(test));
        settings.amqp.delivery_limit = 2;
        let broker = Broker::connect(&settings).await;
        Ops { sim, broker }
    }

    fn settings(&self) -> &Settings {
        &self.broker.settings
    }

    fn dead(&self) -> String {
        self.settings().amqp.dead_letter_queue.clone()
    }

    fn requests(&self) -> String {
        self.settings().amqp.queue.clone()
    }

    fn env(&self) -> Vec<(String, String)> {
        env_for(&self.sim, self.settings())
    }

    async fn depth_becomes(&self, queue: &str, n: u32) {
        eventually(&format!("{queue} to hold {n}"), WAIT, || async {
            (self.broker.depth(queue).await == n).then_some(())
        })
        .await;
    }

    /// The crash-loop guard at work: a consumer that rejects with requeue until the broker
    /// dead-letters the request itself (x-death reason `delivery_limit`).
    async fn broker_dead_letter(&self, request_id: &str) {
        let before = self.broker.depth(&self.dead()).await;
        self.broker.publish_request(request_id, &device()).await;
        let channel = self.broker.connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                self.requests().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let rejecter = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                let _ = delivery.nack(requeue).await;
            }
        });
        self.depth_becomes(&self.dead(), before + 1).await;
        rejecter.abort();
        let _ = channel.close(200, "".into()).await;
    }

    /// Requests the worker fails with `device_not_found` (graph-sim scripted to answer 404).
    async fn worker_dead_letters(&self, ids: &[&str]) {
        let before = self.broker.depth(&self.dead()).await;
        self.sim.push_script(ids.iter().map(|_| Scripted {
            status: 404,
            retry_after: None,
            delay_ms: 0,
        }));
        let worker = Worker::start(self.settings().clone()).await;
        worker.wait_ready().await;
        for id in ids {
            let mut table = FieldTable::default();
            table.insert(
                "traceparent".into(),
                AMQPValue::LongString(TRACEPARENT.into()),
            );
            let body = serde_json::json!({"request_id": id, "device_id": device()});
            self.broker
                .publish(
                    body.to_string().as_bytes(),
                    BasicProperties::default().with_headers(table),
                )
                .await;
        }
        self.depth_becomes(&self.dead(), before + ids.len() as u32)
            .await;
        worker.stop().await;
    }

    /// A dead letter as the worker writes it, published straight to the DLX.
    async fn manufactured_dead_letter(&self, request_id: &str) {
        let failure = Failure::new(ErrorKind::RetriesExhausted, "retry budget spent");
        let now = time::OffsetDateTime::now_utc();
        let table = contract::dead_letter_headers(None, &failure, 20, now);
        let body = serde_json::json!({"request_id": request_id, "device_id": device()});
        let a = &self.settings().amqp;
        self.broker
            .publisher()
            .await
            .publish(
                &a.dead_letter_exchange,
                "",
                body.to_string().as_bytes(),
                contract_properties(request_id).with_headers(table),
                true,
            )
            .await
            .unwrap();
    }

    async fn connection(&self) -> Connection {
        Connection::connect(&common::amqp_url(), ConnectionProperties::default())
            .await
            .unwrap()
    }

    async fn browse(&self) -> Vec<DeadLetter> {
        let connection = self.connection().await;
        let listing = dlq::browse(&connection, &self.settings().amqp, None)
            .await
            .unwrap();
        let _ = connection.close(200, "".into()).await;
        listing.letters
    }

    async fn replay(&self, options: ReplayOptions) -> Vec<String> {
        let connection = self.connection().await;
        let mut moved = Vec::new();
        dlq::replay(&connection, &self.settings().amqp, &options, |l| {
            moved.push(l.request_id.clone().unwrap())
        })
        .await
        .unwrap();
        let _ = connection.close(200, "".into()).await;
        moved.sort();
        moved
    }

    /// Every message in `queue` (body, properties, redelivered), handed back afterwards.
    async fn peek(&self, queue: &str) -> Vec<(Value, BasicProperties, bool)> {
        let channel = self.broker.connection.create_channel().await.unwrap();
        let mut seen = Vec::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let d = m.delivery;
            seen.push((
                serde_json::from_slice(&d.data).unwrap(),
                d.properties,
                d.redelivered,
            ));
        }
        let _ = channel.close(200, "".into()).await;
        seen
    }

    async fn finish(self) {
        self.broker.cleanup().await;
        self.sim.shutdown().await;
    }
}

fn contract_properties(request_id: &str) -> BasicProperties {
    unassign_worker::ops::batch::request_properties(request_id)
}

fn ids(letters: &[DeadLetter]) -> BTreeSet<String> {
    letters
        .iter()
        .filter_map(|l| l.request_id.clone())
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_shows_worker_and_broker_dead_letters_and_keeps_them_all() {
    let ops = Ops::start("dlqlist").await;
    ops.broker_dead_letter("limit-1").await;
    ops.worker_dead_letters(&["nf-1", "nf-2", "nf-3"]).await;
    let dead = ops.dead();
    let all = set(&["limit-1", "nf-1", "nf-2", "nf-3"]);

    let first = ops.browse().await;
    assert_eq!(ids(&first), all);
    ops.depth_becomes(&dead, 4).await;
    let limit = first
        .iter()
        .find(|l| l.error_kind == DELIVERY_LIMIT)
        .unwrap();
    assert_eq!(limit.request_id.as_deref(), Some("limit-1"));
    assert_eq!(
        (limit.http_status, limit.attempts, limit.replay_count),
        (None, None, 0)
    );
    assert!(
        limit.failed_at.is_some() && limit.message.as_ref().unwrap().contains("x-delivery-limit")
    );
    let nf = first
        .iter()
        .find(|l| l.request_id.as_deref() == Some("nf-1"))
        .unwrap();
    assert_eq!(
        (nf.error_kind.as_str(), nf.http_status, nf.attempts),
        ("device_not_found", Some(404), Some(1))
    );

    // Listing again sees the same messages, in the same order (quorum queues return unacked
    // messages ahead of the rest, in their original order).
    let second = ops.browse().await;
    let order = |ls: &[DeadLetter]| ls.iter().map(|l| l.request_id.clone()).collect::<Vec<_>>();
    assert_eq!(order(&second), order(&first));

    let (code, out, err) = output(command(&ops.env()).args(["dlq", "list", "--json"]));
    assert_eq!(code, 0, "{err}");
    let (code, same, err) = output(command(&ops.env()).args(["dlq", "list", "-o", "json"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&same).unwrap(),
        serde_json::from_str::<Value>(&out).unwrap(),
        "--json is -o json"
    );
    let json: Vec<Value> = serde_json::from_str(&out).expect("one JSON array");
    let keys: BTreeSet<&str> = json[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let expected = [
        "request_id",
        "error_kind",
        "http_status",
        "attempts",
        "failed_at",
        "message",
        "replay_count",
    ];
    assert_eq!(keys, expected.into_iter().collect());
    let listed: BTreeSet<String> = json
        .iter()
        .map(|o| o["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, all);

    let (code, out, err) = output(command(&ops.env()).args(["dlq", "list", "--limit", "2"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 4, "header, 2 rows, summary: {out}");
    assert!(out.contains("2 of 4 dead letter(s)"), "{out}");
    ops.depth_becomes(&dead, 4).await;
    assert_eq!(ids(&ops.browse().await), all, "nothing lost");
    ops.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_moves_exactly_what_its_filters_select() {
    let ops = Ops::start("dlqreplay").await;
    ops.broker_dead_letter("limit-1").await;
    ops.worker_dead_letters(&["nf-1", "nf-2", "nf-3", "nf-4"])
        .await;
    let (dead, requests) = (ops.dead(), ops.requests());
    let kind = |k: &str| Filter {
        error_kind: Some(k.to_owned()),
        ..Filter::default()
    };

    let moved = ops
        .replay(ReplayOptions {
            filter: kind(DELIVERY_LIMIT),
            ..Default::default()
        })
        .await;
    assert_eq!(moved, ["limit-1"]);
    ops.depth_becomes(&dead, 4).await;
    ops.depth_becomes(&requests, 1).await;

    let (code, out, err) =
        output(command(&ops.env()).args(["dlq", "replay", "--request-id", "nf-2", "--verbose"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("replayed nf-2 (device_not_found, replay #1)"),
        "{out}"
    );
    assert!(out.contains("replayed 1 of 4"), "{out}");
    ops.depth_becomes(&dead, 3).await;

    // `-o json`: the summary and each letter, as `dlq list` shows them.
    let (code, out, err) = output(command(&ops.env()).args([
        "dlq",
        "replay",
        "--error-kind",
        "device_not_found",
        "--dry-run",
        "-o",
        "json",
    ]));
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(
        (
            &report["dry_run"],
            &report["total"],
            &report["examined"],
            &report["replayed"],
            &report["left"],
            &report["more"]
        ),
        (
            &Value::Bool(true),
            &3.into(),
            &3.into(),
            &3.into(),
            &3.into(),
            &Value::Bool(false)
        ),
        "{out}"
    );
    let letters = report["letters"].as_array().unwrap();
    assert!(
        letters
            .iter()
            .all(|l| l["error_kind"] == "device_not_found" && l["replay_count"] == 1),
        "{out}"
    );

    let (code, out, err) = output(command(&ops.env()).args([
        "dlq",
        "replay",
        "--error-kind",
        "device_not_found",
        "--dry-run",
    ]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("would replay nf-").count(), 3, "{out}");
    ops.depth_becomes(&dead, 3).await;
    ops.depth_becomes(&requests, 2).await;

    let moved = ops
        .replay(ReplayOptions {
            filter: kind("device_not_found"),
            limit: Some(2),
            ..Default::default()
        })
        .await;
    assert_eq!(moved.len(), 2);
    ops.depth_becomes(&dead, 1).await;
    ops.depth_becomes(&requests, 4).await;
    let left = ids(&ops.browse().await);
    assert_eq!(left.len(), 1);
    assert!(
        left.iter()
            .all(|id| id.starts_with("nf-") && !moved.contains(id) && id != "nf-2")
    );

    // The replayed copies: failure, retry state and broker history gone, replay counted,
    // the rest of the headers (traceparent) kept.
    for (body, properties, _) in ops.peek(&requests).await {
        let h = properties.headers().clone().unwrap_or_default();
        let id = body["request_id"].as_str().unwrap().to_owned();
        assert_eq!(header_int(&h, headers::REPLAY_COUNT), Some(1), "{id}");
        for gone in [
            headers::ERROR_KIND,
            headers::ERROR_MESSAGE,
            headers::HTTP_STATUS,
            headers::FAILED_AT,
            headers::ATTEMPTS,
            headers::FIRST_RECEIVED_AT,
            headers::RETRY_AT,
            "x-death",
            "x-first-death-reason",
            "x-last-death-reason",
        ] {
            assert!(!h.contains_key(gone), "{id} still has {gone}: {h:?}");
        }
        // The broker sets this on every delivery (this peek included): the old count is gone.
        assert_eq!(header_int(&h, "x-delivery-count").unwrap_or(0), 0, "{id}");
        if id.starts_with("nf-") {
            assert!(
                header_str(&h, "traceparent").is_some(),
                "{id} lost its traceparent"
            );
        }
        assert_eq!(properties.delivery_mode(), &Some(2));
    }

    // A running worker now does them (graph-sim answers 204 once its script is spent), with
    // a fresh attempt count: stale budgets did not follow the replay.
    let events = ops
        .broker
        .collect(&ops.settings().amqp.outcomes_queue)
        .await;
    let worker = Worker::start(ops.settings().clone()).await;
    let done = eventually("4 replayed jobs to succeed", WAIT, || async {
        let succeeded: Vec<_> = events
            .all()
            .iter()
            .map(|e| e.event())
            .filter(|e| e.event_type == contract::EVENT_SUCCEEDED)
            .collect();
        (succeeded.len() == 4).then_some(succeeded)
    })
    .await;
    assert!(done.iter().all(|e| e.data.attempts == 1), "{done:?}");
    worker.stop().await;
    assert_eq!(ops.broker.depth(&requests).await, 0);
    assert_eq!(ops.broker.depth(&dead).await, 1);

    // No filter moves everything: without a terminal to ask on, only with --yes.
    let (code, out, err) = output(command(&ops.env()).args(["dlq", "replay"]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--yes"), "says how: {err}");
    assert_eq!(ops.broker.depth(&dead).await, 1, "nothing moved");
    let (code, out, err) =
        output(command(&ops.env()).args(["dlq", "replay", "--yes", "-o", "json"]));
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(
        (&report["replayed"], &report["left"]),
        (&1.into(), &0.into())
    );
    ops.depth_becomes(&dead, 0).await;
    ops.depth_becomes(&requests, 1).await;
    ops.finish().await;
}

#[tokio::test]
async fn a_replay_interrupted_between_publish_and_ack_duplicates_and_never_loses() {
    let ops = Ops::start("dlqcrash").await;
    ops.manufactured_dead_letter("crash-1").await;
    let (dead, requests) = (ops.dead(), ops.requests());
    ops.depth_becomes(&dead, 1).await;

    let connection = ops.connection().await;
    let options = ReplayOptions {
        before_ack: Some(Box::new(|_| ControlFlow::Break(()))),
        ..Default::default()
    };
    let result = dlq::replay(&connection, &ops.settings().amqp, &options, |_| {}).await;
    assert!(matches!(result, Err(DlqError::Interrupted)), "{result:?}");
    // The process "dies" here: its connection goes, the unacked dead letter goes back.
    drop(connection);

    ops.depth_becomes(&requests, 1).await;
    ops.depth_becomes(&dead, 1).await;
    let back = ops.peek(&dead).await;
    assert_eq!(back[0].0["request_id"], "crash-1");
    assert!(
        back[0].2,
        "the dead letter was delivered before and is redelivered"
    );
    let replayed = ops.peek(&requests).await;
    assert_eq!(replayed[0].0["request_id"], "crash-1");
    ops.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_file_validates_every_row_before_publishing_any() {
    let ops = Ops::start("enqfile").await;
    let dir = tempdir();
    let csv = dir.join("jobs.csv");
    let (a, b) = (device(), device());
    std::fs::write(
        &csv,
        format!("request_id,device_id,reason\nf-1,{a},left\nf-2,not-a-guid,left\n,{b},\n"),
    )
    .unwrap();
    let requests = ops.requests();

    let (code, _, err) = output(command(&ops.env()).arg("enqueue").arg("--file").arg(&csv));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 3: device_id must be a GUID"), "{err}");
    assert_eq!(ops.broker.depth(&requests).await, 0, "nothing published");

    let (code, out, err) = output(
        command(&ops.env())
            .arg("enqueue")
            .arg("--file")
            .arg(&csv)
            .arg("--skip-invalid"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipped line 3"), "{err}");
    assert!(out.contains("published 2, skipped 1"), "{out}");
    ops.depth_becomes(&requests, 2).await;

    let jsonl = dir.join("jobs.txt");
    let lines = [
        serde_json::json!({"request_id": "j-1", "device_id": device(), "requested_by": "hr"}),
        serde_json::json!({"device_id": device()}),
    ];
    std::fs::write(&jsonl, lines.map(|l| l.to_string()).join("\n")).unwrap();
    let (code, _, err) = output(command(&ops.env()).arg("enqueue").arg("--file").arg(&jsonl));
    assert_eq!(code, 2, "an unknown extension needs --format: {err}");
    let (code, out, err) = output(
        command(&ops.env())
            .arg("enqueue")
            .arg("--file")
            .arg(&jsonl)
            .args(["--format", "jsonl"]),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published 2, skipped 0"), "{out}");
    ops.depth_becomes(&requests, 4).await;

    let published = ops.peek(&requests).await;
    let by_id = |id: &str| {
        published
            .iter()
            .find(|(b, _, _)| b["request_id"] == id)
            .unwrap()
    };
    let (body, properties, _) = by_id("j-1");
    assert_eq!(body["requested_by"], "hr");
    assert_eq!(properties.message_id().as_ref().unwrap().as_str(), "j-1");
    assert_eq!(
        properties.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(properties.delivery_mode(), &Some(2));
    assert!(
        published.iter().all(|(b, p, _)| {
            b["request_id"].as_str() == p.message_id().as_ref().map(|m| m.as_str())
        }),
        "generated ids are in the body and the message-id"
    );

    let (code, _, err) = output(
        command(&ops.env())
            .args(["enqueue", "--device-id", &a])
            .arg("--file")
            .arg(&csv),
    );
    assert_eq!(code, 2, "--device-id and --file exclude each other: {err}");
    let mut env = ops.env();
    env.push((
        "UNASSIGN__AMQP__DEAD_LETTER_QUEUE".into(),
        "no.such.queue".into(),
    ));
    let (code, _, err) = output(command(&env).args(["dlq", "list"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("amqp.dead_letter_queue"), "{err}");
    ops.finish().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_file_publishes_ten_thousand_rows() {
    let ops = Ops::start("enq10k").await;
    let dir = tempdir();
    let csv = dir.join("bulk.csv");
    let rows: String = (0..10_000)
        .map(|i| format!("bulk-{i},{}\n", device()))
        .collect();
    std::fs::write(&csv, format!("request_id,device_id\n{rows}")).unwrap();
    let started = Instant::now();
    let (code, out, err) = output(command(&ops.env()).arg("enqueue").arg("--file").arg(&csv));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published 10000, skipped 0"), "{out}");
    assert!(
        err.contains("confirmed 10000/10000 (100%)"),
        "plain progress off a terminal: {err}"
    );
    ops.depth_becomes(&ops.requests(), 10_000).await;
    eprintln!("10,000 rows enqueued in {:?}", started.elapsed());
    ops.finish().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A fresh directory for this test's files.
fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("unassign-ops-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
