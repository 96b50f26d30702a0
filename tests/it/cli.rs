//! The binary as a black box: exit codes, `enqueue`, `check`, SIGTERM, the JSON log lines, and
//! secrets in logs.

use crate::common;

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    Broker, SECRET, TempFile,
    bin::{command, env_for, output},
    device, eventually,
    pki::TestCertificate,
    relay::Relay,
};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use unassign_worker::sim::{Scripted, Sim};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let (code, _, err) =
        output(command(&[("UNASSIGN__WORKER__CONCURRENCY".into(), "lots".into())]).arg("run"));
    assert_eq!(code, 2, "{err}");
    assert!(err.to_lowercase().contains("worker.concurrency"), "{err}");

    let (code, _, err) = output(command(&[]).arg("run"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("AZURE_TENANT_ID"), "{err}");

    let (code, _, err) = output(command(&[]).args(["run", "--config", "/nonexistent.toml"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent.toml"), "{err}");

    let (code, _, err) = output(command(&[]).arg("frobnicate"));
    assert_eq!(code, 2, "{err}");
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_check_and_never_the_secret() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("check"));
    let mut vars = env_for(&sim, &settings);
    let (code, out, err) = output(command(&vars).arg("check"));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{out}"
    );

    vars.retain(|(k, _)| k != "AZURE_CLIENT_SECRET");
    vars.push(("AZURE_CLIENT_SECRET".into(), "wrong-secret-value".into()));
    vars.push((
        "AMQP_URL".into(),
        "amqp://guest:hunter2@127.0.0.1:1/%2f".into(),
    ));
    let (code, out, err) = output(command(&vars).arg("check"));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("FAIL broker") && out.contains("FAIL token"),
        "{out}"
    );
    assert!(out.contains("AADSTS7000215"), "says why: {out}");
    for secret in ["wrong-secret-value", "hunter2"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} leaked: {out}{err}"
        );
    }
    sim.shutdown().await;
}

/// A worker process whose logs (stderr) are read as they come, so a full pipe never blocks it.
struct Running {
    child: Child,
    logs: std::thread::JoinHandle<String>,
}

/// A test that fails half-way must not leave its worker running.
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_worker(vars: &[(String, String)]) -> Running {
    let mut child = command(vars)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the worker starts");
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
        logs
    });
    Running { child, logs }
}

fn sigterm(worker: &Running) {
    let pid = worker.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
}

/// Waits for the process to exit, returning its exit code, how long it took, and its logs.
async fn wait_exit(mut worker: Running, limit: Duration) -> (i32, Duration, String) {
    let started = Instant::now();
    let status = eventually("the worker to exit", limit, || {
        let status = worker.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    let logs = std::mem::replace(&mut worker.logs, std::thread::spawn(String::new));
    (
        status.code().unwrap_or(-1),
        started.elapsed(),
        logs.join().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_within_the_grace_period_and_loses_nothing() {
    let sim_options = unassign_worker::sim::SimOptions {
        latency_ms: 300,
        ..common::sim_options()
    };
    let sim = Sim::start(sim_options).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("sigterm"));
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let mut vars = env_for(&sim, &settings);
    vars.push(("UNASSIGN__WORKER__SHUTDOWN_GRACE_SECS".into(), "5".into()));
    vars.push(("UNASSIGN__WORKER__CONCURRENCY".into(), "4".into()));
    let ids: Vec<String> = (0..60).map(|i| format!("term-{i}")).collect();
    for id in &ids {
        broker.publish_request(id, &device()).await;
    }
    let child = spawn_worker(&vars);
    events.wait_for(4, WAIT).await;
    sigterm(&child);
    let (code, took, logs) = wait_exit(child, Duration::from_secs(10)).await;
    assert_eq!(code, 0, "{logs}");
    assert!(
        took < Duration::from_secs(10),
        "exit within grace + 5 s, took {took:?}"
    );

    // Every request has an outcome event or is back in the queue.
    let queued = drain_request_ids(&broker, &settings.amqp.queue).await;
    let done: BTreeSet<String> = events
        .all()
        .iter()
        .map(|e| e.event().data.request_id)
        .collect();
    let accounted: BTreeSet<String> = done.iter().cloned().chain(queued.iter().cloned()).collect();
    let missing: Vec<_> = ids.iter().filter(|id| !accounted.contains(*id)).collect();
    assert!(missing.is_empty(), "lost on shutdown: {missing:?}");
    assert!(
        !queued.is_empty(),
        "the test should interrupt work in progress"
    );
    broker.cleanup().await;
    sim.shutdown().await;
}

/// A shutdown that hangs (here: the broker link goes silent, so the consumer's cancel is never
/// answered) is ended by the watchdog after the grace period — with a non-zero exit code, since
/// it was not a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_the_watchdog_forces_exits_non_zero() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("forced"));
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let mut vars = env_for(&sim, &settings);
    vars.retain(|(k, _)| k != "AMQP_URL");
    vars.extend([
        (
            "AMQP_URL".into(),
            format!("amqp://guest:guest@{}/%2f", relay.addr),
        ),
        ("UNASSIGN__WORKER__SHUTDOWN_GRACE_SECS".into(), "1".into()),
        // Heartbeats must not notice the silent link before the watchdog fires.
        ("UNASSIGN__AMQP__HEARTBEAT_SECS".into(), "60".into()),
    ]);
    let child = spawn_worker(&vars);
    broker.publish_request("forced-1", &device()).await;
    events.wait_for(1, WAIT).await;
    // The consume connection and the replicas' control connection both go through it.
    assert!(
        relay.stall() >= 1,
        "the worker's connections went through the relay"
    );
    sigterm(&child);
    let (code, took, logs) = wait_exit(child, Duration::from_secs(15)).await;
    assert_eq!(code, 1, "a forced exit is not a clean one: {logs}");
    assert!(logs.contains("grace period exceeded"), "{logs}");
    assert!(
        took >= Duration::from_secs(5),
        "after grace + 4 s, took {took:?}"
    );
    broker.cleanup().await;
    sim.shutdown().await;
}

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

/// Six calls in flight at once all get a 429, one with `Retry-After: 4` and five with 2: every
/// job then waits in the process (waits under `retry.park_after_secs` are not parked), all until
/// the tenant's hold ends 4 s on. SIGTERM must hand them back at once with what they owe — not
/// wait it out, not drop them — and the next worker must not call before the hold ends, although
/// only the old process had learnt of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_throttled_hands_every_waiting_job_back() {
    // Answered after 200 ms, so that every call is on its way before the first 429 is in
    // (calls are admitted a millisecond apart, and a loopback answer can be quicker).
    let answers = ["4", "2", "2", "2", "2", "2"].map(|seconds| (seconds, 200));
    sigterm_while_throttled("term-throttled", &answers).await;
}

/// Two calls go out together: one is answered 429 `Retry-After: 2` after 200 ms, the other 429
/// `Retry-After: 4` after 1.5 s. A SIGTERM in between must not let the waiting job leave before
/// that second answer is in, or it would carry too short a wait. (Answered at once, the first
/// 429 could hold the second call back before it went out: calls are admitted a millisecond
/// apart, after the token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_in_flight_answer_before_handing_waits_back() {
    sigterm_while_throttled("term-inflight", &[("2", 200), ("4", 1500)]).await;
}

/// One job per `(Retry-After, answer delay in ms)`, each answered so; SIGTERM once every call
/// has reached graph-sim; then a second worker finishes them all.
async fn sigterm_while_throttled(test: &str, answers: &[(&str, u64)]) {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    sim.push_script(answers.iter().map(|(seconds, delay_ms)| Scripted {
        status: 429,
        retry_after: Some((*seconds).into()),
        delay_ms: *delay_ms,
    }));
    let settings = common::settings(&sim, &common::prefix(test));
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let mut vars = env_for(&sim, &settings);
    vars.push(("UNASSIGN__WORKER__SHUTDOWN_GRACE_SECS".into(), "20".into()));
    let jobs = answers.len();
    for i in 0..jobs {
        broker
            .publish_request(&format!("held-{i}"), &device())
            .await;
    }
    let child = spawn_worker(&vars);
    eventually("every call to arrive", WAIT, || async {
        (sim.stats().action_calls == jobs as u64).then_some(())
    })
    .await;
    sigterm(&child);
    let (code, took, first_logs) = wait_exit(child, Duration::from_secs(25)).await;
    assert_eq!(code, 0, "{first_logs}");
    assert!(
        took < Duration::from_secs(3),
        "held jobs are handed back, not waited out: exit took {took:?}"
    );
    assert_eq!(events.len(), 0, "nothing was finished");
    let depth = broker.depth(&settings.amqp.queue).await;
    assert_eq!(depth as usize, jobs, "every job is back");

    // Calls already on their way when the first 429 arrived count as early at the simulator;
    // the new worker must add none. It counts the calls the first one made.
    let early = sim.stats().early_calls;
    let child = spawn_worker(&vars);
    let done = events.wait_for(jobs, WAIT).await;
    assert!(done.iter().all(|e| e.event().data.error.is_none()));
    let attempts: u32 = done.iter().map(|e| e.event().data.attempts).sum();
    assert_eq!(
        u64::from(attempts),
        sim.stats().action_calls,
        "attempts count the first worker's calls too"
    );
    sigterm(&child);
    let (code, _, logs) = wait_exit(child, WAIT).await;
    assert_eq!(code, 0);
    assert_eq!(
        sim.stats().early_calls,
        early,
        "no call before the Retry-After:\n{first_logs}\n{logs}"
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

async fn drain_request_ids(broker: &Broker, queue: &str) -> Vec<String> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let channel = broker.connection.create_channel().await.unwrap();
    let mut ids = Vec::new();
    while let Ok(Some(message)) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
    {
        let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
        ids.push(body["request_id"].as_str().unwrap().to_owned());
        message
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    ids
}

/// The environment for `settings` with `credential` (one `AZURE_*` variable and its file)
/// instead of the client secret.
fn with_credential(
    sim: &Sim,
    settings: &unassign_worker::config::Settings,
    credential: (&str, &std::path::Path),
) -> Vec<(String, String)> {
    let mut vars = env_for(sim, settings);
    vars.retain(|(k, _)| k != "AZURE_CLIENT_SECRET");
    vars.push((credential.0.into(), credential.1.display().to_string()));
    vars
}

/// A fresh key and certificate, and a simulator whose app registration holds the certificate.
async fn sim_with_certificate() -> (TestCertificate, Sim) {
    let pki = TestCertificate::generate();
    let registered = TempFile::new(&pki.cert_pem);
    let sim = Sim::start(unassign_worker::sim::SimOptions {
        client_certificates: vec![registered.0.clone()],
        ..common::sim_options()
    })
    .await
    .unwrap();
    (pki, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_certificate_and_workload_identity_without_their_secrets() {
    let (pki, sim) = sim_with_certificate().await;
    let settings = common::settings(&sim, &common::prefix("checkcred"));
    let pem = TempFile::new(&pki.pem());
    let vars = with_credential(&sim, &settings, ("AZURE_CLIENT_CERTIFICATE_PATH", &pem.0));
    let (code, out, err) = output(command(&vars).arg("check"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok   config") && out.contains("certificate"),
        "{out}"
    );
    assert!(out.contains("ok   token"), "{out}");

    let subject = unassign_worker::sim::SimOptions::default().federated_subject;
    let expired = sim.federated_token(&subject, -3600);
    let token = TempFile::new(&expired);
    let vars = with_credential(&sim, &settings, ("AZURE_FEDERATED_TOKEN_FILE", &token.0));
    let (code, out, err) = output(command(&vars).arg("check"));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("workload identity") && out.contains("AADSTS700024"),
        "{out}"
    );
    token.write(&sim.federated_token(&subject, 3600));
    let (code, out, err) = output(command(&vars).arg("check"));
    assert_eq!(code, 0, "{out}{err}");

    let mut secrets = sim.received_assertions();
    secrets.extend(sim.issued_tokens());
    secrets.push(key_material(&pki));
    for secret in &secrets {
        assert!(
            !out.contains(secret.as_str()) && !err.contains(secret.as_str()),
            "a secret leaked: {out}{err}"
        );
    }
    sim.shutdown().await;
}

/// A line from the middle of the private key's PEM body: no log may hold any of it.
fn key_material(pki: &TestCertificate) -> String {
    pki.key_pem.lines().nth(5).expect("a PEM body").to_owned()
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

#[test]
fn help_shows_examples_exit_codes_environment_and_kinds() {
    let (code, out, err) = output(command(&[]).arg("--help"));
    assert_eq!(code, 0, "{err}");
    for needle in [
        "Examples:",
        "Exit codes:",
        "UNASSIGN_CONFIG",
        "UNASSIGN__<SECTION>__<KEY>",
        "AMQP_URL",
        "AZURE_TENANT_ID",
        "completions",
        "probe",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
    let (code, out, _) = output(command(&[]).args(["dlq", "replay", "--help"]));
    assert_eq!(code, 0);
    for kind in unassign_worker::ops::dlq::known_kinds() {
        assert!(
            out.contains(kind),
            "--error-kind does not offer {kind}:\n{out}"
        );
    }
    let (code, _, err) = output(command(&[]).args(["dlq", "replay", "--error-kind", "nope"]));
    assert_eq!(code, 2);
    assert!(err.contains("device_not_found"), "lists the kinds: {err}");
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = output(command(&[]).args(["completions", shell]));
        assert_eq!(code, 0, "{shell}: {err}");
        for word in [
            "enqueue",
            "dlq",
            "replay",
            "check",
            "probe",
            "config",
            "error-kind",
        ] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (code, _, _) = output(command(&[]).args(["completions", "tcsh"]));
    assert_eq!(code, 2);
}

/// How often `needle` appears in the whole output, both streams.
fn times(needle: &str, out: &str, err: &str) -> usize {
    out.matches(needle).count() + err.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_failure_once_as_json() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("checkjson"));
    let mut vars = env_for(&sim, &settings);
    vars.retain(|(k, _)| k != "AZURE_CLIENT_SECRET" && k != "AMQP_URL");
    vars.push(("AZURE_CLIENT_SECRET".into(), "wrong-secret-value".into()));
    vars.push((
        "AMQP_URL".into(),
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
    ));
    let (code, out, err) = output(command(&vars).args(["check", "-o", "json"]));
    assert_eq!(code, 1, "{out}{err}");
    let report: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(report["ok"], false);
    let status = |check: &str| -> Vec<String> {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["check"] == check)
            .map(|c| c["status"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(status("config"), ["ok"], "{out}");
    assert_eq!(status("broker"), ["fail"], "{out}");
    assert_eq!(status("token"), ["fail"], "{out}");
    assert_eq!(times("AADSTS7000215", &out, &err), 1, "once: {out}{err}");
    assert_eq!(
        times("Connection refused", &out, &err),
        1,
        "once: {out}{err}"
    );
    assert!(!out.contains("wrong-secret-value") && !err.contains("wrong-secret-value"));

    // A bad tenant setting is exit 2, and the broker is still checked.
    vars.retain(|(k, _)| k != "AZURE_TENANT_ID" && k != "AMQP_URL");
    vars.push(("AMQP_URL".into(), common::amqp_url()));
    let (code, out, err) = output(command(&vars).arg("check"));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("FAIL config") && out.contains("ok   broker"),
        "{out}"
    );
    assert!(out.contains("skip token"), "{out}");
    assert_eq!(times("AZURE_TENANT_ID", &out, &err), 1, "once: {out}{err}");
    assert!(err.contains("1 of 3 checks failed"), "{err}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exits_0_on_a_ready_worker_and_1_on_nothing() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("probe"));
    let mut vars = env_for(&sim, &settings);
    vars.retain(|(k, _)| k != "UNASSIGN__HTTP__LISTEN");
    // The worker's way of writing it: probe reaches a wildcard address on loopback.
    vars.push((
        "UNASSIGN__HTTP__LISTEN".into(),
        format!("0.0.0.0:{}", common::free_port()),
    ));
    let started = Instant::now();
    let (code, _, err) = output(command(&vars).args(["probe", "--timeout", "1"]));
    assert_eq!(code, 1, "nothing listens: {err}");
    assert!(err.contains("/readyz"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let worker = spawn_worker(&vars);
    let out = eventually("the worker to be ready", WAIT, || {
        let (code, out, _) = output(command(&vars).arg("probe"));
        async move { (code == 0).then_some(out) }
    })
    .await;
    assert!(out.starts_with("ok ") && out.contains("/readyz"), "{out}");
    let (code, out, err) = output(command(&vars).args(["probe", "--healthz"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("/healthz"), "{out}");
    let (code, out, err) = output(command(&vars).args(["probe", "--path", "/nowhere"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("404"), "{err}");

    sigterm(&worker);
    let (code, _, logs) = wait_exit(worker, WAIT).await;
    assert_eq!(code, 0, "{logs}");
    let broker = Broker::connect(&settings).await;
    broker.cleanup().await;
    sim.shutdown().await;
}
