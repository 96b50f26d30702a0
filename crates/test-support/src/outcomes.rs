//! Outcome events counted per request id while broker nodes come and go: the consumer moves to
//! the next node of a list when it loses one. Each event's `time` (when a worker finished the
//! job) and its arrival are kept, so a fail-over can be timed to the first event of a job
//! finished after the fault — not one already on its way.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures_util::StreamExt;
use lapin::{
    Connection,
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

#[derive(Default)]
struct Seen {
    /// Events per request id, and whether any said `failed`.
    by_request: HashMap<String, (u32, bool)>,
    /// Every event's `source`, `time` and arrival.
    completed: Vec<(String, SystemTime, SystemTime)>,
}

#[derive(Clone, Default)]
pub struct Outcomes(Arc<Mutex<Seen>>);

/// (requests with an outcome, duplicate events, requests that failed)
pub struct Tally {
    pub done: usize,
    pub duplicates: u32,
    pub failed: usize,
}

impl Outcomes {
    /// Consumes `queue` through the first node of `urls` that answers, moving on when it is lost.
    pub fn track(urls: Vec<String>, queue: String) -> Outcomes {
        let outcomes = Outcomes::default();
        let sink = outcomes.clone();
        tokio::spawn(async move {
            for url in urls.iter().cycle() {
                let _ = sink.consume(url, &queue).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        outcomes
    }

    async fn consume(&self, url: &str, queue: &str) -> anyhow::Result<()> {
        let connection = Connection::connect(url, Default::default()).await?;
        let channel = connection.create_channel().await?;
        let options = BasicConsumeOptions::default();
        let mut consumer = channel
            .basic_consume(queue.into(), "bench".into(), options, FieldTable::default())
            .await?;
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
            let id = event["data"]["request_id"].as_str().unwrap_or_default();
            let failed = event["data"]["outcome"] != "succeeded";
            let time = event["time"].as_str().unwrap_or_default();
            let completed = OffsetDateTime::parse(time, &Rfc3339)?.into();
            let source = event["source"].as_str().unwrap_or_default().to_owned();
            {
                let mut seen = self.0.lock().unwrap();
                let entry = seen.by_request.entry(id.to_owned()).or_default();
                entry.0 += 1;
                entry.1 |= failed;
                seen.completed.push((source, completed, SystemTime::now()));
            }
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    pub fn done(&self) -> usize {
        self.0.lock().unwrap().by_request.len()
    }

    /// Waits until at least `n` distinct requests have an outcome.
    pub async fn until(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
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

    /// Waits until `n` distinct requests have an outcome, or none came for `idle`.
    pub async fn until_done(&self, n: usize, idle: Duration) {
        let (mut last_count, mut last_change) = (self.done(), Instant::now());
        while self.done() < n && last_change.elapsed() < idle {
            if self.done() != last_count {
                (last_count, last_change) = (self.done(), Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Time from `since` to the arrival of the first event of a job finished after it, by the
    /// worker whose events have `source` (any worker: `None`).
    pub fn first_after(&self, since: SystemTime, source: Option<&str>) -> Option<Duration> {
        let seen = self.0.lock().unwrap();
        let arrived = seen
            .completed
            .iter()
            .filter(|(from, completed, _)| *completed > since && source.is_none_or(|s| s == from))
            .map(|(_, _, arrived)| *arrived)
            .min()?;
        arrived.duration_since(since).ok()
    }

    /// Arrival times of every event, in order.
    fn arrivals(&self) -> Vec<SystemTime> {
        let seen = self.0.lock().unwrap();
        seen.completed
            .iter()
            .map(|(_, _, arrived)| *arrived)
            .collect()
    }

    /// The longest stretch without an event arriving, from `since` to the last event: how long
    /// a fault that ended at `since` kept the work from flowing (noticing it included).
    pub fn longest_gap_after(&self, since: SystemTime) -> Option<Duration> {
        let arrivals = self.arrivals();
        let after: Vec<SystemTime> = arrivals.into_iter().filter(|a| *a > since).collect();
        let first = after.first()?.duration_since(since).ok()?;
        let gaps = after
            .windows(2)
            .filter_map(|w| w[1].duration_since(w[0]).ok());
        Some(gaps.fold(first, Duration::max))
    }

    /// From `since` to the arrival of the last event.
    pub fn last_after(&self, since: SystemTime) -> Option<Duration> {
        self.arrivals().last()?.duration_since(since).ok()
    }

    pub fn tally(&self) -> Tally {
        let seen = self.0.lock().unwrap();
        Tally {
            done: seen.by_request.len(),
            duplicates: seen.by_request.values().map(|(n, _)| n - 1).sum(),
            failed: seen.by_request.values().filter(|(_, f)| *f).count(),
        }
    }
}
