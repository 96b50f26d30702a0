//! The HTTP intake against the real broker (CONTRACT section 9): signed and bearer posts become
//! outcome events; bad credentials, bad items and an unreachable broker publish nothing; a
//! repeated Idempotency-Key publishes once; SIGTERM during a batch loses nothing. Every answer
//! is checked against the OpenAPI description in docs/intake-openapi.yaml.
//!
//! This file holds what the files below share: the intake under test (in this process, with its
//! own credentials files), its answers, and the requests queue read back without a worker.

mod auth;
mod batches;
mod broker;
mod openapi;
mod process;

use crate::common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Broker, Collector, Received, TempFile, device, eventually};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use unassign_worker::{
    config::Settings,
    intake::{Server, auth::sign},
    sim::Sim,
};

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "bearer-token-for-tests-0123456789";
const SECRET: &str = "hmac-secret-for-tests-0123456789";
const RETIRED: &str = "hmac-secret-being-rotated-out-42";

/// An intake running in this process, with its own secrets files.
struct Intake {
    url: String,
    ops: String,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), unassign_worker::worker::RunError>>,
    http: reqwest::Client,
    /// The bearer tokens and HMAC secrets files.
    files: (TempFile, TempFile),
}

fn intake_settings(settings: &Settings) -> (Settings, (TempFile, TempFile)) {
    let tokens = TempFile::new(&format!("{TOKEN}\n"));
    let secrets = TempFile::new(&format!("{SECRET}\n{RETIRED}\n"));
    let mut s = settings.clone();
    s.intake.listen = "127.0.0.1:0".parse().unwrap();
    s.intake.metrics_listen = "127.0.0.1:0".parse().unwrap();
    s.intake.bearer_token_file = Some(tokens.0.clone());
    s.intake.hmac_secret_file = Some(secrets.0.clone());
    s.intake.publish_timeout = std::time::Duration::from_secs(3);
    s.intake.max_body_bytes = std::num::NonZeroUsize::new(64 * 1024).unwrap();
    s.intake.max_batch = std::num::NonZeroUsize::new(100).unwrap();
    (s, (tokens, secrets))
}

impl Intake {
    async fn start(settings: &Settings) -> Intake {
        Self::start_with(settings, |_| {}).await
    }

    async fn start_with(settings: &Settings, tweak: impl FnOnce(&mut Settings)) -> Intake {
        let (mut settings, files) = intake_settings(settings);
        tweak(&mut settings);
        let server = Server::build(&settings).await.expect("the intake builds");
        let url = format!("http://{}/v1/requests", server.addr());
        let ops = format!("http://{}", server.metrics_addr());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.run(shutdown.clone()));
        let intake = Intake {
            url,
            ops,
            shutdown,
            handle,
            http: reqwest::Client::new(),
            files,
        };
        intake.wait_ready().await;
        intake
    }

    async fn wait_ready(&self) {
        eventually("intake /readyz 200", WAIT, || async {
            let r = self.http.get(format!("{}/readyz", self.ops)).send().await;
            r.is_ok_and(|r| r.status() == 200).then_some(())
        })
        .await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the intake stops")
            .unwrap()
            .expect("the intake exits cleanly");
    }

    /// Posts `body` signed with `secret` at `t` (now when `None`), checking the answer against
    /// the OpenAPI description.
    async fn signed(&self, body: &str, secret: &str, t: Option<i64>) -> Answer {
        let signature = sign(secret, t.unwrap_or_else(now), body.as_bytes());
        self.post(body, &[("x-unassign-signature", &signature)])
            .await
    }

    async fn bearer(&self, body: &str, extra: &[(&str, &str)]) -> Answer {
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        self.post(body, &headers).await
    }

    async fn post(&self, body: &str, headers: &[(&str, &str)]) -> Answer {
        // Several lines: JSON Lines (the JSON the tests send is on one line).
        let content_type = if body.trim().contains('\n') {
            "application/x-ndjson"
        } else {
            "application/json"
        };
        self.post_as(content_type, body, headers).await
    }

    async fn post_as(&self, content_type: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", content_type)
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the intake answers");
        let answer = Answer {
            status: response.status().as_u16(),
            retry_after: response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
            replayed: response.headers().contains_key("idempotent-replayed"),
            request_id: response
                .headers()
                .get("x-request-id")
                .map(|v| v.to_str().unwrap().to_owned()),
            body: response.json().await.expect("a JSON answer"),
        };
        openapi::conforms(answer.status, &answer.body);
        assert!(answer.request_id.is_some(), "{answer:?}");
        answer
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.ops))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(|v| v.parse::<f64>().unwrap())
            .sum()
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    /// `X-Request-Id`: every answer has one.
    request_id: Option<String>,
    retry_after: Option<String>,
    replayed: bool,
    body: Value,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn request(id: &str) -> Value {
    json!({"request_id": id, "device_id": device(), "requested_by": "workday", "reason": "left"})
}

/// Stops the intake and the simulator and removes the broker objects.
async fn finish(intake: Intake, broker: Broker, sim: Sim) {
    intake.stop().await;
    broker.cleanup().await;
    sim.shutdown().await;
}

/// The `request_id`s in the requests queue, in order, once there are at least `n` (every one
/// seen, so an extra message still fails the caller's comparison).
async fn ids_once(requests: &Collector, n: usize) -> Vec<String> {
    requests
        .wait_for(n, WAIT)
        .await
        .iter()
        .map(request_id)
        .collect()
}

/// The `request_id` of a message read back from the requests queue.
fn request_id(message: &Received) -> String {
    message.json()["request_id"].as_str().unwrap().to_owned()
}

/// Broker objects for a test without a worker: the requests queue is read back directly.
async fn broker_only(test: &str) -> (Sim, Broker, Collector) {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix(test));
    let broker = Broker::connect(&settings).await;
    let requests = broker.collect(&settings.amqp.queue).await;
    (sim, broker, requests)
}

/// Everything published before a final good post arrives before it (one channel, one queue),
/// so "nothing else was published" is checked without waiting blindly.
async fn published_ids(intake: &Intake, requests: &Collector) -> Vec<String> {
    let sentinel = format!("sentinel-{}", uuid::Uuid::new_v4().simple());
    let answer = intake.bearer(&request(&sentinel).to_string(), &[]).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    let all = eventually("the sentinel", WAIT, || async {
        let all = requests.all();
        let seen = all
            .iter()
            .any(|r| r.json()["request_id"] == sentinel.as_str());
        seen.then_some(all)
    })
    .await;
    all.iter()
        .map(request_id)
        .filter(|id| *id != sentinel)
        .collect()
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}
