//! `enqueue`: a request is validated and published with a confirm, by device id, serial number or
//! user, or read from stdin as JSON Lines or CSV, with a JSON report on request.

use std::io::Write as _;

use serde_json::Value;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_validates_and_publishes_with_confirm() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("enqueue"));
    let vars = env_for(&sim, &settings);
    let (code, _, err) = output(command(&vars).args(["enqueue", "--device-id", "../../me"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("GUID"), "{err}");

    let dev = device();
    let (code, out, err) = output(command(&vars).args([
        "enqueue",
        "--device-id",
        &dev,
        "--request-id",
        "cli-1",
        "--reason",
        "left",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cli-1"), "{out}");
    let broker = Broker::connect(&settings).await;
    assert_eq!(broker.depth(&settings.amqp.queue).await, 1);
    broker.cleanup().await;
    sim.shutdown().await;
}

/// Runs `cmd` with `input` on its stdin: exit code, stdout, stderr.
fn output_with_stdin(cmd: &mut Command, input: &str) -> (i32, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_by_serial_or_user_and_from_stdin_with_json_output() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("enqueuejson"));
    let vars = env_for(&sim, &settings);
    for (flag, value) in [
        ("--serial-number", "5CG1234XYZ"),
        ("--user", "leaver@contoso.com"),
    ] {
        let (code, out, err) = output(command(&vars).args([
            "enqueue",
            flag,
            value,
            "--request-id",
            "j-1",
            "-o",
            "json",
        ]));
        assert_eq!(code, 0, "{flag}: {err}");
        let report: Value = serde_json::from_str(&out).expect("one JSON document");
        assert_eq!(
            (&report["published"], &report["skipped"]),
            (&1.into(), &0.into())
        );
        assert_eq!(report["request_id"], "j-1", "{out}");
        assert!(report["seconds"].is_f64(), "{out}");
    }
    // The worker's own validation, for these targets too.
    let (code, _, err) = output(command(&vars).args(["enqueue", "--serial-number", ""]));
    assert_eq!(code, 2, "{err}");

    // stdin: JSON Lines recognised by its first `{`, CSV by anything else.
    let jsonl = format!(
        "{{\"request_id\":\"s-1\",\"device_id\":\"{}\"}}\n{{\"request_id\":\"s-2\",\"user_principal_name\":\"a@contoso.com\"}}\n",
        device()
    );
    let csv = format!("request_id,device_id\ns-3,{}\n", device());
    for (input, n) in [(jsonl.as_str(), 2), (csv.as_str(), 1)] {
        let (code, out, err) = output_with_stdin(
            command(&vars).args(["enqueue", "--file", "-", "-o", "json"]),
            input,
        );
        assert_eq!(code, 0, "{err}");
        let report: Value = serde_json::from_str(&out).expect("one JSON document");
        assert_eq!(report["published"], n, "{out}");
        assert!(report.get("request_id").is_none(), "{out}");
    }
    let (code, _, err) = output_with_stdin(
        command(&vars).args(["enqueue", "--file", "-", "--format", "csv"]),
        &jsonl,
    );
    assert_eq!(code, 2, "--format wins over the sniff: {err}");

    let broker = Broker::connect(&settings).await;
    assert_eq!(broker.depth(&settings.amqp.queue).await, 5);
    broker.cleanup().await;
    sim.shutdown().await;
}
