//! The token endpoint: tokens, tenants, and errors in Entra's shape.

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::*;

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
