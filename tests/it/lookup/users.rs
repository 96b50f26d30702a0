//! Requests by user: zero, one or many devices across pages, each with its result; a refused
//! user filter falls back to a paged scan; a nextLink to another host is not followed, and
//! nothing is unassigned on half a list.

use unassign_worker::contract::{header_int, headers};

use super::*;

#[tokio::test]
async fn a_user_with_zero_one_or_many_devices_across_pages() {
    let mut devices = vec![Device::new(&id(100), "SOLO", "solo@contoso.com")];
    for n in 1..=5 {
        devices.push(Device::new(&id(n), &format!("SN{n}"), "Ann@Contoso.com"));
        devices.push(Device::new(
            &id(50 + n),
            &format!("OTHER{n}"),
            "bob@contoso.com",
        ));
    }
    let sim = SimOptions {
        page_size: 2,
        ..sim_with(devices)
    };
    let env = Env::start_with("user_counts", sim, |_| {}).await;
    publish(
        &env,
        json!({"request_id": "zero", "user_principal_name": "nobody@contoso.com"}),
    )
    .await;
    publish(
        &env,
        json!({"request_id": "one", "user_principal_name": "SOLO@contoso.com"}),
    )
    .await;
    publish(
        &env,
        json!({"request_id": "many", "user_principal_name": ANN}),
    )
    .await;

    let event = event_of(&env, "zero").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(event["data"]["devices"], json!([]));
    assert!(
        event["data"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing to unassign"),
        "{event}"
    );
    assert_eq!(event["data"]["attempts"], 0);
    let event = event_of(&env, "one").await;
    assert_eq!(device_results(&event), ok(&[100]));
    assert!(
        event["data"]["device_id"].is_null(),
        "a user names no one device"
    );
    let event = event_of(&env, "many").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(device_results(&event), ok(&[1, 2, 3, 4, 5]));
    assert_eq!(event["data"]["attempts"], 5);

    let mut want: BTreeMap<String, u64> = (1..=5).map(|n| (id(n), 1)).collect();
    want.insert(id(100), 1);
    assert_eq!(calls(&env.sim), want);
    // Five of Ann's at two a page: three pages; one each for the others.
    assert_eq!(env.sim.stats().list_calls, 5);
    for device in env.sim.devices() {
        let ann_or_solo = device.serial_number.starts_with("SN") || device.serial_number == "SOLO";
        assert_eq!(
            device.user_principal_name.is_empty(),
            ann_or_solo,
            "{device:?}"
        );
    }
    assert!(env.dead.all().is_empty(), "nothing dead-lettered");
    env.finish().await;
}

#[tokio::test]
async fn a_refused_user_filter_falls_back_to_a_paged_scan() {
    let mut devices: Vec<Device> = (1..=7)
        .map(|n| Device::new(&id(n), &format!("SN{n}"), "bob@contoso.com"))
        .collect();
    devices[2].user_principal_name = "ANN@contoso.com".into();
    devices[6].user_principal_name = ANN.into();
    let sim = SimOptions {
        page_size: 3,
        refuse_upn_filter: true,
        ..sim_with(devices)
    };
    let env = Env::start_with("user_scan", sim, |_| {}).await;
    publish(
        &env,
        json!({"request_id": "scan", "user_principal_name": "Ann@Contoso.com"}),
    )
    .await;

    let event = event_of(&env, "scan").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(device_results(&event), ok(&[3, 7]));
    let stats = env.sim.stats();
    assert_eq!(stats.filters, ["userPrincipalName eq 'Ann@Contoso.com'"]);
    assert_eq!(
        stats.list_responses_by_status,
        BTreeMap::from([(200, 3), (400, 1)]),
        "one refusal, then three pages of seven"
    );
    assert_eq!(calls(&env.sim), BTreeMap::from([(id(3), 1), (id(7), 1)]));
    env.finish().await;
}

#[tokio::test]
async fn a_next_link_to_another_host_is_not_followed() {
    let elsewhere = Sim::start(sim_options()).await.unwrap();
    let sim = SimOptions {
        page_size: 1,
        ..lagging_user(2)
    };
    let env = Env::start_with("foreign_link", sim, |_| {}).await;
    env.sim
        .update(|b| b.next_link_origin = Some(elsewhere.authority()));
    publish(
        &env,
        json!({"request_id": "foreign", "user_principal_name": ANN}),
    )
    .await;

    let event = event_of(&env, "foreign").await;
    assert_eq!(event["type"], "autopilot.unassign.failed", "{event}");
    let error = &event["data"]["error"];
    assert_eq!(error["kind"], "graph_rejected");
    assert!(
        error["message"].as_str().unwrap().contains("nextLink"),
        "{error}"
    );
    let letter = dead_letter_of(&env, "foreign").await;
    assert_eq!(header_int(&letter.header(), headers::ATTEMPTS), Some(0));
    let other = elsewhere.stats();
    assert_eq!((other.list_calls, other.unexpected_requests.len()), (0, 0));
    assert_eq!(
        env.sim.stats().action_calls,
        0,
        "nothing unassigned on half a list"
    );
    elsewhere.shutdown().await;
    env.finish().await;
}
