//! The unassign action: Graph's headers and errors, throttling, scripts, outages, injected errors.

use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;

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
