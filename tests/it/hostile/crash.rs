//! A message that kills its worker (the binary, SIGKILLed) each time it is delivered ends in the
//! dead-letter queue by the broker's delivery limit, with one Graph call per crash and no outcome
//! event, not in a crash loop.

use std::process::Stdio;

use unassign_worker::sim::{Sim, SimOptions};

use super::*;
use crate::common::bin;

/// The reason of the newest `x-death` entry the broker wrote.
fn death_reason(headers: &FieldTable) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    match deaths.as_slice().first()? {
        AMQPValue::FieldTable(entry) => header_str(entry, "reason").map(|s| s.into_owned()),
        _ => None,
    }
}

/// A message that kills its worker each time ends in the dead-letter queue by the broker's
/// delivery limit, not in a crash loop.
///
/// The crash is a SIGKILL of the worker binary. Aborting the in-process worker's task is not the
/// same thing (checked with a throw-away probe): the broker does requeue the message at once,
/// but the job is a task of its own (a `TaskTracker`) and runs on — it finished its Graph call
/// and published an outcome event on the publisher channel, which stayed open. A killed process
/// publishes nothing, which is what this test asserts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crashes_its_worker_is_dead_lettered_by_the_delivery_limit() {
    const DELIVERY_LIMIT: u32 = 2;
    // The call stays in flight long enough to kill the worker while it holds the message.
    let sim = Sim::start(SimOptions {
        latency_ms: 2000,
        ..common::sim_options()
    })
    .await
    .unwrap();
    let mut settings = common::settings(&sim, &common::prefix("crashloop"));
    settings.amqp.delivery_limit = DELIVERY_LIMIT;
    let broker = common::Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let dead = broker.collect(&settings.amqp.dead_letter_queue).await;
    let vars = bin::env_for(&sim, &settings);
    let dev = device();
    broker.publish_request("crash-1", &dev).await;

    let calls = || sim.stats().calls_by_device.get(&dev).copied().unwrap_or(0);
    let mut crashes = 0;
    while dead.len() == 0 {
        assert!(
            crashes <= DELIVERY_LIMIT + 2,
            "no dead letter after {crashes} crashes"
        );
        let mut cmd = bin::command(&vars);
        cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::null());
        let worker = bin::WorkerProcess::start(cmd, None).expect("the worker starts");
        // Either this worker picks the message up (and is killed holding it), or the broker
        // has dead-lettered it already.
        let holding = eventually("the worker to hold the message", WAIT, || {
            let holding = calls() > u64::from(crashes);
            let dead_lettered = dead.len() > 0;
            async move { (holding || dead_lettered).then_some(holding) }
        })
        .await;
        worker.kill().expect("SIGKILL");
        if holding {
            crashes += 1;
            // The broker requeues (or dead-letters) once it sees the connection gone.
            eventually("the message back in a queue", WAIT, || async {
                let requeued = broker.depth(&settings.amqp.queue).await > 0;
                (requeued || dead.len() > 0).then_some(())
            })
            .await;
        }
    }

    let letters = dead.wait_for(1, WAIT).await;
    assert_eq!(letters.len(), 1);
    let headers = letters[0].header();
    assert_eq!(
        death_reason(&headers).as_deref(),
        Some("delivery_limit"),
        "{headers:?}"
    );
    assert!(
        header_str(&headers, "x-unassign-error-kind").is_none(),
        "the broker's dead letter, not the worker's"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&letters[0].body).unwrap()["request_id"],
        "crash-1"
    );
    assert_eq!(
        u64::from(crashes),
        calls(),
        "one Graph call per crashed delivery"
    );
    assert_eq!(
        crashes,
        DELIVERY_LIMIT + 1,
        "a delivery limit of {DELIVERY_LIMIT} allows that many returns; the next one dead-letters"
    );
    assert!(
        events.all().is_empty(),
        "no outcome event for a crashed request"
    );
    assert_eq!(broker.depth(&settings.amqp.queue).await, 0);
    broker.cleanup().await;
    sim.shutdown().await;
}
