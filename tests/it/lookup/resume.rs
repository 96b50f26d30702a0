//! A request over several devices does each once: a partial failure is dead-lettered and a
//! replay of the dead letter redoes only the failed device; a request handed back mid-way
//! resumes without redoing the devices already done.

use unassign_worker::{
    contract::{header_str, headers},
    ops::dlq,
};

use super::*;

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
