//! The intake as a process (the binary's `intake` command): SIGTERM during a batch over a slow
//! broker link loses nothing and exits 0, its JSON log naming the answer but never the token;
//! without credentials, or with a weak secret, it exits 2 naming the keys.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
};

use super::*;
use crate::common::relay::Relay;

/// The binary as a process: a 100-item batch is in flight over a slow broker link when
/// SIGTERM arrives; the post still gets its 202, every message is in the queue, exit 0.
#[tokio::test]
async fn sigterm_during_a_batch_loses_nothing() {
    let (sim, broker, requests) = broker_only("intake-sigterm").await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let (settings, _files) = intake_settings(&broker.settings);
    let (listen, ops) = (common::free_port(), common::free_port());
    let mut vars = common::bin::env_for(&sim, &broker.settings);
    vars.retain(|(k, _)| k != "AMQP_URL");
    vars.extend(
        [
            ("AMQP_URL", format!("amqp://guest:guest@{}/%2f", relay.addr)),
            ("UNASSIGN__INTAKE__LISTEN", format!("127.0.0.1:{listen}")),
            (
                "UNASSIGN__INTAKE__METRICS_LISTEN",
                format!("127.0.0.1:{ops}"),
            ),
            (
                "UNASSIGN__INTAKE__BEARER_TOKEN_FILE",
                settings
                    .intake
                    .bearer_token_file
                    .unwrap()
                    .display()
                    .to_string(),
            ),
            ("UNASSIGN__INTAKE__PUBLISH_TIMEOUT_SECS", "20".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let mut child = common::bin::command(&vars)
        .arg("intake")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the intake starts");
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
        logs
    });
    let mut intake = ProcessIntake(child);
    let base = format!("http://127.0.0.1:{ops}");
    eventually("the intake process ready", WAIT, || async {
        (get(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;

    relay.slow(Duration::from_millis(300));
    let items: Vec<Value> = (0..100).map(|i| request(&format!("term-{i}"))).collect();
    let post = tokio::spawn(
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{listen}/v1/requests"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(json!(items).to_string())
            .send(),
    );
    eventually("the post in flight", WAIT, || async {
        let (_, text) = get(&format!("{base}/metrics")).await;
        text.lines()
            .any(|l| l == "unassign_intake_inflight_posts 1")
            .then_some(())
    })
    .await;
    let pid = intake.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );

    let response = post.await.unwrap().expect("the post is answered");
    assert_eq!(response.status(), 202);
    relay.slow(Duration::ZERO);
    let status = tokio::task::spawn_blocking(move || intake.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let ids: BTreeSet<String> = requests
        .wait_for(100, WAIT)
        .await
        .iter()
        .map(request_id)
        .collect();
    assert_eq!(ids.len(), 100, "every message of the batch is in the queue");

    // JSON logs: the post's answer under its request id; never the token.
    let logs = logs.join().unwrap();
    assert!(!logs.contains(TOKEN), "a bearer token in the logs:\n{logs}");
    let answered: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "answered")
        .collect();
    assert_eq!(answered.len(), 1, "{logs}");
    assert_eq!(answered[0]["status"], 202);
    assert!(answered[0]["span"]["request_id"].is_string(), "{logs}");
    broker.cleanup().await;
    sim.shutdown().await;
}

#[test]
fn without_credentials_the_intake_exits_2_naming_both_keys() {
    let mut cmd = common::bin::command(&[]);
    let (code, _, stderr) = common::bin::output(cmd.arg("intake"));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("intake.bearer_token_file") && stderr.contains("intake.hmac_secret_file"),
        "{stderr}"
    );
    let weak = TempFile::new("hunter2\n");
    let vars = [(
        "UNASSIGN__INTAKE__HMAC_SECRET_FILE".to_owned(),
        weak.0.display().to_string(),
    )];
    let mut cmd = common::bin::command(&vars);
    let (code, _, stderr) = common::bin::output(cmd.arg("intake"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("`intake.hmac_secret_file`"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// Kills the process if the test fails half-way.
struct ProcessIntake(std::process::Child);

impl Drop for ProcessIntake {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
