//! End-to-end tests of the simulator over HTTP.

use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
const OTHER_TENANT: &str = "99999999-2222-3333-4444-555555555555";
const DEVICE: &str = "aaaaaaaa-bbbb-cccc-dddd-000000000001";
const UNKNOWN_DEVICE: &str = "aaaaaaaa-bbbb-cccc-dddd-ffffffffffff";

struct Harness {
    sim: Sim,
    http: Client,
}

impl Harness {
    async fn start(opts: SimOptions) -> Harness {
        Harness {
            sim: Sim::start(opts).await.unwrap(),
            http: Client::new(),
        }
    }

    async fn token_request(&self, tenant: &str, overrides: &[(&str, &str)]) -> Response {
        let client_id = SimOptions::default().client_id;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", "sim-secret"),
            ("scope", "https://graph.microsoft.com/.default"),
        ];
        form.retain(|(k, _)| !overrides.iter().any(|(o, _)| o == k));
        form.extend(overrides.iter().filter(|(_, v)| !v.is_empty()));
        let url = format!("{}/{tenant}/oauth2/v2.0/token", self.sim.authority());
        self.http.post(url).form(&form).send().await.unwrap()
    }

    async fn token_for(&self, tenant: &str) -> String {
        let response = self.token_request(tenant, &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn token(&self) -> String {
        self.token_for(TENANT).await
    }

    async fn unassign(&self, token: &str, id: &str) -> Response {
        let url = format!(
            "{}/deviceManagement/windowsAutopilotDeviceIdentities/{id}/unassignUserFromDevice",
            self.sim.base_url()
        );
        self.http.post(url).bearer_auth(token).send().await.unwrap()
    }

    async fn get(&self, token: &str, url: &str) -> Response {
        self.http.get(url).bearer_auth(token).send().await.unwrap()
    }

    fn list_url(&self, query: &str) -> String {
        format!(
            "{}/deviceManagement/windowsAutopilotDeviceIdentities{query}",
            self.sim.base_url()
        )
    }
}

async fn error_of(response: Response) -> Value {
    response.json::<Value>().await.unwrap()["error"].take()
}

fn retry_after(response: &Response) -> Option<&str> {
    response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap())
}

fn devices_file(devices: &[Value]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("graph-sim-{}.jsonl", Uuid::new_v4()));
    let lines: Vec<String> = devices.iter().map(Value::to_string).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[tokio::test]
async fn issues_tokens() {
    let h = Harness::start(SimOptions::default()).await;
    let response = h.token_request(TENANT, &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    assert!(body["access_token"].as_str().unwrap().len() >= 32);
    let stats = h.sim.stats();
    assert_eq!((stats.token_requests, stats.token_failures), (1, 0));
}

/// Tenant, form overrides (empty value: field left out), expected status, `error`, AADSTS code.
type TokenCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
    &'static str,
    u32,
);

#[tokio::test]
async fn token_errors_have_the_aadsts_shape() {
    let h = Harness::start(SimOptions::default()).await;
    let cases: [TokenCase; 7] = [
        (
            TENANT,
            &[("client_secret", "wrong")],
            401,
            "invalid_client",
            7000215,
        ),
        (
            TENANT,
            &[("client_secret", "")],
            401,
            "invalid_client",
            7000218,
        ),
        (
            TENANT,
            &[("client_id", OTHER_TENANT)],
            400,
            "unauthorized_client",
            700016,
        ),
        ("contoso", &[], 400, "invalid_request", 90002),
        (
            TENANT,
            &[("grant_type", "password")],
            400,
            "unsupported_grant_type",
            70003,
        ),
        (
            TENANT,
            &[("grant_type", "")],
            400,
            "invalid_request",
            900144,
        ),
        (
            TENANT,
            &[("scope", "User.Read")],
            400,
            "invalid_scope",
            1002012,
        ),
    ];
    for (tenant, overrides, status, error, code) in cases {
        let response = h.token_request(tenant, overrides).await;
        assert_eq!(response.status().as_u16(), status, "{error} {code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], error);
        assert_eq!(body["error_codes"], json!([code]));
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.starts_with(&format!("AADSTS{code}: ")),
            "{description}"
        );
        for field in ["timestamp", "trace_id", "correlation_id"] {
            assert!(body[field].is_string(), "{field}");
        }
    }
    h.sim.update(|b| b.token_outage = true);
    assert_eq!(
        h.token_request(TENANT, &[]).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let stats = h.sim.stats();
    assert_eq!((stats.token_requests, stats.token_failures), (8, 8));
}

#[tokio::test]
async fn only_the_configured_tenant_gets_tokens() {
    let h = Harness::start(SimOptions {
        tenant_id: Some(TENANT.to_uppercase()),
        ..SimOptions::default()
    })
    .await;
    h.token().await;
    let response = h.token_request(OTHER_TENANT, &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error_codes"], json!([90002]));
}

#[tokio::test]
async fn unassign_answers_204_with_graph_headers() {
    let h = Harness::start(SimOptions::default()).await;
    let token = h.token().await;
    let url = format!(
        "{}/deviceManagement/windowsAutopilotDeviceIdentities/{DEVICE}/unassignUserFromDevice",
        h.sim.base_url()
    );
    let response = h
        .http
        .post(&url)
        .bearer_auth(&token)
        .header("client-request-id", "my-id")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let header = |name| response.headers().get(name).unwrap().to_str().unwrap();
    assert!(Uuid::parse_str(header("request-id")).is_ok());
    assert_eq!(header("client-request-id"), "my-id");
    assert!(httpdate::parse_http_date(header("date")).is_ok());

    // Without a client-request-id, Graph echoes its own request id.
    let response = h.unassign(&token, DEVICE).await;
    let header = |name| response.headers().get(name).unwrap().to_str().unwrap();
    assert_eq!(header("client-request-id"), header("request-id"));
}

#[tokio::test]
async fn refuses_missing_unknown_revoked_and_expired_tokens() {
    let h = Harness::start(SimOptions::default()).await;
    let token = h.token().await;
    for (bearer, message) in [
        ("", "Access token is empty."),
        (
            "made-up",
            "Access token validation failure. Invalid audience.",
        ),
    ] {
        let response = h.unassign(bearer, DEVICE).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key("www-authenticate"));
        let error = error_of(response).await;
        assert_eq!(error["code"], "InvalidAuthenticationToken");
        assert_eq!(error["message"], message);
    }
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
    h.sim.revoke_tokens();
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(h.sim.stats().responses_by_status[&401], 3);

    let h = Harness::start(SimOptions {
        token_ttl_secs: 0,
        ..SimOptions::default()
    })
    .await;
    let response = h.unassign(&h.token().await, DEVICE).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let error = error_of(response).await;
    assert_eq!(
        error["message"],
        "Lifetime validation failed, the token is expired."
    );
}

#[tokio::test]
async fn forbid_answers_403_like_intune() {
    let h = Harness::start(SimOptions {
        forbid: true,
        ..SimOptions::default()
    })
    .await;
    let token = h.token().await;
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let error = error_of(response).await;
    assert_eq!(error["code"], "Forbidden");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("DeviceManagementServiceConfig.ReadWrite.All"));
    let list = h.get(&token, &h.list_url("")).await;
    assert_eq!(list.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn records_unexpected_requests() {
    let h = Harness::start(SimOptions::default()).await;
    let token = h.token().await;
    let response = h.unassign(&token, "not-a-guid").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(response).await["code"], "BadRequest");
    let action = format!("{}/{DEVICE}/unassignUserFromDevice", h.list_url(""));
    assert_eq!(h.get(&token, &action).await.status(), StatusCode::NOT_FOUND);
    let other = format!("{}/me?x=1", h.sim.base_url());
    assert_eq!(h.get(&token, &other).await.status(), StatusCode::NOT_FOUND);
    let path = "/beta/deviceManagement/windowsAutopilotDeviceIdentities";
    assert_eq!(
        h.sim.stats().unexpected_requests,
        [
            format!("POST {path}/not-a-guid/unassignUserFromDevice"),
            format!("GET {path}/{DEVICE}/unassignUserFromDevice"),
            "GET /beta/me?x=1".to_owned(),
        ]
    );
}

#[tokio::test]
async fn unknown_devices_answer_404_with_intune_wrapped_message() {
    let devices = devices_file(&[
        json!({"id": DEVICE, "serialNumber": "S1", "userPrincipalName": "ann@contoso.com"}),
    ]);
    let h = Harness::start(SimOptions {
        devices: Some(devices),
        ..SimOptions::default()
    })
    .await;
    let token = h.token().await;
    let response = h.unassign(&token, UNKNOWN_DEVICE).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let request_id = response.headers()["request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let error = error_of(response).await;
    assert_eq!(error["code"], "ResourceNotFound");
    let wrapped: Value = serde_json::from_str(error["message"].as_str().unwrap()).unwrap();
    assert_eq!(wrapped["_version"], 3);
    let message = wrapped["Message"].as_str().unwrap();
    assert!(
        message.contains(&format!("Activity ID: {request_id}")),
        "{message}"
    );
    assert_eq!(error["innerError"]["request-id"], request_id.as_str());

    // A known device (ids are case-insensitive) is unassigned and shows no user afterwards.
    let response = h.unassign(&token, &DEVICE.to_uppercase()).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let list: Value = h.get(&token, &h.list_url("")).await.json().await.unwrap();
    assert_eq!(list["value"][0]["userPrincipalName"], "");
}

#[tokio::test]
async fn throttling_sends_retry_after_in_every_form() {
    let h = Harness::start(SimOptions {
        throttle_limit: 1,
        throttle_window_ms: 60_000,
        ..SimOptions::default()
    })
    .await;
    let token = h.token().await;
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
    // With one call per window, every throttled call (counted like Graph) restarts the full wait.
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&response), Some("60.000"));
    let error = error_of(response).await;
    assert_eq!(error["code"], "TooManyRequests");
    assert_eq!(error["message"], "Please retry again later.");

    h.sim.update(|b| b.retry_after = RetryAfterMode::Integer);
    assert_eq!(retry_after(&h.unassign(&token, DEVICE).await), Some("60"));

    h.sim.update(|b| b.retry_after = RetryAfterMode::HttpDate);
    let response = h.unassign(&token, DEVICE).await;
    let date = httpdate::parse_http_date(retry_after(&response).unwrap()).unwrap();
    let wait = date.duration_since(SystemTime::now()).unwrap();
    assert!(
        wait > Duration::from_secs(58) && wait <= Duration::from_secs(61),
        "{wait:?}"
    );

    h.sim.update(|b| b.retry_after = RetryAfterMode::Absent);
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&response), None);

    // Throttling is per tenant.
    let other = h.token_for(OTHER_TENANT).await;
    assert_eq!(
        h.unassign(&other, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
}

/// A tenant with an app of its own: its client id and secret, its own throttling, its counts.
#[tokio::test]
async fn tenants_have_apps_and_throttling_of_their_own() {
    let app = format!("{OTHER_TENANT},other-app,other-secret");
    let h = Harness::start(SimOptions {
        tenant_id: Some(TENANT.to_owned()),
        throttle_limit: 100,
        ..SimOptions::parse_from(["graph-sim", "--tenant", app.as_str()])
    })
    .await;
    let other = [
        ("client_id", "other-app"),
        ("client_secret", "other-secret"),
    ];
    let refused = h.token_request(OTHER_TENANT, &[]).await;
    assert_eq!(
        refused.status(),
        StatusCode::BAD_REQUEST,
        "the default app is not its app"
    );
    let refused = h.token_request(TENANT, &other).await;
    assert_eq!(
        refused.status(),
        StatusCode::BAD_REQUEST,
        "nor the other way round"
    );
    let wrong = [("client_id", "other-app"), ("client_secret", "sim-secret")];
    let refused = h.token_request(OTHER_TENANT, &wrong).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let response = h.token_request(&OTHER_TENANT.to_uppercase(), &other).await;
    assert_eq!(response.status(), StatusCode::OK);
    let other_token = response.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = h.token().await;

    h.sim.update(|b| {
        b.tenants.get_mut(OTHER_TENANT).unwrap().throttle_limit = Some(1);
    });
    assert_eq!(
        h.unassign(&other_token, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
    let throttled = h.unassign(&other_token, DEVICE).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    for _ in 0..3 {
        assert_eq!(
            h.unassign(&token, DEVICE).await.status(),
            StatusCode::NO_CONTENT
        );
    }
    let stats = h.sim.stats();
    assert_eq!(stats.tokens_by_tenant.get(OTHER_TENANT), Some(&1));
    assert_eq!(stats.tokens_by_tenant.get(TENANT), Some(&1));
    assert_eq!(stats.calls_by_tenant.get(OTHER_TENANT), Some(&2));
    assert_eq!(stats.calls_by_tenant.get(TENANT), Some(&3));
    assert!(SimOptions::try_parse_from(["graph-sim", "--tenant", "nope,a,b"]).is_err());
}

#[tokio::test]
async fn throttle_window_frees_up_after_retry_after() {
    let h = Harness::start(SimOptions {
        throttle_limit: 2,
        throttle_window_ms: 300,
        ..SimOptions::default()
    })
    .await;
    let token = h.token().await;
    for _ in 0..2 {
        assert_eq!(
            h.unassign(&token, DEVICE).await.status(),
            StatusCode::NO_CONTENT
        );
    }
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: f64 = retry_after(&response).unwrap().parse().unwrap();
    assert!(wait > 0.0 && wait <= 0.3, "{wait}");
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.sim.stats().early_calls, 0);
}

#[tokio::test]
async fn counts_calls_made_before_the_retry_after_deadline() {
    let h = Harness::start(SimOptions::default()).await;
    let token = h.token().await;
    h.sim.push_script([Scripted {
        status: 429,
        retry_after: Some("0.2".into()),
        delay_ms: 0,
    }]);
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&response), Some("0.2"));
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.sim.stats().early_calls, 1);
    // Another tenant was given no deadline.
    h.unassign(&h.token_for(OTHER_TENANT).await, DEVICE).await;
    assert_eq!(h.sim.stats().early_calls, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.unassign(&token, DEVICE).await;
    assert_eq!(h.sim.stats().early_calls, 1);

    // An HTTP-date deadline counts the same way.
    let later = SystemTime::now() + Duration::from_secs(30);
    h.sim.push_script([Scripted {
        status: 503,
        retry_after: Some(httpdate::fmt_http_date(later)),
        delay_ms: 0,
    }]);
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    h.unassign(&token, DEVICE).await;
    assert_eq!(h.sim.stats().early_calls, 2);
}

#[tokio::test]
async fn scripted_answers_come_first_and_in_order() {
    let h = Harness::start(SimOptions::default()).await;
    let token = h.token().await;
    h.sim.update(|b| b.outage = true);
    h.sim.push_script([
        Scripted {
            status: 500,
            retry_after: None,
            delay_ms: 0,
        },
        Scripted {
            status: 204,
            retry_after: None,
            delay_ms: 200,
        },
    ]);
    // Authentication still comes first and does not consume the script.
    assert_eq!(
        h.unassign("", DEVICE).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error_of(response).await["code"], "InternalServerError");
    let started = Instant::now();
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn outage_switch_answers_503() {
    let h = Harness::start(SimOptions::default()).await;
    let token = h.token().await;
    h.sim.update(|b| b.outage = true);
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&response), None);
    assert_eq!(error_of(response).await["code"], "ServiceUnavailable");
    h.sim.update(|b| b.outage_retry_after = true);
    assert_eq!(
        retry_after(&h.unassign(&token, DEVICE).await),
        Some("1.000")
    );
    h.sim.update(|b| b.outage = false);
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn outage_windows_send_time_until_their_end() {
    let h = Harness::start(SimOptions::parse_from([
        "graph-sim",
        "--listen=127.0.0.1:0",
        "--outage=0..3600",
        "--outage-retry-after",
        "--retry-after=integer",
    ]))
    .await;
    let response = h.unassign(&h.token().await, DEVICE).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let wait: u64 = retry_after(&response).unwrap().parse().unwrap();
    assert!((3590..=3600).contains(&wait), "{wait}");
}

#[tokio::test]
async fn injects_errors_at_the_configured_rate() {
    let h = Harness::start(SimOptions {
        error_rates: vec![(503, 1.0)],
        ..SimOptions::default()
    })
    .await;
    let token = h.token().await;
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let wait: f64 = retry_after(&response).unwrap().parse().unwrap();
    assert!((0.5..=2.5).contains(&wait), "{wait}");
    h.sim
        .update(|b| b.error_rates = vec![(500, 0.0), (400, 1.0)]);
    let response = h.unassign(&token, DEVICE).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(retry_after(&response), None);
}

#[tokio::test]
async fn lists_devices_with_filters_and_paging() {
    let mut devices: Vec<Value> = (1..=7)
        .map(|n| {
            json!({"id": format!("aaaaaaaa-bbbb-cccc-dddd-{n:012}"), "serialNumber": format!("SN-{n}"),
                   "userPrincipalName": format!("user{}@contoso.com", n % 2), "groupTag": "x"})
        })
        .collect();
    devices[6]["serialNumber"] = "O'Brien-7".into();
    let h = Harness::start(SimOptions {
        devices: Some(devices_file(&devices)),
        page_size: 3,
        ..SimOptions::default()
    })
    .await;
    let token = h.token().await;

    let mut url = Some(h.list_url(""));
    let mut pages = Vec::new();
    while let Some(next) = url {
        let body: Value = h.get(&token, &next).await.json().await.unwrap();
        pages.push(body["value"].as_array().unwrap().len());
        assert!(body["@odata.context"].is_string());
        url = body["@odata.nextLink"].as_str().map(str::to_owned);
        if let Some(link) = &url {
            assert!(
                link.starts_with(&h.sim.base_url()) && link.contains("$skiptoken="),
                "{link}"
            );
        }
    }
    assert_eq!(pages, [3, 3, 1]);

    let query = |filter: &str| format!("?$filter={}", urlencode(filter));
    let ids = |body: &Value| -> Vec<String> {
        body["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["serialNumber"].as_str().unwrap().to_owned())
            .collect()
    };
    let body: Value = h
        .get(
            &token,
            &h.list_url(&query("contains(serialNumber,'o''brien')")),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&body), ["O'Brien-7"]);
    assert_eq!(body["value"][0]["groupTag"], "x");

    let url = format!(
        "{}&$top=2",
        h.list_url(&query("userPrincipalName eq 'USER1@contoso.com'"))
    );
    let first: Value = h.get(&token, &url).await.json().await.unwrap();
    assert_eq!(ids(&first), ["SN-1", "SN-3"]);
    let next = first["@odata.nextLink"].as_str().unwrap();
    let second: Value = h.get(&token, next).await.json().await.unwrap();
    assert_eq!(ids(&second), ["SN-5", "O'Brien-7"]);
    assert!(second.get("@odata.nextLink").is_none());

    let response = h
        .get(&token, &h.list_url(&query("serialNumber eq 'SN-1'")))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(response).await["code"], "BadRequest");
    assert_eq!(h.sim.stats().list_calls, 7);
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn stats_count_calls_statuses_and_concurrency() {
    let h = Harness::start(SimOptions {
        latency_ms: 300,
        ..SimOptions::default()
    })
    .await;
    let token = h.token().await;
    let (a, b, c) = tokio::join!(
        h.unassign(&token, DEVICE),
        h.unassign(&token, DEVICE),
        h.unassign(&token, UNKNOWN_DEVICE),
    );
    assert!(
        [a, b, c]
            .iter()
            .all(|r| r.status() == StatusCode::NO_CONTENT)
    );
    let stats = h.sim.stats();
    assert_eq!(stats.action_calls, 3);
    assert_eq!(stats.calls_by_device[DEVICE], 2);
    assert_eq!(stats.calls_by_device[UNKNOWN_DEVICE], 1);
    assert_eq!(stats.responses_by_status, [(204, 3)].into());
    assert_eq!(stats.max_in_flight, 3);
    h.sim.reset_stats();
    let stats = h.sim.stats();
    assert_eq!((stats.action_calls, stats.max_in_flight), (0, 0));
    h.sim.shutdown().await;
}

#[tokio::test]
async fn control_endpoints_change_the_simulator() {
    let h = Harness::start(SimOptions::default()).await;
    let token = h.token().await;
    let sim_url = |path: &str| format!("{}/_sim/{path}", h.sim.authority());

    let mut behaviour: Behaviour = h
        .http
        .get(sim_url("behaviour"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    behaviour.forbid = true;
    let put = h
        .http
        .put(sim_url("behaviour"))
        .json(&behaviour)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::FORBIDDEN
    );
    h.sim.update(|b| b.forbid = false);

    let script = json!([{"status": 502, "retry_after": null}]);
    h.http
        .post(sim_url("script"))
        .json(&script)
        .send()
        .await
        .unwrap();
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::BAD_GATEWAY
    );

    h.http.post(sim_url("revoke-tokens")).send().await.unwrap();
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::UNAUTHORIZED
    );

    let stats: Stats = h
        .http
        .get(sim_url("stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.action_calls, 3);
    h.http.post(sim_url("reset")).send().await.unwrap();
    assert_eq!(h.sim.stats().action_calls, 0);
}

#[test]
fn cli_parses_repeatable_options() {
    let opts = SimOptions::try_parse_from([
        "graph-sim",
        "--error-rate=503=0.05",
        "--error-rate",
        "429=0.1",
        "--outage=10..40",
        "--outage=50.5..60",
        "--retry-after=http-date",
    ])
    .unwrap();
    assert_eq!(opts.error_rates, [(503, 0.05), (429, 0.1)]);
    assert_eq!(opts.outages, [(10.0, 40.0), (50.5, 60.0)]);
    assert_eq!(opts.retry_after, RetryAfterMode::HttpDate);
    assert_eq!(opts.listen.port(), 8080);
    assert_eq!(SimOptions::default().listen.port(), 0);
    for bad in [
        "--error-rate=200=0.1",
        "--error-rate=503=2",
        "--outage=40..10",
    ] {
        assert!(
            SimOptions::try_parse_from(["graph-sim", bad]).is_err(),
            "{bad}"
        );
    }

    // Usable as a subcommand of the worker's CLI.
    #[derive(Parser)]
    enum Cli {
        GraphSim(SimOptions),
    }
    let Cli::GraphSim(opts) = Cli::parse_from(["worker", "graph-sim", "--forbid"]);
    assert!(opts.forbid);
}

#[tokio::test]
async fn run_serves_until_cancelled() {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(SimOptions::default(), shutdown.clone()));
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn lookup_knobs_csv_inventory_refused_filter_read_throttle_failing_devices() {
    let path = std::env::temp_dir().join(format!("graph-sim-{}.csv", Uuid::new_v4()));
    let other = "aaaaaaaa-bbbb-cccc-dddd-000000000002";
    std::fs::write(
        &path,
        format!("id,serialNumber,userPrincipalName,groupTag\n{DEVICE},0042,ann@contoso.com,x\n{other},\"A,B\",,\n"),
    )
    .unwrap();
    let opts = SimOptions::parse_from([
        "graph-sim",
        "--devices",
        path.to_str().unwrap(),
        "--page-size",
        "1",
        "--refuse-upn-filter",
        "--read-throttle-limit",
        "2",
    ]);
    let h = Harness::start(SimOptions {
        listen: SimOptions::default().listen,
        ..opts
    })
    .await;
    let token = h.token().await;
    let devices = h.sim.devices();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0].serial_number, "0042", "CSV cells stay text");
    assert_eq!(devices[1].serial_number, "A,B");

    let refused = h
        .get(
            &token,
            &h.list_url(&format!(
                "?$filter={}",
                urlencode("userPrincipalName eq 'ann@contoso.com'")
            )),
        )
        .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(refused).await["code"], "BadRequest");

    h.sim
        .update(|b| b.next_link_origin = Some("https://elsewhere.example".into()));
    let first: Value = h.get(&token, &h.list_url("")).await.json().await.unwrap();
    assert_eq!(first["value"][0]["groupTag"], "x");
    let next = first["@odata.nextLink"].as_str().unwrap();
    assert!(
        next.starts_with("https://elsewhere.example/beta/"),
        "{next}"
    );

    // The third read in the window is throttled (a refused one counts, as at Graph); writes
    // have a window of their own.
    let throttled = h.get(&token, &h.list_url("")).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&throttled).is_some());

    h.sim.update(|b| {
        b.failing_devices.insert(other.to_owned(), 409);
    });
    assert_eq!(
        h.unassign(&token, other).await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        h.unassign(&token, DEVICE).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.sim.devices()[0].user_principal_name, "");

    let stats = h.sim.stats();
    assert_eq!(stats.list_calls, 3);
    assert_eq!(
        stats.list_responses_by_status,
        BTreeMap::from([(200, 1), (400, 1), (429, 1)])
    );
    assert_eq!(stats.filters, ["userPrincipalName eq 'ann@contoso.com'"]);
    assert_eq!(stats.list_call_offsets_ms.len(), 3);
    std::fs::remove_file(path).unwrap();
}
