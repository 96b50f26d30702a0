//! The HTTP intake against the real broker (CONTRACT section 9): signed and bearer posts become
//! outcome events; bad credentials, bad items and an unreachable broker publish nothing; a
//! repeated Idempotency-Key publishes once; SIGTERM during a batch loses nothing. Every answer
//! is checked against the OpenAPI description in docs/intake-openapi.yaml.

use crate::common;

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{Broker, Collector, Env, Received, TempFile, device, eventually, relay::Relay};
use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
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

#[tokio::test]
async fn signed_and_bearer_posts_become_outcome_events() {
    let env = Env::start("intake-e2e").await;
    let intake = Intake::start(env.settings()).await;

    let signed = request("e2e-signed");
    let answer = intake.signed(&signed.to_string(), SECRET, None).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(
        answer.body,
        json!({"accepted": 1, "request_ids": ["e2e-signed"]})
    );
    let rotated = intake
        .signed(&request("e2e-rotated").to_string(), RETIRED, None)
        .await;
    assert_eq!(rotated.status, 202, "any line of the secrets file verifies");

    let lines = format!(
        "{}\n\n{}\n",
        request("e2e-bearer-1"),
        request("e2e-bearer-2")
    );
    let answer = intake.bearer(&lines, &[]).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(
        answer.body["request_ids"],
        json!(["e2e-bearer-1", "e2e-bearer-2"])
    );

    let events = env.events.wait_for(4, WAIT).await;
    let done: BTreeSet<String> = events
        .iter()
        .map(|e| e.event())
        .inspect(|e| assert_eq!(e.data.outcome, "succeeded", "{e:?}"))
        .map(|e| e.data.request_id)
        .collect();
    let want = ["e2e-bearer-1", "e2e-bearer-2", "e2e-rotated", "e2e-signed"];
    assert_eq!(done, want.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        intake
            .metric("unassign_intake_requests_total{code=\"202\"}")
            .await,
        3.0
    );
    assert_eq!(
        intake
            .metric("unassign_intake_messages_published_total")
            .await,
        4.0
    );
    intake.stop().await;
    env.finish().await;
}

#[tokio::test]
async fn wrong_stale_or_replayed_signatures_are_401_and_publish_nothing() {
    let (sim, broker, requests) = broker_only("intake-auth").await;
    let intake = Intake::start(&broker.settings).await;
    let body = request("auth-replayed").to_string();

    let first = intake.signed(&body, SECRET, Some(now())).await;
    assert_eq!(first.status, 202);
    // Another t: the same body and t would make the same signature, a replay.
    let t = now() - 10;
    let signature = sign(SECRET, t, body.as_bytes());
    let good_once = intake
        .post(&body, &[("x-unassign-signature", &signature)])
        .await;
    assert_eq!(
        good_once.status, 202,
        "a fresh signature of a repeat is fine"
    );
    let replayed = intake
        .post(&body, &[("x-unassign-signature", &signature)])
        .await;
    assert_eq!(replayed.status, 401, "{replayed:?}");

    let cases = [
        ("wrong-secret", "not-the-secret-0123456789", 0),
        ("stale", SECRET, -301),
        ("future", SECRET, 301),
    ];
    for (what, secret, offset) in cases {
        let body = request(&format!("auth-{what}")).to_string();
        let answer = intake.signed(&body, secret, Some(now() + offset)).await;
        assert_eq!(answer.status, 401, "{what}: {answer:?}");
    }
    let garbage = intake
        .post(
            &request("auth-garbage").to_string(),
            &[("x-unassign-signature", "t=1,v1=zz")],
        )
        .await;
    assert_eq!(garbage.status, 401);
    let tampered = intake
        .post(
            &request("auth-tampered").to_string(),
            &[("x-unassign-signature", &signature)],
        )
        .await;
    assert_eq!(tampered.status, 401);
    let no_credentials = intake.post(&request("auth-none").to_string(), &[]).await;
    assert_eq!(no_credentials.status, 401);
    let bad_token = intake
        .post(
            &request("auth-token").to_string(),
            &[("authorization", "Bearer bearer-token-for-tests-012345678")],
        )
        .await;
    assert_eq!(bad_token.status, 401);

    assert_eq!(
        published_ids(&intake, &requests).await,
        ["auth-replayed"],
        "only the one accepted message (the repeat was not published again)"
    );
    assert_eq!(
        intake
            .metric("unassign_intake_auth_failures_total{reason=\"replayed\"}")
            .await,
        1.0
    );
    finish(intake, broker, sim).await;
}

#[tokio::test]
async fn an_unreachable_broker_is_503_publishing_nothing_then_202_once_back() {
    let (sim, broker, requests) = broker_only("intake-503").await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let mut settings = broker.settings.clone();
    settings.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr)
        .parse()
        .unwrap();
    let intake = Intake::start(&settings).await;

    assert!(
        relay.down() >= 1,
        "the intake's connection went through the relay"
    );
    let batch = json!([request("down-1"), request("down-2")]).to_string();
    let answer = intake.bearer(&batch, &[]).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.retry_after.as_deref(), Some("5"));
    let (status, _) = get(&format!("{}/readyz", intake.ops)).await;
    assert_eq!(status, 503, "not ready while the broker is away");

    relay.up();
    let answer = eventually("a 202 once the broker is back", WAIT, || async {
        let answer = intake.bearer(&batch, &[]).await;
        (answer.status == 202).then_some(answer)
    })
    .await;
    assert_eq!(answer.body["accepted"], 2);
    assert!(intake.metric("unassign_intake_amqp_reconnects_total").await >= 1.0);
    let (status, _) = get(&format!("{}/readyz", intake.ops)).await;
    assert_eq!(status, 200);

    // The relay is back, so the sentinel goes through it too.
    let ids = published_ids(&intake, &requests).await;
    assert_eq!(ids, ["down-1", "down-2"], "each once, nothing from the 503");
    finish(intake, broker, sim).await;
}

/// Nothing is half-accepted: the broker takes only part of a batch — for the first post the
/// exchange routes to a classic queue of `x-max-length` 3 with `reject-publish` instead of the
/// request queue, so the first three messages are confirmed and the rest nacked — and the post is
/// 503. Once the request queue is bound again the same post is 202 and publishes only the 27 the
/// broker did not confirm: every message is on the broker exactly once.
#[tokio::test]
async fn a_broker_refusing_part_of_a_batch_is_503_and_the_retry_publishes_each_message_once() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("intake-partial"));
    let broker = Broker::connect(&settings).await;
    let intake = Intake::start(&settings).await;
    let a = &settings.amqp;
    let (exchange, key) = (a.exchange.as_str(), a.routing_key.as_str());
    let limiter = format!("{}.limiter", a.queue);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(3));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let channel = &broker.channel;
    channel
        .queue_declare(
            limiter.as_str().into(),
            QueueDeclareOptions::default(),
            args,
        )
        .await
        .unwrap();
    let bind = |queue: String, bound: bool| async move {
        let none = FieldTable::default();
        if bound {
            let options = QueueBindOptions::default();
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    key.into(),
                    options,
                    none,
                )
                .await
        } else {
            channel
                .queue_unbind(queue.as_str().into(), exchange.into(), key.into(), none)
                .await
        }
        .unwrap();
    };
    bind(a.queue.clone(), false).await;
    bind(limiter.clone(), true).await;

    let items: Vec<Value> = (0..30).map(|i| request(&format!("partial-{i}"))).collect();
    let batch = json!(items).to_string();
    let idempotency = [("idempotency-key", "partial-batch")];
    let refused = intake.bearer(&batch, &idempotency).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.retry_after.is_some());

    bind(limiter.clone(), false).await;
    bind(a.queue.clone(), true).await;
    let accepted = intake.bearer(&batch, &idempotency).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    assert_eq!(accepted.body["accepted"], 30);
    assert_eq!(
        intake.metric("unassign_intake_duplicates_total").await,
        3.0,
        "the three confirmed before the 503 were not published again"
    );

    let requests = broker.collect(&a.queue).await;
    let mut ids = published_ids(&intake, &requests).await;
    assert_eq!(
        broker.depth(&limiter).await,
        3,
        "the first three, taken once"
    );
    ids.sort_by_key(|id| id["partial-".len()..].parse::<u32>().unwrap());
    let rest: Vec<String> = (3..30).map(|i| format!("partial-{i}")).collect();
    assert_eq!(ids, rest, "the other 27, each once");
    channel
        .queue_delete(limiter.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    finish(intake, broker, sim).await;
}

/// Also: a malformed body 400, another media type 415, over the limits 413; none publishes.
#[tokio::test]
async fn a_batch_with_one_bad_line_is_400_naming_it_and_publishes_nothing() {
    let (sim, broker, requests) = broker_only("intake-400").await;
    let intake = Intake::start(&broker.settings).await;

    let bad = json!({"request_id": "bad-2", "device_id": "{not-a-guid}"});
    let lines = format!("{}\n{bad}\n{}\n", request("bad-1"), request("bad-3"));
    let answer = intake.bearer(&lines, &[]).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    let errors = answer.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["line"], 2);
    assert_eq!(errors[0]["field"], "device_id");

    let array = json!([request("arr-1"), {"request_id": "arr-2", "serial_number": ""}]);
    let answer = intake.bearer(&array.to_string(), &[]).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["errors"][0]["line"], 2);
    assert_eq!(answer.body["errors"][0]["field"], "serial_number");

    let no_id = intake
        .bearer(&json!({"device_id": device()}).to_string(), &[])
        .await;
    assert_eq!(no_id.status, 400, "no request_id and no Idempotency-Key");
    assert_eq!(no_id.body["errors"][0]["field"], "request_id");
    assert_eq!(intake.bearer("{", &[]).await.status, 400);
    let auth = format!("Bearer {TOKEN}");
    let form = intake
        .post_as("text/plain", "device_id=x", &[("authorization", &auth)])
        .await;
    assert_eq!(form.status, 415, "{form:?}");

    // Over the limits: 413, nothing read further.
    let too_many: Vec<Value> = (0..101).map(|i| request(&format!("many-{i}"))).collect();
    let answer = intake.bearer(&json!(too_many).to_string(), &[]).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    let big = json!({"request_id": "big", "device_id": device(), "reason": "x".repeat(70_000)});
    assert_eq!(intake.bearer(&big.to_string(), &[]).await.status, 413);

    assert_eq!(
        published_ids(&intake, &requests).await,
        Vec::<String>::new()
    );
    finish(intake, broker, sim).await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_publishes_one_message() {
    let (sim, broker, requests) = broker_only("intake-idem").await;
    let intake = Intake::start(&broker.settings).await;

    let body = json!({"device_id": device(), "requested_by": "logic-apps"}).to_string();
    let key = [("idempotency-key", "leaver-4711")];
    let first = intake.bearer(&body, &key).await;
    assert_eq!(first.status, 202, "{first:?}");
    assert!(!first.replayed);
    let second = intake.bearer(&body, &key).await;
    assert_eq!((second.status, &second.body), (202, &first.body));
    assert!(second.replayed, "answered from the idempotency cache");
    assert_eq!(first.body["request_ids"], json!(["leaver-4711"]));

    let other = json!({"device_id": device()}).to_string();
    let conflict = intake.bearer(&other, &key).await;
    assert_eq!(conflict.status, 409, "the key reused for another request");

    assert_eq!(published_ids(&intake, &requests).await, ["leaver-4711"]);
    let message = requests
        .all()
        .into_iter()
        .find(|r| r.json()["request_id"] == "leaver-4711")
        .unwrap();
    let p = &message.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "leaver-4711");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(intake.metric("unassign_intake_duplicates_total").await, 1.0);
    finish(intake, broker, sim).await;
}

#[tokio::test]
async fn a_sender_over_its_rate_is_429_and_others_go_ahead() {
    let (sim, broker, requests) = broker_only("intake-limits").await;
    let intake = Intake::start_with(&broker.settings, |s| {
        s.intake.rate_limit_per_second = 0.5.try_into().unwrap();
    })
    .await;
    let first = intake
        .signed(&request("rate-1").to_string(), SECRET, None)
        .await;
    assert_eq!(first.status, 202);
    let second = intake
        .signed(&request("rate-2").to_string(), SECRET, None)
        .await;
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.retry_after.as_deref(), Some("2"));
    let other_client = intake.bearer(&request("rate-3").to_string(), &[]).await;
    assert_eq!(
        other_client.status, 202,
        "each credential has its own bucket"
    );
    // In order on one channel: a wrongly published rate-2 would come before rate-3.
    let ids = ids_once(&requests, 2).await;
    assert_eq!(ids, ["rate-1", "rate-3"]);
    finish(intake, broker, sim).await;
}

/// Rotation without a restart: the tokens file is rewritten while the intake runs.
#[tokio::test]
async fn tokens_rotate_without_a_restart() {
    let (sim, broker, requests) = broker_only("intake-rotate").await;
    let intake = Intake::start(&broker.settings).await;
    assert_eq!(
        intake
            .bearer(&request("rot-1").to_string(), &[])
            .await
            .status,
        202
    );
    let new = "bearer-token-after-rotation-9876543210";
    intake.files.0.write(&format!("# rotated\n{new}\n"));
    let old = intake.bearer(&request("rot-2").to_string(), &[]).await;
    assert_eq!(old.status, 401, "the removed token is refused at once");
    let auth = format!("Bearer {new}");
    let rotated = intake
        .post(&request("rot-3").to_string(), &[("authorization", &auth)])
        .await;
    assert_eq!(rotated.status, 202);
    let ids = ids_once(&requests, 2).await;
    assert_eq!(ids, ["rot-1", "rot-3"]);
    finish(intake, broker, sim).await;
}

/// A sender that retries while its first attempt still waits for confirms (here: three identical
/// posts at once over a slowed broker link) gets 202 each time, and the messages are published
/// once: the later posts wait for the first instead of publishing again.
#[tokio::test]
async fn concurrent_repeats_of_a_post_publish_once() {
    let (sim, broker, requests) = broker_only("intake-race").await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let mut settings = broker.settings.clone();
    settings.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr)
        .parse()
        .unwrap();
    let intake = Intake::start(&settings).await;
    relay.slow(Duration::from_millis(200));

    let batch = json!([request("race-1"), request("race-2")]).to_string();
    let key = [("idempotency-key", "race")];
    let (a, b, c) = tokio::join!(
        intake.bearer(&batch, &key),
        intake.bearer(&batch, &key),
        intake.bearer(&batch, &key),
    );
    for answer in [&a, &b, &c] {
        assert_eq!(answer.status, 202, "{answer:?}");
        assert_eq!(answer.body, a.body);
    }
    assert_eq!(
        [&a, &b, &c].iter().filter(|x| x.replayed).count(),
        2,
        "two waited for the first and published nothing"
    );
    relay.slow(Duration::ZERO);
    assert_eq!(
        published_ids(&intake, &requests).await,
        ["race-1", "race-2"]
    );
    finish(intake, broker, sim).await;
}

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

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// The answers' shapes, checked against docs/intake-openapi.yaml with a JSON Schema validator
/// (OpenAPI 3.1 schemas are draft 2020-12), each in the context of the whole description so
/// that its `#/components/schemas/…` references resolve.
mod openapi {
    use std::sync::OnceLock;

    use serde_json::{Value, json};

    fn spec() -> &'static Value {
        static SPEC: OnceLock<Value> = OnceLock::new();
        SPEC.get_or_init(|| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/intake-openapi.yaml");
            let text = std::fs::read_to_string(path).expect("the OpenAPI description");
            serde_norway::from_str(&text).expect("the OpenAPI description is YAML")
        })
    }

    /// Panics unless `status` is documented for POST /v1/requests and `body` fits its schema.
    pub fn conforms(status: u16, body: &Value) {
        let spec = spec();
        assert_eq!(spec["openapi"], "3.1.0");
        let response = &spec["paths"]["/v1/requests"]["post"]["responses"][status.to_string()];
        assert!(response.is_object(), "status {status} is not documented");
        let schema = &response["content"]["application/json"]["schema"];
        if let Err(e) = check(schema, body) {
            panic!("a {status} answer does not fit the OpenAPI description: {e}\n{body}");
        }
    }

    fn check(schema: &Value, v: &Value) -> Result<(), String> {
        let rooted = json!({"components": spec()["components"], "allOf": [schema]});
        let validator = jsonschema::draft202012::new(&rooted).map_err(|e| e.to_string())?;
        let errors: Vec<String> = validator
            .iter_errors(v)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors.join("; ")),
        }
    }

    #[test]
    fn the_validator_refuses_what_does_not_fit() {
        let errors = |v: Value| check(&json!({"$ref": "#/components/schemas/Errors"}), &v);
        assert!(errors(json!({"errors": [{"line": 2, "field": null, "message": "m"}]})).is_ok());
        assert!(errors(json!({"errors": []})).is_err());
        assert!(errors(json!({"errors": [{"line": "2", "field": null, "message": "m"}]})).is_err());
        assert!(errors(json!({"errors": [{"line": 0, "field": null, "message": "m"}]})).is_err());
        assert!(errors(json!({"errors": [{"field": null, "message": "m"}]})).is_err());
        assert!(errors(json!({"errors": [], "extra": 1})).is_err());
        let accepted = json!({"$ref": "#/components/schemas/Accepted"});
        assert!(check(&accepted, &json!({"accepted": 1, "request_ids": ["a"]})).is_ok());
        assert!(check(&accepted, &json!({"accepted": 1})).is_err());
    }
}
