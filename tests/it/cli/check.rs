//! `check` and `probe`: `check` reports each check (configuration, broker, token) once, as text or
//! JSON, with the client secret, a certificate or workload identity, and never quotes a secret;
//! `probe` exits 0 on a ready worker and 1 when nothing answers.

use serde_json::Value;

use super::*;

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
