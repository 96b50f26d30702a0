//! The delivery invariants of CONTRACT section 6: no confirm, no ack; connection loss and
//! shutdown lose nothing; a conflicting topology is a configuration error.

use crate::common;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use common::{Broker, Env, Worker, device, eventually, relay::Relay};
use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use unassign_worker::{
    amqp::{self, publisher::CONFIRM_TIMEOUT},
    sim::Sim,
    worker::App,
};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_unconfirmed_outcome_leaves_the_request_unacked() {
    let env = Env::start("noconfirm").await;
    // A queue that refuses every message, bound to the events exchange: the broker nacks
    // every event publish (reject-publish), so no outcome can be confirmed.
    let refuser = format!("{}.refuser", env.settings().amqp.queue);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let ch = &env.broker.channel;
    ch.queue_declare(
        refuser.as_str().into(),
        QueueDeclareOptions::default(),
        args,
    )
    .await
    .unwrap();
    let events_x = env.settings().amqp.events_exchange.clone();
    ch.queue_bind(
        refuser.as_str().into(),
        events_x.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let dev = device();
    env.broker.publish_request("held-1", &dev).await;
    eventually("the Graph call", WAIT, || async {
        (env.sim.stats().action_calls == 1).then_some(())
    })
    .await;
    // The worker keeps retrying the publish while holding the delivery: the request is neither
    // acked nor dead-lettered, and Graph is not called again.
    eventually("a refused publish to be retried", WAIT, || async {
        let (_, logs) = env.worker.get("/metrics").await;
        logs.contains("unassign_inflight_jobs 1").then_some(())
    })
    .await;
    let queue = env.settings().amqp.queue.clone();
    assert_eq!(env.broker.depth(&queue).await, 0, "held, not acked");

    // Shut the worker down: the held request goes back to the queue, nothing is lost.
    let Env {
        sim,
        broker,
        events,
        dead,
        worker,
    } = env;
    worker.stop().await;
    // The requeue is the broker's, on a quorum queue: visible once it has committed it.
    eventually("the request back in the queue", WAIT, || async {
        (broker.depth(&queue).await == 1).then_some(())
    })
    .await;
    assert_eq!(dead.len(), 0);
    assert_eq!(sim.stats().calls_by_device.get(&dev), Some(&1));

    // Once events can be confirmed again, a new worker completes it.
    broker
        .channel
        .queue_delete(refuser.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let worker = Worker::start(broker.settings.clone()).await;
    eventually("the request to be completed and acked", WAIT, || async {
        (worker
            .metric("unassign_jobs_total{outcome=\"succeeded\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(broker.depth(&queue).await, 0);
    assert!(
        events
            .all()
            .iter()
            .all(|e| e.event().data.request_id == "held-1")
    );
    Env {
        sim,
        broker,
        events,
        dead,
        worker,
    }
    .finish()
    .await;
}

#[tokio::test]
async fn a_cut_broker_connection_is_rebuilt_and_every_job_finishes() {
    survives_a_broken_link("cut", Relay::cut, true).await;
}

#[tokio::test]
async fn a_stalled_broker_connection_is_noticed_by_heartbeats() {
    survives_a_broken_link("stall", Relay::stall, true).await;
}

/// A job whose outcome went out just as its link went silent waits for a confirm that cannot
/// come. Once heartbeats declare the connection dead, lapin fails the confirms still pending on
/// it, so the job gives up at once — the broker requeues the delivery by itself — and the worker
/// is idle again within seconds, not after the publisher's confirm timeout (which is for a live
/// link whose confirm is late).
#[tokio::test]
async fn a_publish_on_a_link_found_dead_stops_waiting_for_its_confirm() {
    let sim_options = unassign_worker::sim::SimOptions {
        latency_ms: 300,
        ..common::sim_options()
    };
    let sim = Sim::start(sim_options).await.unwrap();
    let mut settings = common::settings(&sim, &common::prefix("deadconfirm"));
    settings.amqp.heartbeat_secs = 1;
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let mut worker_settings = settings.clone();
    worker_settings.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr)
        .parse()
        .unwrap();
    let worker = Worker::start(worker_settings).await;
    worker.wait_ready().await;

    broker.publish_request("deadconfirm-1", &device()).await;
    eventually("the Graph call under way", WAIT, || async {
        (sim.stats().action_calls == 1).then_some(())
    })
    .await;
    // Graph answers 0.3 s after the call, well before heartbeats can find the link dead: the
    // outcome is published into the silent link.
    assert!(
        relay.stall() >= 1,
        "the worker's link went through the relay"
    );
    events.wait_for(1, WAIT).await;
    let idle_within = CONFIRM_TIMEOUT / 2;
    eventually("no job in flight", idle_within, || async {
        (worker.metric("unassign_inflight_jobs").await == 0.0).then_some(())
    })
    .await;
    assert!(worker.metric("unassign_amqp_reconnects_total").await >= 1.0);
    worker.stop().await;
    broker.cleanup().await;
    sim.shutdown().await;
}

/// 100 ms more each way on every chunk: slower, but nothing breaks and nothing is lost.
#[tokio::test]
async fn a_slow_broker_link_loses_nothing() {
    let slow = |relay: &Relay| relay.slow(Duration::from_millis(100));
    survives_a_broken_link("slow", slow, false).await;
}

/// A broker URL may name its host by IP address, v4 or v6: the worker connects there, not to
/// `localhost` (which lapin's own URL parsing falls back to for an IPv6 address).
#[tokio::test]
async fn a_broker_url_may_name_an_ip_address() {
    for listen in ["127.0.0.2:0", "[::1]:0"] {
        let relay = Relay::start_on(listen, common::broker_addr().await).await;
        let mut settings = unassign_worker::config::Settings::load(None).unwrap();
        settings.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr)
            .parse()
            .unwrap();
        assert_eq!(settings.amqp.url.labels(), [relay.addr.to_string()]);
        let connected = amqp::connect(&settings.amqp, "unassign-worker/test", 0).await;
        let (connection, _) = connected.unwrap_or_else(|e| panic!("{listen}: {e:#}"));
        assert_eq!(relay.cut(), 1, "{listen}: connected through the relay");
        drop(connection);
    }
}

/// 40 jobs through a worker whose broker connection runs through a relay; after 5 outcomes
/// `break_link` breaks (or degrades) it. The worker must notice a broken link (a closed socket at
/// once, a silent one by missed heartbeats), reconnect on its own and finish every job,
/// dead-lettering none.
async fn survives_a_broken_link(test: &str, break_link: fn(&Relay) -> usize, breaks: bool) {
    let sim_options = unassign_worker::sim::SimOptions {
        latency_ms: 50,
        ..common::sim_options()
    };
    let sim = Sim::start(sim_options).await.unwrap();
    let mut settings = common::settings(&sim, &common::prefix(test));
    // Heartbeats every second, so a silent link is declared dead within a few.
    settings.amqp.heartbeat_secs = 1;
    let broker = Broker::connect(&settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let dead = broker.collect(&settings.amqp.dead_letter_queue).await;
    let relay = Relay::to_broker(&common::amqp_url()).await;
    let mut worker_settings = settings.clone();
    worker_settings.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr)
        .parse()
        .unwrap();
    let worker = Worker::start(worker_settings).await;
    worker.wait_ready().await;

    let ids: Vec<String> = (0..40).map(|i| format!("{test}-{i}")).collect();
    for id in &ids {
        broker.publish_request(id, &device()).await;
    }
    events.wait_for(5, WAIT).await;
    assert!(
        break_link(&relay) >= 1,
        "the worker's connection went through the relay"
    );

    eventually("every job to finish after reconnecting", WAIT, || async {
        let done: BTreeSet<String> = events
            .all()
            .iter()
            .map(|e| e.event().data.request_id)
            .collect();
        ids.iter().all(|id| done.contains(id)).then_some(())
    })
    .await;
    if breaks {
        assert!(worker.metric("unassign_amqp_reconnects_total").await >= 1.0);
    }
    assert_eq!(worker.metric("unassign_amqp_connected").await, 1.0);
    worker.wait_ready().await;
    assert_eq!(dead.len(), 0);
    worker.stop().await;
    broker.cleanup().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_conflicting_queue_is_a_configuration_error_naming_it() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("conflict"));
    let connection = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    // A classic queue where the worker wants a quorum queue with dead-lettering.
    let queue = settings.amqp.queue.clone();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let app = App::build(settings).await.unwrap();
    let error = tokio::time::timeout(WAIT, app.run(Default::default()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.exit_code(), 2, "{error}");
    let text = error.to_string();
    assert!(text.contains(&queue), "names the queue: {text}");
    assert!(
        text.contains("x-queue-type") || text.contains("x-dead-letter-exchange"),
        "names the argument: {text}"
    );

    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    sim.shutdown().await;
}

const RECONNECTS: &str = "unassign_amqp_reconnects_total";

/// Waits until the worker has counted a channel error of `reason` — or reconnected instead,
/// which the caller then reports as the failure it is.
async fn channel_error_or_reconnect(worker: &Worker, reason: &str, at_least: f64) {
    let errors = format!("unassign_amqp_channel_errors_total{{reason=\"{reason}\"}}");
    eventually(
        &format!("{at_least} {reason} channel error(s)"),
        WAIT,
        || async {
            let reconnected = worker.metric(RECONNECTS).await > 0.0;
            (reconnected || worker.metric(&errors).await >= at_least).then_some(())
        },
    )
    .await;
}

/// The queue-depth poll against a queue that is gone closes its own channel, not the session:
/// no reconnect, nothing redelivered, jobs keep flowing.
#[tokio::test]
async fn a_missing_queue_in_the_depth_poll_does_not_end_the_session() {
    let env = Env::start_with("pollgone", common::sim_options(), |s| {
        s.amqp.queue_poll = std::time::Duration::from_secs(1);
    })
    .await;
    let a = env.settings().amqp.clone();
    env.broker
        .channel
        .queue_delete(
            a.dead_letter_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    channel_error_or_reconnect(&env.worker, "queue_poll", 2.0).await;
    assert_eq!(env.worker.metric(RECONNECTS).await, 0.0, "no reconnect");

    for i in 0..3 {
        env.broker
            .publish_request(&format!("pollgone-{i}"), &device())
            .await;
    }
    env.events.wait_for(3, WAIT).await;
    assert_eq!(env.worker.metric(RECONNECTS).await, 0.0, "no reconnect");
    assert_eq!(env.sim.stats().action_calls, 3, "nothing redelivered");
    amqp::declare(&env.broker.channel, &a).await.unwrap();
    env.finish().await;
}

/// A publish the broker refuses at channel level (its exchange is gone) closes the publish
/// channel only: the worker reopens it and retries while holding the delivery — no reconnect,
/// no redelivery loop — and once the exchange is back, publishes the outcome and acks once.
#[tokio::test]
async fn a_refused_publish_reopens_its_channel_and_settles_once() {
    let env = Env::start("xgone").await;
    let a = env.settings().amqp.clone();
    env.broker
        .channel
        .exchange_delete(a.events_exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    let dev = device();
    env.broker.publish_request("xgone-1", &dev).await;
    channel_error_or_reconnect(&env.worker, "publish", 2.0).await;
    assert_eq!(env.worker.metric(RECONNECTS).await, 0.0, "no reconnect");
    assert_eq!(env.broker.depth(&a.queue).await, 0, "held, not requeued");
    assert_eq!(env.sim.stats().action_calls, 1, "not redelivered");

    amqp::declare(&env.broker.channel, &a).await.unwrap();
    let succeeded = "unassign_jobs_total{outcome=\"succeeded\"}";
    eventually("the outcome to be published and acked", WAIT, || async {
        (env.worker.metric(succeeded).await == 1.0).then_some(())
    })
    .await;
    env.events.wait_for(1, WAIT).await;
    assert_eq!(env.broker.depth(&a.queue).await, 0, "acked");
    assert_eq!(env.worker.metric(RECONNECTS).await, 0.0, "no reconnect");
    assert_eq!(env.sim.stats().calls_by_device.get(&dev), Some(&1));
    // Settled for good: nothing comes back for a second outcome.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.events.len(), 1, "one outcome");
    assert_eq!(env.worker.metric(succeeded).await, 1.0);
    env.finish().await;
}

/// A publisher that replaces its channel as the worker's does, counting the replacements.
async fn counting_publisher(
    connection: &Arc<lapin::Connection>,
) -> (amqp::Publisher, Arc<AtomicU32>) {
    let reopens = Arc::new(AtomicU32::new(0));
    let counted = reopens.clone();
    let reopened = move || {
        counted.fetch_add(1, Ordering::Relaxed);
    };
    let publisher = amqp::Publisher::reopening(connection, reopened)
        .await
        .unwrap();
    (publisher, reopens)
}

/// Publishes that all find the publish channel closed open one fresh channel between them.
#[tokio::test]
async fn concurrent_publishes_reopen_a_closed_channel_once() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("reopen"));
    let broker = Broker::connect(&settings).await;
    let connection = Arc::new(
        lapin::Connection::connect(&common::amqp_url(), Default::default())
            .await
            .unwrap(),
    );
    let (publisher, reopens) = counting_publisher(&connection).await;
    let publish = |exchange: &'static str, key: String| {
        let publisher = publisher.clone();
        async move {
            let properties = lapin::BasicProperties::default();
            publisher
                .publish(exchange, &key, b"{}", properties, true)
                .await
        }
    };
    let refused = publish("no-such-exchange", String::new()).await;
    assert!(
        matches!(refused, Err(amqp::PublishError::Broker(_))),
        "{refused:?}"
    );

    let outcomes = &settings.amqp.outcomes_queue;
    let published = futures_util::future::join_all((0..10).map(|_| publish("", outcomes.clone())));
    for result in published.await {
        result.expect("published on the reopened channel");
    }
    assert_eq!(reopens.load(Ordering::Relaxed), 1, "one reopen");
    publisher.close().await;
    broker.cleanup().await;
    sim.shutdown().await;
}

/// A nack retires the publish channel: the next publish goes out on a fresh one, opened once
/// however many publishes were nacked together. (RabbitMQ 3.10 can leave a channel that
/// published while a quorum queue had no leader nacking every later publish to it; that is
/// what stalled `cluster::the_worker_fails_over_when_its_node_stops` now and then.)
#[tokio::test]
async fn a_nack_retires_the_publish_channel() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("nackreopen"));
    let broker = Broker::connect(&settings).await;
    // A queue that refuses every message: the broker nacks each publish to it.
    let refuser = format!("{}.refuser", settings.amqp.queue);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let options = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    broker
        .channel
        .queue_declare(refuser.as_str().into(), options, args)
        .await
        .unwrap();
    let connection = Arc::new(
        lapin::Connection::connect(&common::amqp_url(), Default::default())
            .await
            .unwrap(),
    );
    let (publisher, reopens) = counting_publisher(&connection).await;
    let publish = |key: String| {
        let publisher = publisher.clone();
        async move {
            let properties = lapin::BasicProperties::default();
            publisher.publish("", &key, b"{}", properties, true).await
        }
    };
    let reopened = |n: u32| assert_eq!(reopens.load(Ordering::Relaxed), n, "reopens");

    let outcomes = &settings.amqp.outcomes_queue;
    for round in 1..=2 {
        let nacked = futures_util::future::join_all((0..5).map(|_| publish(refuser.clone())));
        for result in nacked.await {
            assert!(
                matches!(result, Err(amqp::PublishError::Nacked)),
                "{result:?}"
            );
        }
        reopened(round - 1);
        let published = futures_util::future::join_all((0..10).map(|_| publish(outcomes.clone())));
        for result in published.await {
            result.expect("published on a fresh channel");
        }
        reopened(round);
    }
    publisher.close().await;
    let _ = broker
        .channel
        .queue_delete(refuser.as_str().into(), QueueDeleteOptions::default())
        .await;
    broker.cleanup().await;
    sim.shutdown().await;
}
