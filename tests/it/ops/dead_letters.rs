//! `dlq list` and `dlq replay`: the list shows worker-made and broker-made dead letters and
//! keeps them all; a replay moves exactly what its filters select, clears the failure and counts
//! the replay; interrupted between its publish and its ack, it duplicates and never loses.

use std::ops::ControlFlow;

use unassign_worker::{
    contract::{header_int, header_str, headers},
    ops::dlq::{DELIVERY_LIMIT, DlqError, Filter},
};

use super::*;

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
