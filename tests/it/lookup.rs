//! Requests by serial number and by user (CONTRACT sections 4 and 5) against the real broker
//! and graph-sim: the filter Graph receives, exact matching, paging, the scan fallback,
//! per-device results, partial failures that neither a retry nor a replay redoes, and reads
//! budgeted and throttled apart from writes.

use crate::common;

use std::{collections::BTreeMap, time::Duration};

use common::{Env, Received, eventually, sim_options};
use lapin::BasicProperties;
use serde_json::{Value, json};
use unassign_worker::{
    contract::{header_int, header_str, headers},
    ops::dlq,
    sim::{Device, Scripted, Sim, SimOptions, Stats},
};

const WAIT: Duration = Duration::from_secs(30);
const ANN: &str = "ann@contoso.com";

/// A device id whose order is its number: the worker unassigns a user's devices in id order.
fn id(n: u32) -> String {
    format!("aaaaaaaa-bbbb-4ccc-8ddd-{n:012}")
}

fn sim_with(devices: Vec<Device>) -> SimOptions {
    SimOptions {
        inventory: Some(devices),
        ..sim_options()
    }
}

async fn publish(env: &Env, body: Value) {
    env.broker
        .publish(body.to_string().as_bytes(), BasicProperties::default())
        .await;
}

/// The event of `request_id`, once it arrived.
async fn event_of(env: &Env, request_id: &str) -> Value {
    eventually(&format!("the event of {request_id}"), WAIT, || async {
        env.events
            .all()
            .iter()
            .map(Received::json)
            .find(|e| e["data"]["request_id"] == request_id)
    })
    .await
}

async fn dead_letter_of(env: &Env, request_id: &str) -> Received {
    eventually(
        &format!("the dead letter of {request_id}"),
        WAIT,
        || async {
            env.dead
                .all()
                .into_iter()
                .find(|d| d.json()["request_id"] == request_id)
        },
    )
    .await
}

fn calls(sim: &Sim) -> BTreeMap<String, u64> {
    sim.stats().calls_by_device
}

fn device_results(event: &Value) -> Vec<(String, String)> {
    event["data"]["devices"]
        .as_array()
        .expect("data.devices is a list")
        .iter()
        .map(|d| {
            let outcome = d["outcome"].as_str().unwrap().to_owned();
            (d["device_id"].as_str().unwrap().to_owned(), outcome)
        })
        .collect()
}

fn ok(ids: &[u32]) -> Vec<(String, String)> {
    ids.iter()
        .map(|&n| (id(n), "succeeded".to_owned()))
        .collect()
}

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

/// A user whose devices keep showing them after an unassign (Intune applies it asynchronously),
/// so a second pass would find the finished devices again.
fn lagging_user(n: u32) -> SimOptions {
    let devices = (1..=n)
        .map(|k| Device::new(&id(k), &format!("SN{k}"), ANN))
        .collect();
    sim_with(devices)
}

#[tokio::test]
async fn a_partial_failure_is_dead_lettered_and_a_replay_redoes_only_the_failed_device() {
    let env = Env::start_with("user_partial", lagging_user(3), |_| {}).await;
    env.sim.update(|b| {
        b.lagging_unassign = true;
        b.failing_devices.insert(id(2), 400);
    });
    publish(
        &env,
        json!({"request_id": "part", "user_principal_name": ANN}),
    )
    .await;

    let event = event_of(&env, "part").await;
    assert_eq!(event["type"], "autopilot.unassign.failed", "{event}");
    let error = &event["data"]["error"];
    assert_eq!(error["kind"], "graph_rejected");
    assert_eq!(error["http_status"], 400);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("1 of 3 device(s) failed")
    );
    let devices = event["data"]["devices"].as_array().unwrap();
    assert_eq!(devices[1]["device_id"], id(2).as_str());
    assert_eq!(devices[1]["error"]["kind"], "graph_rejected");
    assert_eq!(device_results(&event)[0], ok(&[1])[0]);
    assert_eq!(device_results(&event)[2], ok(&[3])[0]);
    let letter = dead_letter_of(&env, "part").await;
    assert_eq!(
        header_str(&letter.header(), headers::DEVICES_DONE).as_deref(),
        Some(format!("{},{}", id(1), id(3)).as_str())
    );

    // Fixed at Graph's end; the dead letter is replayed as `dlq replay` does (the test's
    // collector has consumed it from the dead-letter queue, so it is republished from here).
    env.sim.update(|b| b.failing_devices.clear());
    let properties = letter
        .properties
        .clone()
        .with_headers(dlq::replay_headers(&letter.header()));
    env.broker.publish(&letter.body, properties).await;

    let events = env.events.wait_for(2, WAIT).await;
    let replayed = events[1].json();
    assert_eq!(
        replayed["type"], "autopilot.unassign.succeeded",
        "{replayed}"
    );
    assert_eq!(device_results(&replayed), ok(&[1, 2, 3]));
    assert_eq!(
        replayed["data"]["attempts"], 1,
        "one call: the failed device only"
    );
    assert_eq!(
        calls(&env.sim),
        BTreeMap::from([(id(1), 1), (id(2), 2), (id(3), 1)]),
        "the finished devices were not redone"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_request_handed_back_mid_way_resumes_without_redoing_devices() {
    let env = Env::start_with("user_resume", lagging_user(3), |s| {
        s.retry.park_after = std::time::Duration::from_secs(1);
    })
    .await;
    env.sim.update(|b| b.lagging_unassign = true);
    // Device 1 succeeds; device 2 is throttled for 2 s, longer than the worker holds a
    // delivery: the request is parked in a delay queue and comes back.
    env.sim.push_script([
        Scripted {
            status: 204,
            retry_after: None,
            delay_ms: 0,
        },
        Scripted {
            status: 429,
            retry_after: Some("2".into()),
            delay_ms: 0,
        },
    ]);
    publish(
        &env,
        json!({"request_id": "resume", "user_principal_name": ANN}),
    )
    .await;

    let event = event_of(&env, "resume").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(device_results(&event), ok(&[1, 2, 3]));
    assert_eq!(
        event["data"]["attempts"], 4,
        "1 + 2 + 1 action calls, across deliveries"
    );
    assert_eq!(
        calls(&env.sim),
        BTreeMap::from([(id(1), 1), (id(2), 2), (id(3), 1)])
    );
    let stats = env.sim.stats();
    assert_eq!(
        stats.list_calls, 2,
        "looked up again on redelivery, nothing cached"
    );
    assert_eq!((stats.early_calls, stats.early_reads), (0, 0));
    env.finish().await;
}

fn assert_some_reads_throttled(stats: &Stats) {
    let throttled = stats.list_responses_by_status.get(&429);
    assert!(throttled.is_some_and(|n| *n > 0), "{stats:?}");
}

/// Ann's six devices, listed one a page.
fn six_devices_a_page_each() -> SimOptions {
    let users = (1..=6).map(|n| Device::new(&id(n), &format!("SN{n}"), ANN));
    SimOptions {
        page_size: 1,
        ..sim_with(users.collect())
    }
}

#[tokio::test]
async fn reads_have_their_own_budget_and_their_429s_are_retried() {
    let env = Env::start_with("read_budget", six_devices_a_page_each(), |s| {
        s.graph.max_reads_per_second = 5.0.try_into().unwrap();
    })
    .await;
    env.sim.update(|b| b.lagging_unassign = true);
    publish(
        &env,
        json!({"request_id": "paced", "user_principal_name": ANN}),
    )
    .await;
    let event = event_of(&env, "paced").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    let offsets = env.sim.stats().list_call_offsets_ms;
    assert_eq!(offsets.len(), 6);
    let span = offsets[5] - offsets[0];
    assert!(
        span >= 950,
        "six reads at 5/s span at least a second: {offsets:?}"
    );
    assert_eq!(
        env.worker
            .metric("unassign_read_rate_limit_per_second")
            .await,
        5.0
    );
    assert_eq!(
        env.worker.metric("unassign_rate_limit_per_second").await,
        1000.0,
        "the write budget is untouched by reads"
    );

    // Graph throttles reads: retried after the Retry-After, never dead-lettered, and no call
    // of either kind goes out before it.
    env.sim.reset_stats();
    env.sim.update(|b| {
        b.read_throttle_limit = 2;
        b.throttle_window_ms = 1000;
    });
    publish(
        &env,
        json!({"request_id": "throttled", "user_principal_name": ANN}),
    )
    .await;
    let event = event_of(&env, "throttled").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    let stats = env.sim.stats();
    assert_some_reads_throttled(&stats);
    assert_eq!(stats.list_responses_by_status.get(&200), Some(&6));
    assert_eq!((stats.early_calls, stats.early_reads), (0, 0), "{stats:?}");
    assert!(
        env.worker
            .metric("unassign_retries_total{reason=\"throttled\"}")
            .await
            > 0.0
    );
    assert!(env.dead.all().is_empty());
    env.finish().await;
}

/// Issue 11, item 6: each page of a lookup has its own retry budget. With a budget of three
/// calls, a throttled fourth page used to be `retries_exhausted` at once, its budget spent by
/// the pages read before it.
#[tokio::test]
async fn each_page_of_a_lookup_has_its_own_retry_budget() {
    let env = Env::start_with("page_budget", six_devices_a_page_each(), |s| {
        s.graph.max_reads_per_second = 1000.0.try_into().unwrap();
        s.retry.max_attempts = std::num::NonZeroU32::new(3).unwrap();
    })
    .await;
    env.sim.update(|b| {
        b.lagging_unassign = true;
        b.read_throttle_limit = 3;
        b.throttle_window_ms = 500;
    });
    publish(
        &env,
        json!({"request_id": "pages", "user_principal_name": ANN}),
    )
    .await;
    let event = event_of(&env, "pages").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(device_results(&event), ok(&[1, 2, 3, 4, 5, 6]));
    // A page past the third was throttled, and retried.
    assert_some_reads_throttled(&env.sim.stats());
    assert!(env.dead.all().is_empty());
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

#[tokio::test]
async fn a_403_on_a_lookup_pauses_instead_of_dead_lettering() {
    let env = Env::start_with("read_forbidden", lagging_user(1), |_| {}).await;
    env.sim.update(|b| b.forbid = true);
    publish(
        &env,
        json!({"request_id": "denied", "user_principal_name": ANN}),
    )
    .await;
    eventually("/readyz 503 for credentials", WAIT, || async {
        (env.worker.get("/readyz").await.0 == 503).then_some(())
    })
    .await;
    env.sim.update(|b| b.forbid = false);
    let event = event_of(&env, "denied").await;
    assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    assert_eq!(device_results(&event), ok(&[1]));
    assert!(env.dead.all().is_empty(), "paused, never dead-lettered");
    env.finish().await;
}

#[tokio::test]
async fn a_retry_after_on_a_write_holds_the_reads_too() {
    let env = Env::start_with("hold_reads", lagging_user(1), |_| {}).await;
    env.sim.push_script([Scripted {
        status: 429,
        retry_after: Some("2".into()),
        delay_ms: 0,
    }]);
    publish(&env, json!({"request_id": "w", "device_id": id(1)})).await;
    eventually("the 429", WAIT, || async {
        (env.sim.stats().action_calls == 1).then_some(())
    })
    .await;
    // Within the Retry-After: the lookup must wait it out like any call to the tenant.
    publish(&env, json!({"request_id": "r", "user_principal_name": ANN})).await;
    for request_id in ["w", "r"] {
        let event = event_of(&env, request_id).await;
        assert_eq!(event["type"], "autopilot.unassign.succeeded", "{event}");
    }
    let stats = env.sim.stats();
    assert_eq!(stats.list_calls, 1);
    assert_eq!((stats.early_calls, stats.early_reads), (0, 0), "{stats:?}");
    env.finish().await;
}

#[tokio::test]
async fn worker_concurrency_bounds_lookups_and_actions_together() {
    let devices = (1..=8)
        .map(|n| Device::new(&id(n), &format!("SN{n}"), &format!("u{n}@contoso.com")))
        .collect();
    let sim = SimOptions {
        latency_ms: 100,
        ..sim_with(devices)
    };
    let env = Env::start_with("lookup_concurrency", sim, |s| {
        s.worker.concurrency = std::num::NonZeroUsize::new(2).unwrap();
    })
    .await;
    for n in 1..=8 {
        let body = json!({"request_id": format!("c-{n}"), "user_principal_name": format!("u{n}@contoso.com")});
        publish(&env, body).await;
    }
    let events = env.events.wait_for(8, WAIT).await;
    assert!(
        events
            .iter()
            .all(|e| e.json()["type"] == "autopilot.unassign.succeeded")
    );
    let stats = env.sim.stats();
    assert_eq!((stats.list_calls, stats.action_calls), (8, 8));
    assert_eq!(stats.max_in_flight, 2, "{stats:?}");
    env.finish().await;
}
