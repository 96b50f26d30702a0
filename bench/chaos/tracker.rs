//! Outcome events as the chaos bench sees them: per request id, and when each arrived.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    Connection,
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};

#[derive(Default)]
struct Seen {
    /// Events per request id, and whether any said failed.
    by_request: HashMap<String, (u32, bool)>,
    /// Arrival time of every event, in order.
    arrivals: Vec<Instant>,
}

/// Consumes the outcomes queue for the whole run, reconnecting whenever the broker goes away.
#[derive(Clone, Default)]
pub struct Tracker(Arc<Mutex<Seen>>);

/// What a run produced.
pub struct Tally {
    pub outcomes: usize,
    pub duplicates: u32,
    pub failed: usize,
}

impl Tracker {
    pub fn start(amqp_url: String, queue: String) -> Tracker {
        let tracker = Tracker::default();
        let sink = tracker.clone();
        tokio::spawn(async move {
            loop {
                let _ = sink.consume(&amqp_url, &queue).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        tracker
    }

    async fn consume(&self, amqp_url: &str, queue: &str) -> anyhow::Result<()> {
        let connection = Connection::connect(amqp_url, Default::default()).await?;
        let channel = connection.create_channel().await?;
        let options = BasicConsumeOptions::default();
        let mut consumer = channel
            .basic_consume(queue.into(), "chaos".into(), options, FieldTable::default())
            .await?;
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
            let id = event["data"]["request_id"].as_str().unwrap_or_default();
            let failed = event["data"]["outcome"] != "succeeded";
            {
                let mut seen = self.0.lock().unwrap();
                let entry = seen.by_request.entry(id.to_owned()).or_default();
                entry.0 += 1;
                entry.1 |= failed;
                seen.arrivals.push(Instant::now());
            }
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    /// Distinct request ids with an outcome.
    pub fn done(&self) -> usize {
        self.0.lock().unwrap().by_request.len()
    }

    fn last(&self) -> Option<Instant> {
        self.0.lock().unwrap().arrivals.last().copied()
    }

    /// Waits until at least `n` distinct requests have an outcome.
    pub async fn until(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.done() < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "stuck at {} outcomes",
                self.done()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until `n` distinct requests have an outcome, or nothing new came for `idle`.
    pub async fn until_done(&self, n: usize, idle: Duration) {
        let started = Instant::now();
        while self.done() < n {
            if self.last().unwrap_or(started).max(started).elapsed() > idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Time from `since` to the first outcome event after it.
    pub fn first_after(&self, since: Instant) -> Option<Duration> {
        let seen = self.0.lock().unwrap();
        let i = seen.arrivals.partition_point(|a| *a <= since);
        seen.arrivals.get(i).map(|a| *a - since)
    }

    /// Time from `since` to the last outcome event.
    pub fn last_after(&self, since: Instant) -> Option<Duration> {
        self.last().filter(|l| *l > since).map(|l| l - since)
    }

    pub fn tally(&self) -> Tally {
        let seen = self.0.lock().unwrap();
        Tally {
            outcomes: seen.by_request.len(),
            duplicates: seen.by_request.values().map(|(n, _)| n - 1).sum(),
            failed: seen.by_request.values().filter(|(_, f)| *f).count(),
        }
    }
}
