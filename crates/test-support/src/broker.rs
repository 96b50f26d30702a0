//! The broker stage of one test or bench run: its uniquely named objects, declared fresh and
//! deleted at the end, publishing as a producer would, and collectors for what comes back.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde_json::Value;
use unassign_worker::{
    amqp::{self, Publisher},
    config::{AmqpSettings, Settings},
    contract::OutcomeEvent,
};

use crate::{amqp_url, eventually};

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub fn event(&self) -> OutcomeEvent {
        serde_json::from_slice(&self.body).expect("a CloudEvent")
    }

    pub fn header(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }
}

/// Everything consumed from one queue, collected in the background.
#[derive(Clone, Default)]
pub struct Collector(Arc<Mutex<Vec<Received>>>);

impl Collector {
    pub fn all(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }

    /// How many arrived so far: tests compare it with a count, never ask for emptiness alone.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        eventually(&format!("{n} message(s)"), timeout, || async {
            let all = self.all();
            (all.len() >= n).then_some(all)
        })
        .await
    }
}

/// The test's own view of the broker and the objects it names.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
    pub settings: Settings,
}

impl Broker {
    pub async fn connect(settings: &Settings) -> Broker {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("test broker connection");
        let channel = connection.create_channel().await.unwrap();
        let broker = Broker {
            connection,
            channel,
            settings: settings.clone(),
        };
        amqp::declare(&broker.channel, &settings.amqp)
            .await
            .expect("declare the test topology");
        broker
    }

    /// Consumes `queue` into a collector, acking each message.
    pub async fn collect(&self, queue: &str) -> Collector {
        let channel = self.connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let collector = Collector::default();
        let sink = collector.clone();
        tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                sink.0.lock().unwrap().push(Received {
                    body: delivery.data.clone(),
                    properties: delivery.properties.clone(),
                });
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        collector
    }

    pub async fn publisher(&self) -> Publisher {
        Publisher::open(&self.connection).await.unwrap()
    }

    /// Publishes a request body as a producer would (persistent JSON, confirmed).
    pub async fn publish(&self, body: &[u8], properties: BasicProperties) {
        let properties = properties
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let a = &self.settings.amqp;
        self.publisher()
            .await
            .publish(&a.exchange, &a.routing_key, body, properties, true)
            .await
            .expect("publish confirmed");
    }

    pub async fn publish_request(&self, request_id: &str, device_id: &str) {
        let body = serde_json::json!({"request_id": request_id, "device_id": device_id, "requested_by": "tests", "reason": "offboarding"});
        self.publish(body.to_string().as_bytes(), BasicProperties::default())
            .await;
    }

    /// Ready messages in `queue` (unacked ones are not counted).
    pub async fn depth(&self, queue: &str) -> u32 {
        ready(&self.connection, queue).await.expect("queue exists")
    }

    /// Deletes the test's queues and exchanges.
    pub async fn cleanup(&self) {
        delete_objects(&self.connection, &self.settings.amqp).await;
    }
}

/// Names the broker objects of `amqp` after `prefix`, so that runs side by side on one broker,
/// and a run and a real installation, never share a queue.
pub fn name_objects(amqp: &mut AmqpSettings, prefix: &str) {
    amqp.exchange = format!("{prefix}.requests.x");
    amqp.queue = format!("{prefix}.requests");
    amqp.dead_letter_exchange = format!("{prefix}.dlx");
    amqp.dead_letter_queue = format!("{prefix}.dead");
    amqp.events_exchange = format!("{prefix}.events");
    amqp.outcomes_queue = format!("{prefix}.outcomes");
}

/// Ready messages in `queue` (unacked ones are not counted), on a channel of its own: a passive
/// declare of a missing queue closes the channel it ran on.
pub async fn ready(connection: &Connection, queue: &str) -> lapin::Result<u32> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    let _ = channel.close(200, "".into()).await;
    Ok(q.message_count())
}

/// Deletes the queues (delay tiers included) and exchanges `amqp` names, and the replicas'
/// control exchange; what is already gone is no error.
pub async fn delete_objects(connection: &Connection, amqp: &AmqpSettings) {
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let tiers = amqp
        .delay_tiers_secs
        .iter()
        .map(|&secs| amqp.tier_queue(secs));
    let queues = [
        amqp.queue.clone(),
        amqp.dead_letter_queue.clone(),
        amqp.outcomes_queue.clone(),
    ];
    for q in queues.into_iter().chain(tiers) {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    // The replicas' control exchange is durable too: the workers declare it, nobody deletes it.
    let control = unassign_worker::replicas::control_exchange(amqp);
    for x in [
        &amqp.exchange,
        &amqp.dead_letter_exchange,
        &amqp.events_exchange,
        &control,
    ] {
        let _ = channel
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
