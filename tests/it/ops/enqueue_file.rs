//! `enqueue --file`: every row is validated before any is published, and ten thousand rows are
//! published.

use std::time::Instant;

use super::*;

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
