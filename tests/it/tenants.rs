//! Several tenants: each request reaches the tenant profile its `tenant_id` selects, with that
//! tenant's token, gate and pause; one tenant's throttling or broken credentials never hold up
//! the others; metrics name profiles, never tenant ids.

use crate::common;

use std::time::{Duration, Instant};

use common::{Env, TENANT, device, eventually};
use lapin::BasicProperties;
use unassign_worker::{
    config::{Settings, TenantSettings},
    contract::header_str,
    sim::{SimOptions, TenantApp},
};

const WAIT: Duration = Duration::from_secs(30);
const CONTOSO: &str = "0a1b2c3d-0000-4000-8000-00000000c0de";
const CONTOSO_APP: &str = "contoso-app";
const CONTOSO_SECRET: &str = "contoso-secret-7d1e";

/// graph-sim with a second tenant whose app registration is its own.
fn sim_with_contoso(throttle_limit: Option<u32>) -> SimOptions {
    let mut opts = common::sim_options();
    let app = TenantApp {
        client_id: CONTOSO_APP.to_owned(),
        client_secret: CONTOSO_SECRET.to_owned(),
        throttle_limit,
    };
    opts.tenants.push((CONTOSO.to_owned(), app));
    opts
}

/// The worker's `[tenants.contoso]` profile, beside the default tenant of the harness.
fn with_contoso(s: &mut Settings) {
    let contoso = TenantSettings {
        tenant_id: CONTOSO.to_owned(),
        client_id: CONTOSO_APP.to_owned(),
        client_secret: Some(CONTOSO_SECRET.into()),
        ..TenantSettings::default()
    };
    s.tenants
        .insert("contoso".to_owned().try_into().unwrap(), contoso);
}

async fn publish(env: &Env, request_id: &str, tenant_id: Option<&str>) {
    let mut body = serde_json::json!({"request_id": request_id, "device_id": device()});
    if let Some(tenant) = tenant_id {
        body["tenant_id"] = tenant.into();
    }
    env.broker
        .publish(body.to_string().as_bytes(), BasicProperties::default())
        .await;
}

/// Outcome events of requests whose id starts with `prefix`, as (request id, outcome).
fn outcomes(env: &Env, prefix: &str) -> Vec<(String, String)> {
    env.events
        .all()
        .iter()
        .map(|e| e.event().data)
        .filter(|d| d.request_id.starts_with(prefix))
        .map(|d| (d.request_id, d.outcome))
        .collect()
}

async fn wait_for_outcomes(env: &Env, prefix: &str, n: usize) -> Vec<(String, String)> {
    eventually(&format!("{n} outcome(s) for {prefix}"), WAIT, || async {
        let found = outcomes(env, prefix);
        (found.len() >= n).then_some(found)
    })
    .await
}

/// Publishes 20 jobs of the default tenant and waits for their outcomes: how long they took.
async fn twenty_default_jobs(env: &Env) -> (Vec<(String, String)>, Duration) {
    let started = Instant::now();
    for i in 0..20 {
        publish(env, &format!("d-{i}"), None).await;
    }
    let done = wait_for_outcomes(env, "d-", 20).await;
    (done, started.elapsed())
}

/// Every `tenant="…"` label value on `/metrics`.
async fn tenant_labels(env: &Env) -> std::collections::BTreeSet<String> {
    let (_, text) = env.worker.get("/metrics").await;
    text.split("tenant=\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"'))
        .map(|(value, _)| value.to_owned())
        .collect()
}

#[tokio::test]
async fn a_throttled_tenant_does_not_slow_the_other() {
    // Contoso: two calls per 2 s, then 429 with a Retry-After of up to 2 s; default: no limit.
    let mut sim = sim_with_contoso(Some(2));
    sim.throttle_window_ms = 2_000;
    let env = Env::start_with("tenantthrottle", sim, |s| {
        with_contoso(s);
        // Contoso's own pace: a 429 is back before the next call goes, so none is early.
        let contoso = s.tenants.get_mut("contoso").unwrap();
        contoso.max_requests_per_second = Some(5.0.try_into().unwrap());
    })
    .await;
    // More contoso jobs than the worker has Graph slots (8): held jobs must not sit on them.
    for i in 0..12 {
        publish(&env, &format!("c-{i}"), Some(CONTOSO)).await;
    }
    let held = "unassign_throttled{tenant=\"contoso\"}";
    eventually("contoso held back by a Retry-After", WAIT, || async {
        (env.worker.metric(held).await == 1.0).then_some(())
    })
    .await;

    let (done, elapsed) = twenty_default_jobs(&env).await;
    let contoso_done = outcomes(&env, "c-").len();
    eprintln!(
        "20 default jobs in {elapsed:.2?} while contoso was held ({contoso_done} of 12 contoso done)"
    );
    assert!(done.iter().all(|(_, outcome)| outcome == "succeeded"));
    assert!(
        contoso_done < 12,
        "contoso was still held when default finished"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "default waited on contoso's hold: {elapsed:?}"
    );
    assert_eq!(
        env.worker
            .metric("unassign_throttled{tenant=\"default\"}")
            .await,
        0.0
    );
    let throttled = |tenant: &str| {
        format!("unassign_graph_requests_total{{status=\"429\",tenant=\"{tenant}\"}}")
    };
    assert!(env.worker.metric(&throttled("contoso")).await >= 1.0);
    assert_eq!(env.worker.metric(&throttled("default")).await, 0.0);

    let contoso = wait_for_outcomes(&env, "c-", 12).await;
    assert!(contoso.iter().all(|(_, outcome)| outcome == "succeeded"));
    assert_eq!(env.sim.stats().early_calls, 0, "every Retry-After honoured");
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}

/// Contoso's token endpoint hangs for 10 s: its jobs wait for their token holding no Graph
/// slot, so the default tenant's jobs go through at once (with the token fetched after taking a
/// slot, 8 contoso jobs held all 8 slots until the token endpoint answered).
#[tokio::test]
async fn a_hanging_token_endpoint_holds_no_graph_slot() {
    let hanging = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(503).set_delay(Duration::from_secs(10)))
        .mount(&hanging)
        .await;
    let env = Env::start_with("tokenhang", sim_with_contoso(None), |s| {
        with_contoso(s);
        let contoso = s.tenants.get_mut("contoso").unwrap();
        contoso.authority_host = Some(hanging.uri().parse().unwrap());
    })
    .await;
    // More contoso jobs than the worker has Graph slots (8).
    for i in 0..12 {
        publish(&env, &format!("c-{i}"), Some(CONTOSO)).await;
    }
    eventually("contoso's token request in flight", WAIT, || async {
        let sent = hanging.received_requests().await.unwrap_or_default();
        (!sent.is_empty()).then_some(())
    })
    .await;

    let (done, elapsed) = twenty_default_jobs(&env).await;
    eprintln!("20 default jobs in {elapsed:.2?} while contoso's token endpoint hung");
    assert!(done.iter().all(|(_, outcome)| outcome == "succeeded"));
    assert!(
        elapsed < Duration::from_secs(3),
        "default waited on contoso's token request: {elapsed:?}"
    );
    assert_eq!(
        hanging.received_requests().await.unwrap().len(),
        1,
        "contoso's jobs share one token request"
    );
    env.finish().await;
}

#[tokio::test]
async fn each_tenant_gets_its_own_token_and_metrics_name_only_profiles() {
    let env = Env::start_with("tenanttokens", sim_with_contoso(None), with_contoso).await;
    for i in 0..3 {
        publish(&env, &format!("d-{i}"), None).await;
        publish(&env, &format!("e-{i}"), Some(TENANT)).await;
        // GUIDs compare case-insensitively.
        publish(&env, &format!("c-{i}"), Some(&CONTOSO.to_uppercase())).await;
    }
    let done = wait_for_outcomes(&env, "", 9).await;
    assert!(done.iter().all(|(_, outcome)| outcome == "succeeded"));
    let stats = env.sim.stats();
    assert_eq!(stats.tokens_by_tenant.get(TENANT), Some(&1), "{stats:?}");
    assert_eq!(stats.tokens_by_tenant.get(CONTOSO), Some(&1), "{stats:?}");
    assert_eq!(stats.calls_by_tenant.get(TENANT), Some(&6), "{stats:?}");
    assert_eq!(stats.calls_by_tenant.get(CONTOSO), Some(&3), "{stats:?}");
    let jobs =
        |tenant: &str| format!("unassign_jobs_total{{outcome=\"succeeded\",tenant=\"{tenant}\"}}");
    assert_eq!(env.worker.metric(&jobs("default")).await, 6.0);
    assert_eq!(env.worker.metric(&jobs("contoso")).await, 3.0);
    assert_eq!(
        env.worker
            .metric("unassign_token_requests_total{result=\"ok\",tenant=\"contoso\"}")
            .await,
        1.0
    );
    let labels = tenant_labels(&env).await;
    assert_eq!(
        labels.into_iter().collect::<Vec<_>>(),
        ["contoso", "default"]
    );
    env.finish().await;
}

#[tokio::test]
async fn an_unknown_tenant_is_an_invalid_request() {
    let env = Env::start_with("tenantunknown", sim_with_contoso(None), with_contoso).await;
    let stranger = "deadbeef-0000-4000-8000-000000000bad";
    publish(&env, "x-1", Some(stranger)).await;
    let event = &env.events.wait_for(1, WAIT).await[0].event();
    assert_eq!(event.data.outcome, "failed");
    let error = event.data.error.as_ref().expect("an error");
    assert_eq!(error.kind.as_str(), "invalid_request");
    assert!(error.message.contains("tenant_id"), "{}", error.message);
    let dead = env.dead.wait_for(1, WAIT).await;
    assert_eq!(
        header_str(&dead[0].header(), "x-unassign-error-kind").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(env.sim.stats().action_calls, 0);
    assert_eq!(env.sim.stats().token_requests, 0);
    assert_eq!(
        env.worker
            .metric("unassign_jobs_total{outcome=\"failed\",tenant=\"unknown\"}")
            .await,
        1.0
    );
    let (_, text) = env.worker.get("/metrics").await;
    assert!(
        !text.contains(stranger),
        "a request's tenant id in /metrics"
    );
    assert!(tenant_labels(&env).await.contains("unknown"));
    env.finish().await;
}

#[tokio::test]
async fn a_tenant_whose_credentials_fail_pauses_alone() {
    let env = Env::start_with("tenantpause", sim_with_contoso(None), |s| {
        with_contoso(s);
        // Parked hand-backs with the harness's 2 s and 4 s delay tiers.
        s.retry.park_after = std::time::Duration::from_secs(1);
    })
    .await;
    env.sim.update(|b| {
        b.tenants.get_mut(CONTOSO).unwrap().client_secret = "rotated".to_owned();
    });
    // /readyz never turns red: the worker is ready while one tenant works.
    let readyz = format!("http://{}/readyz", env.worker.http);
    let not_ready = tokio::spawn(async move {
        let mut not_ready = 0;
        for _ in 0..200 {
            let status = reqwest::get(&readyz).await.map(|r| r.status().as_u16());
            not_ready += usize::from(status.is_ok_and(|s| s != 200));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        not_ready
    });
    for i in 0..5 {
        publish(&env, &format!("c-{i}"), Some(CONTOSO)).await;
        publish(&env, &format!("d-{i}"), None).await;
    }
    let paused = "unassign_tenant_paused{tenant=\"contoso\"}";
    eventually("contoso paused", WAIT, || async {
        (env.worker.metric(paused).await == 1.0).then_some(())
    })
    .await;
    let (status, body) = env.worker.get("/readyz").await;
    assert_eq!(status, 200, "another tenant works: {body}");
    assert!(body.contains("\"paused_tenants\":{\"contoso\""), "{body}");
    wait_for_outcomes(&env, "d-", 5).await;
    // The default tenant keeps going while contoso stays paused.
    publish(&env, "d-late", None).await;
    wait_for_outcomes(&env, "d-late", 1).await;
    assert!(
        outcomes(&env, "c-").is_empty(),
        "no contoso outcome while paused"
    );
    assert_eq!(not_ready.await.unwrap(), 0, "/readyz answered 503");
    assert_eq!(env.dead.len(), 0, "credential trouble never dead-letters");
    assert_eq!(env.worker.metric(paused).await, 1.0);
    let failed_tokens = "unassign_token_requests_total{result=\"error\",tenant=\"contoso\"}";
    eventually("contoso probed again", WAIT, || async {
        (env.worker.metric(failed_tokens).await >= 2.0).then_some(())
    })
    .await;

    env.sim.update(|b| {
        b.tenants.get_mut(CONTOSO).unwrap().client_secret = CONTOSO_SECRET.to_owned();
    });
    let contoso = wait_for_outcomes(&env, "c-", 5).await;
    assert!(contoso.iter().all(|(_, outcome)| outcome == "succeeded"));
    assert_eq!(env.worker.metric(paused).await, 0.0);
    let (status, body) = env.worker.get("/readyz").await;
    assert_eq!((status, body.as_str()), (200, "{\"ready\":true}"));
    assert_eq!(env.dead.len(), 0);
    env.finish().await;
}
