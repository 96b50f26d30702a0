//! A RabbitMQ cluster: the worker fails over to another node when the one it uses stops, and
//! at-least-once holds across it. The cluster is private to this test (its own ports and
//! directory, `scripts/rabbitmq-cluster.sh`) and torn down even when an assertion fails.

use crate::common;

use std::{collections::HashMap, time::Duration};

use futures_util::{StreamExt, stream};
use lapin::{
    BasicProperties, Connection,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use unassign_worker::{sim::Sim, worker::App};

use common::{Broker, Worker, cluster::Cluster};

const JOBS: usize = 2_000;

async fn broker_on(url: &str, settings: &unassign_worker::config::Settings) -> Broker {
    let connection = Connection::connect(url, Default::default())
        .await
        .expect("cluster node answers");
    let channel = connection.create_channel().await.unwrap();
    Broker {
        connection,
        channel,
        settings: settings.clone(),
    }
}

/// 2,000 jobs; the node the worker is connected to — which also leads every quorum queue — is
/// stopped mid-stream. The worker moves to another node, and every job gets an outcome event:
/// none lost, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_fails_over_when_its_node_stops() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::up(3, None))
        .await
        .unwrap()
        .expect("a local 3-node cluster starts");
    let sim = Sim::start(unassign_worker::sim::SimOptions {
        // Slow enough that the stop lands mid-stream, fast enough for a quick test.
        latency_ms: 10,
        ..common::sim_options()
    })
    .await
    .unwrap();
    let mut settings = common::settings(&sim, &common::prefix("cluster"));
    settings.amqp.url = cluster.urls().parse().unwrap();
    // Declared through node 1, so node 1 leads every queue (client-local leader placement).
    let declarer = broker_on(&cluster.url(1), &settings).await;
    unassign_worker::amqp::declare(&declarer.channel, &settings.amqp)
        .await
        .unwrap();
    assert_eq!(
        cluster.leader(&settings.amqp.queue).unwrap(),
        1,
        "node 1 leads the request queue"
    );
    // The test publishes and collects through node 3, which stays up.
    let broker = broker_on(&cluster.url(3), &settings).await;
    let events = broker.collect(&settings.amqp.outcomes_queue).await;
    let dead = broker.collect(&settings.amqp.dead_letter_queue).await;
    let worker = Worker::start(settings.clone()).await;
    worker.wait_ready().await;
    let node1 = format!("unassign_amqp_node{{node=\"{}\"}}", cluster.label(1));
    assert_eq!(
        worker.metric(&node1).await,
        1.0,
        "the worker starts on node 1"
    );

    let publisher = broker.publisher().await;
    let a = &settings.amqp;
    let ids: Vec<String> = (0..JOBS).map(|i| format!("fo-{i}")).collect();
    stream::iter(&ids)
        .for_each_concurrent(200, |id| {
            let body = serde_json::json!({"request_id": id, "device_id": common::device()});
            let publisher = publisher.clone();
            async move {
                let properties = BasicProperties::default().with_delivery_mode(2);
                publisher
                    .publish(
                        &a.exchange,
                        &a.routing_key,
                        body.to_string().as_bytes(),
                        properties,
                        true,
                    )
                    .await
                    .expect("publish confirmed");
            }
        })
        .await;

    events.wait_for(200, Duration::from_secs(60)).await;
    let stopped_at = events.len();
    tokio::task::block_in_place(|| cluster.stop(1)).expect("node 1 stops");
    assert!(
        stopped_at < JOBS,
        "node 1 stopped mid-stream ({stopped_at} of {JOBS} done)"
    );

    let all = common::eventually(
        "an outcome for every job",
        Duration::from_secs(120),
        || async {
            let mut per_id: HashMap<String, usize> = HashMap::new();
            for e in events.all() {
                *per_id.entry(e.event().data.request_id.clone()).or_default() += 1;
            }
            (ids.iter().all(|id| per_id.contains_key(id))).then_some(per_id)
        },
    )
    .await;
    let duplicates: usize = all.values().map(|n| n - 1).sum();
    eprintln!("{JOBS} jobs, node stopped after {stopped_at} outcomes, {duplicates} duplicate(s)");
    assert!(
        events.all().iter().all(|e| e.event().data.error.is_none()),
        "every outcome is a success"
    );
    assert_eq!(dead.len(), 0, "nothing dead-lettered");
    assert_eq!(worker.metric(&node1).await, 0.0, "the worker left node 1");
    assert!(worker.metric("unassign_amqp_reconnects_total").await >= 1.0);
    assert_eq!(worker.metric("unassign_amqp_connected").await, 1.0);
    assert_eq!(
        broker.depth(&settings.amqp.queue).await,
        0,
        "the queue drained"
    );
    worker.stop().await;
    sim.shutdown().await;
}

/// `amqp.quorum_initial_group_size` reaches the broker, and a queue declared with another value
/// is still a topology conflict (exit 2, naming the queue and the argument).
#[tokio::test]
async fn the_quorum_group_size_is_declared_and_a_mismatch_is_a_conflict() {
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let mut settings = common::settings(&sim, &common::prefix("groupsize"));
    settings.amqp.quorum_initial_group_size = 1;
    let broker = Broker::connect(&settings).await;
    // The broker kept the argument: redeclaring with it matches…
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-quorum-initial-group-size".into(),
        AMQPValue::LongLongInt(1),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let outcomes = settings.amqp.outcomes_queue.clone();
    broker
        .channel
        .queue_declare(outcomes.as_str().into(), options, args)
        .await
        .expect("the queue was declared with x-quorum-initial-group-size = 1");

    // …and a worker configured otherwise refuses to start.
    settings.amqp.quorum_initial_group_size = 3;
    let app = App::build(settings.clone()).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(20), app.run(Default::default()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.exit_code(), 2, "{error}");
    let text = error.to_string();
    assert!(
        text.contains(&settings.amqp.queue),
        "names the queue: {text}"
    );
    assert!(
        text.contains("x-quorum-initial-group-size"),
        "names the argument: {text}"
    );

    let channel = broker.connection.create_channel().await.unwrap();
    let _ = channel
        .queue_delete(outcomes.as_str().into(), QueueDeleteOptions::default())
        .await;
    broker.cleanup().await;
    sim.shutdown().await;
}

/// The operator commands take the node list too: with a first node that refuses connections,
/// `check`, `enqueue` and `dlq list` go to the next one; a bad entry is exit 2 naming the key,
/// and no password is ever printed.
#[tokio::test(flavor = "multi_thread")]
async fn the_commands_use_the_next_node_of_the_list() {
    use common::bin::{command, env_for, output};
    let sim = Sim::start(common::sim_options()).await.unwrap();
    let settings = common::settings(&sim, &common::prefix("cli-nodes"));
    let mut vars = env_for(&sim, &settings);
    vars.retain(|(k, _)| k != "AMQP_URL");
    let dead_node = "amqp://guest:hunter2@127.0.0.1:1/%2f";
    vars.push((
        "AMQP_URL".into(),
        format!("{dead_node},{}", common::amqp_url()),
    ));

    let (code, out, err) = output(command(&vars).arg("check"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok   broker: 127.0.0.1:5672 reachable"),
        "{out}"
    );
    let (code, out, err) = output(command(&vars).args([
        "enqueue",
        "--device-id",
        &common::device(),
        "--request-id",
        "nodes-1",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = output(command(&vars).args(["dlq", "list"]));
    assert_eq!(code, 0, "{out}{err}");
    let broker = Broker::connect(&settings).await;
    assert_eq!(broker.depth(&settings.amqp.queue).await, 1);

    vars.retain(|(k, _)| k != "AMQP_URL");
    vars.push((
        "AMQP_URL".into(),
        format!("{},http://u:hunter2@x", common::amqp_url()),
    ));
    let (code, out, err) = output(command(&vars).args(["dlq", "list"]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("amqp.url") && err.contains("(entry 2 of 2)") && err.contains("AMQP_URL"),
        "{err}"
    );
    for text in [&out, &err] {
        assert!(!text.contains("hunter2"), "password leaked: {text}");
    }
    broker.cleanup().await;
    sim.shutdown().await;
}
