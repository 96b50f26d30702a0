//! Device lists, stats and the `/_sim` controls.

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;

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
