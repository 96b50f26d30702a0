//! Requests by serial number: the one exact match is unassigned whatever the case; an ambiguous
//! or unknown serial fails without touching a device; quotes in a serial neither break nor
//! inject into the filter Graph receives.

use unassign_worker::contract::{header_str, headers};

use super::*;

#[tokio::test]
async fn a_serial_unassigns_its_one_exact_match_whatever_the_case() {
    let sim = sim_with(vec![
        Device::new(&id(1), "PF-3ABCDE", ANN),
        Device::new(&id(2), "PF-3ABCDE-2", ANN),
        Device::new(&id(3), "XPF-3ABCDE", ANN),
    ]);
    let env = Env::start_with("serial_exact", sim, |_| {}).await;
    publish(
        &env,
        json!({"request_id": "s-1", "serial_number": "pf-3abcde"}),
    )
    .await;

    let event = event_of(&env, "s-1").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(event["subject"], id(1).as_str());
    assert_eq!(event["data"]["device_id"], id(1).as_str());
    assert_eq!(event["data"]["attempts"], 1);
    assert_eq!(device_results(&event), ok(&[1]));
    assert_eq!(calls(&env.sim), BTreeMap::from([(id(1), 1)]));
    // The longest hyphen-free run goes to Graph; the whole serial is matched on the client.
    assert_eq!(env.sim.stats().filters, ["contains(serialNumber,'3abcde')"]);
    env.finish().await;
}

#[tokio::test]
async fn ambiguous_and_unknown_serials_fail_without_touching_a_device() {
    let sim = sim_with(vec![
        Device::new(&id(1), "SN-DUP", ANN),
        Device::new(&id(2), "sn-dup", "bob@contoso.com"),
    ]);
    let env = Env::start_with("serial_ambiguous", sim, |_| {}).await;
    publish(
        &env,
        json!({"request_id": "amb", "serial_number": "SN-Dup"}),
    )
    .await;
    publish(
        &env,
        json!({"request_id": "none", "serial_number": "SN-404"}),
    )
    .await;

    let event = event_of(&env, "amb").await;
    assert_eq!(event["type"], "autopilot.unassign.failed");
    let error = &event["data"]["error"];
    assert_eq!(error["kind"], "ambiguous_device");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(&id(1)) && message.contains(&id(2)),
        "{message}"
    );
    assert_eq!(event["data"]["devices"], json!([]));
    assert!(event.get("subject").is_none());
    let event = event_of(&env, "none").await;
    assert_eq!(event["data"]["error"]["kind"], "device_not_found");
    // Graph refuses a serial filter: nothing to fall back on, the request fails.
    env.sim.push_read_script([Scripted {
        status: 400,
        retry_after: None,
        delay_ms: 0,
    }]);
    publish(
        &env,
        json!({"request_id": "refused", "serial_number": "SN-DUP"}),
    )
    .await;
    let event = event_of(&env, "refused").await;
    let error = &event["data"]["error"];
    assert_eq!(error["kind"], "graph_rejected", "{error}");
    assert_eq!(error["http_status"], 400);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("listing Autopilot devices"),
        "{message}"
    );

    let letter = dead_letter_of(&env, "amb").await;
    assert_eq!(
        header_str(&letter.header(), headers::ERROR_KIND).as_deref(),
        Some("ambiguous_device")
    );
    let letter = dead_letter_of(&env, "none").await;
    assert_eq!(
        header_str(&letter.header(), headers::ERROR_KIND).as_deref(),
        Some("device_not_found")
    );
    assert_eq!(env.sim.stats().action_calls, 0, "nothing unassigned");
    env.finish().await;
}

#[tokio::test]
async fn quotes_in_a_serial_neither_break_nor_inject_into_the_filter() {
    let hostile = "A') or contains(serialNumber,'";
    let sim = sim_with(vec![
        Device::new(&id(1), "O'BRIEN'S", ANN),
        Device::new(&id(2), "OBRIENS", ANN),
        Device::new(&id(3), "A", ANN),
    ]);
    let env = Env::start_with("serial_quotes", sim, |_| {}).await;
    publish(
        &env,
        json!({"request_id": "q-1", "serial_number": "o'brien's"}),
    )
    .await;
    publish(&env, json!({"request_id": "q-2", "serial_number": hostile})).await;

    let event = event_of(&env, "q-1").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(device_results(&event), ok(&[1]));
    let event = event_of(&env, "q-2").await;
    assert_eq!(
        event["data"]["error"]["kind"], "device_not_found",
        "{event}"
    );

    let stats = env.sim.stats();
    let mut filters = stats.filters.clone();
    filters.sort();
    assert_eq!(
        filters,
        [
            "contains(serialNumber,'A'') or contains(serialNumber,''')",
            "contains(serialNumber,'o''brien''s')",
        ],
        "each quote doubled, the whole value one literal"
    );
    assert_eq!(stats.list_responses_by_status, BTreeMap::from([(200, 2)]));
    assert_eq!(calls(&env.sim), BTreeMap::from([(id(1), 1)]));
    assert!(stats.unexpected_requests.is_empty(), "{stats:?}");
    env.finish().await;
}
