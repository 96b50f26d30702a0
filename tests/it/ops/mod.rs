//! The operator commands against the real broker: `dlq list` loses nothing and tells worker-made
//! from broker-made dead letters; `dlq replay` moves exactly what its filters select, clears
//! the failure and counts the replay, and duplicates rather than loses when interrupted;
//! `enqueue --file` validates every row before publishing any.
//!
//! This file holds what the files below share: a test's broker objects with no worker running,
//! and the dead letters of every origin made on them.

mod dead_letters;
mod enqueue_file;

use crate::common;

use std::{collections::BTreeSet, time::Duration};

use common::{
    Broker, Worker,
    bin::{command, env_for, output},
    device, eventually,
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicConsumeOptions, BasicGetOptions, BasicNackOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use unassign_worker::{
    config::Settings,
    contract::{self, ErrorKind, Failure},
    ops::dlq::{self, DeadLetter, ReplayOptions},
    sim::{Scripted, Sim},
};

const WAIT: Duration = Duration::from_secs(30);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A simulator, the test's broker objects (delivery limit 2) and no worker running.
struct Ops {
    sim: Sim,
    broker: Broker,
}

impl Ops {
    async fn start(test: &str) -> Ops {
        let sim = Sim::start(common::sim_options()).await.unwrap();
        let mut settings = common::settings(&sim, &common::prefix(test));
        settings.amqp.delivery_limit = 2;
        let broker = Broker::connect(&settings).await;
        Ops { sim, broker }
    }

    fn settings(&self) -> &Settings {
        &self.broker.settings
    }

    fn dead(&self) -> String {
        self.settings().amqp.dead_letter_queue.clone()
    }

    fn requests(&self) -> String {
        self.settings().amqp.queue.clone()
    }

    fn env(&self) -> Vec<(String, String)> {
        env_for(&self.sim, self.settings())
    }

    async fn depth_becomes(&self, queue: &str, n: u32) {
        eventually(&format!("{queue} to hold {n}"), WAIT, || async {
            (self.broker.depth(queue).await == n).then_some(())
        })
        .await;
    }

    /// The crash-loop guard at work: a consumer that rejects with requeue until the broker
    /// dead-letters the request itself (x-death reason `delivery_limit`).
    async fn broker_dead_letter(&self, request_id: &str) {
        let before = self.broker.depth(&self.dead()).await;
        self.broker.publish_request(request_id, &device()).await;
        let channel = self.broker.connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                self.requests().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let rejecter = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                let _ = delivery.nack(requeue).await;
            }
        });
        self.depth_becomes(&self.dead(), before + 1).await;
        rejecter.abort();
        let _ = channel.close(200, "".into()).await;
    }

    /// Requests the worker fails with `device_not_found` (graph-sim scripted to answer 404).
    async fn worker_dead_letters(&self, ids: &[&str]) {
        let before = self.broker.depth(&self.dead()).await;
        self.sim.push_script(ids.iter().map(|_| Scripted {
            status: 404,
            retry_after: None,
            delay_ms: 0,
        }));
        let worker = Worker::start(self.settings().clone()).await;
        worker.wait_ready().await;
        for id in ids {
            let mut table = FieldTable::default();
            table.insert(
                "traceparent".into(),
                AMQPValue::LongString(TRACEPARENT.into()),
            );
            let body = serde_json::json!({"request_id": id, "device_id": device()});
            self.broker
                .publish(
                    body.to_string().as_bytes(),
                    BasicProperties::default().with_headers(table),
                )
                .await;
        }
        self.depth_becomes(&self.dead(), before + ids.len() as u32)
            .await;
        worker.stop().await;
    }

    /// A dead letter as the worker writes it, published straight to the DLX.
    async fn manufactured_dead_letter(&self, request_id: &str) {
        let failure = Failure::new(ErrorKind::RetriesExhausted, "retry budget spent");
        let now = time::OffsetDateTime::now_utc();
        let table = contract::dead_letter_headers(None, &failure, 20, now);
        let body = serde_json::json!({"request_id": request_id, "device_id": device()});
        let a = &self.settings().amqp;
        self.broker
            .publisher()
            .await
            .publish(
                &a.dead_letter_exchange,
                "",
                body.to_string().as_bytes(),
                contract_properties(request_id).with_headers(table),
                true,
            )
            .await
            .unwrap();
    }

    async fn connection(&self) -> Connection {
        Connection::connect(&common::amqp_url(), ConnectionProperties::default())
            .await
            .unwrap()
    }

    async fn browse(&self) -> Vec<DeadLetter> {
        let connection = self.connection().await;
        let listing = dlq::browse(&connection, &self.settings().amqp, None)
            .await
            .unwrap();
        let _ = connection.close(200, "".into()).await;
        listing.letters
    }

    async fn replay(&self, options: ReplayOptions) -> Vec<String> {
        let connection = self.connection().await;
        let mut moved = Vec::new();
        dlq::replay(&connection, &self.settings().amqp, &options, |l| {
            moved.push(l.request_id.clone().unwrap())
        })
        .await
        .unwrap();
        let _ = connection.close(200, "".into()).await;
        moved.sort();
        moved
    }

    /// Every message in `queue` (body, properties, redelivered), handed back afterwards.
    async fn peek(&self, queue: &str) -> Vec<(Value, BasicProperties, bool)> {
        let channel = self.broker.connection.create_channel().await.unwrap();
        let mut seen = Vec::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let d = m.delivery;
            seen.push((
                serde_json::from_slice(&d.data).unwrap(),
                d.properties,
                d.redelivered,
            ));
        }
        let _ = channel.close(200, "".into()).await;
        seen
    }

    async fn finish(self) {
        self.broker.cleanup().await;
        self.sim.shutdown().await;
    }
}

fn contract_properties(request_id: &str) -> BasicProperties {
    unassign_worker::ops::batch::request_properties(request_id)
}

fn ids(letters: &[DeadLetter]) -> BTreeSet<String> {
    letters
        .iter()
        .filter_map(|l| l.request_id.clone())
        .collect()
}
