//! Chaos bench: faults injected while workers drain jobs against graph-sim; every request id must
//! end with an outcome event. Prints one table row per scenario (for RELIABILITY.md).
//!
//!     bench/run.sh chaos                       # all scenarios
//!     bench/run.sh chaos --only kill           # kill | broker
//!
//! `broker` stops and starts the local RabbitMQ app (`rabbitmqctl stop_app` / `start_app`): it
//! disturbs everything on the broker, so it lives here and not in the tests. The app is started
//! again whatever happens.

#[path = "common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use common::{Topology, WorkerProcess};
use futures_util::StreamExt;
use lapin::{
    Connection,
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};
use unassign_worker::sim::{Sim, SimOptions};

/// Outcome events seen, per request id, and when the last one arrived.
#[derive(Default)]
struct Seen {
    by_request: HashMap<String, (u32, bool)>,
    last: Option<Instant>,
}

#[derive(Clone, Default)]
struct Tracker(Arc<Mutex<Seen>>);

impl Tracker {
    /// Consumes the outcomes queue, reconnecting whenever the broker goes away.
    fn start(queue: String) -> Tracker {
        let tracker = Tracker::default();
        let sink = tracker.clone();
        tokio::spawn(async move {
            loop {
                let _ = sink.consume(&queue).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        tracker
    }

    async fn consume(&self, queue: &str) -> anyhow::Result<()> {
        let connection = Connection::connect(&common::amqp_url(), Default::default()).await?;
        let channel = connection.create_channel().await?;
        let options = BasicConsumeOptions::default();
        let mut consumer = channel
            .basic_consume(queue.into(), "chaos".into(), options, FieldTable::default())
            .await?;
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
            let id = event["data"]["request_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let failed = event["data"]["outcome"] != "succeeded";
            {
                let mut seen = self.0.lock().unwrap();
                let entry = seen.by_request.entry(id).or_default();
                entry.0 += 1;
                entry.1 |= failed;
                seen.last = Some(Instant::now());
            }
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    fn done(&self) -> usize {
        self.0.lock().unwrap().by_request.len()
    }

    fn last(&self) -> Option<Instant> {
        self.0.lock().unwrap().last
    }

    /// Waits until `n` distinct requests have an outcome, or nothing new came for `idle`.
    async fn until_done(&self, n: usize, idle: Duration) {
        let started = Instant::now();
        while self.done() < n {
            let last = self.last().unwrap_or(started);
            if last.elapsed() > idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until at least `n` distinct requests have an outcome.
    async fn until(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
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

    /// Time from `since` to the first outcome after it.
    async fn next_after(&self, since: Instant) -> anyhow::Result<Duration> {
        let deadline = since + Duration::from_secs(120);
        loop {
            if let Some(last) = self.last().filter(|l| *l > since) {
                return Ok(last - since);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no outcome for 120 s after the fault"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// (requests with an outcome, duplicate events, requests that failed)
    fn tally(&self) -> (usize, u32, usize) {
        let seen = self.0.lock().unwrap();
        let duplicates = seen.by_request.values().map(|(n, _)| n - 1).sum();
        let failed = seen.by_request.values().filter(|(_, f)| *f).count();
        (seen.by_request.len(), duplicates, failed)
    }
}

struct Row {
    scenario: &'static str,
    jobs: usize,
    faults: String,
    recovery: Duration,
    tracker: Tracker,
}

fn worker_vars() -> Vec<(&'static str, String)> {
    vec![
        ("UNASSIGN__WORKER__CONCURRENCY", "16".to_owned()),
        ("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0".to_owned()),
        ("UNASSIGN__GRAPH__ADAPTIVE_THROTTLING", "false".to_owned()),
        ("UNASSIGN__AMQP__HEARTBEAT_SECS", "2".to_owned()),
    ]
}

/// graph-sim (20 ms latency), a fresh topology holding `jobs` requests, and an outcome tracker.
async fn start(name: &str, jobs: usize) -> anyhow::Result<(Sim, Topology, Tracker)> {
    let sim = Sim::start(SimOptions {
        latency_ms: 20,
        ..SimOptions::default()
    })
    .await?;
    let topology = Topology::declare(name).await?;
    topology.publish(jobs).await?;
    let tracker = Tracker::start(topology.settings.amqp.outcomes_queue.clone());
    Ok((sim, topology, tracker))
}

/// SIGKILL the worker five times while it drains, restarting it each time.
async fn kill(jobs: usize) -> anyhow::Result<Row> {
    let (sim, topology, tracker) = start("chaos-kill", jobs).await?;
    let vars = worker_vars();
    let mut worker = WorkerProcess::spawn(&sim, &topology, 19480, &vars)?;
    let mut recovery = Duration::ZERO;
    for (i, share) in [0.1, 0.25, 0.45, 0.65, 0.85].into_iter().enumerate() {
        tracker.until((jobs as f64 * share) as usize).await?;
        worker.kill()?;
        let killed = Instant::now();
        worker = WorkerProcess::spawn(&sim, &topology, 19481 + i as u16, &vars)?;
        recovery = recovery.max(tracker.next_after(killed).await?);
    }
    tracker.until_done(jobs, Duration::from_secs(30)).await;
    worker.stop()?;
    topology.delete().await;
    sim.shutdown().await;
    Ok(Row {
        scenario: "SIGKILL ×5 during the run",
        jobs,
        faults: "5 kills".into(),
        recovery,
        tracker,
    })
}

/// Runs `rabbitmqctl ARGS`.
fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .context("rabbitmqctl")?;
    anyhow::ensure!(status.success(), "rabbitmqctl {args:?} failed");
    Ok(())
}

/// Starts the broker app again when dropped, however the scenario ends.
struct RestoreBroker;

impl Drop for RestoreBroker {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["-q", "start_app"]);
    }
}

/// Stops the broker app for a few seconds while one worker drains; the same process must
/// reconnect by itself and finish.
async fn broker(jobs: usize) -> anyhow::Result<Row> {
    let (sim, topology, tracker) = start("chaos-broker", jobs).await?;
    let mut worker = WorkerProcess::spawn(&sim, &topology, 19490, &worker_vars())?;
    tracker.until(jobs / 5).await?;
    let back = {
        let _restore = RestoreBroker;
        rabbitmqctl(&["-q", "stop_app"])?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        rabbitmqctl(&["-q", "start_app"])?;
        Instant::now()
    };
    let recovery = tracker.next_after(back).await?;
    tracker.until_done(jobs, Duration::from_secs(60)).await;
    anyhow::ensure!(
        worker.alive(),
        "the worker process died instead of reconnecting"
    );
    worker.stop()?;
    topology.reconnect().await?.delete().await;
    sim.shutdown().await;
    Ok(Row {
        scenario: "broker stop_app / start_app (5 s down)",
        jobs,
        faults: "1 restart".into(),
        recovery,
        tracker,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (jobs, only) = common::jobs_and_only(5000)?;
    println!(
        "| scenario | jobs | faults | outcomes | duplicates | lost | dead letters caused | recovery |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut rows = Vec::new();
    if wanted("kill") {
        rows.push(kill(jobs).await?);
    }
    if wanted("broker") {
        rows.push(broker(jobs).await?);
    }
    for row in rows {
        let (done, duplicates, failed) = row.tracker.tally();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} s |",
            row.scenario,
            row.jobs,
            row.faults,
            done,
            duplicates,
            row.jobs - done,
            failed,
            row.recovery.as_secs_f64(),
        );
    }
    println!(
        "(recovery: the longest time from a fault — a kill, or the broker back — to the next outcome event)"
    );
    Ok(())
}
