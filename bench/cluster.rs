//! Cluster bench: a private local 3-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh`),
//! worker processes given every node's URL, and broker nodes lost under steady load. Every
//! request id must end with an outcome event. Prints one table row per scenario (for
//! RELIABILITY.md).
//!
//!     bench/run.sh cluster                     # all scenarios
//!     bench/run.sh cluster --only rolling      # rolling | leader | replicas
//!
//! The cluster listens on 5711-5713 (AMQP) and is torn down at the end, however the run ends.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use test_support::{
    bench::{Topology, WorkerProcess, jobs_and_only},
    broker::ready,
    cluster::Cluster,
    outcomes::Outcomes,
};
use unassign_worker::sim::{Sim, SimOptions};

const BASE_PORT: u16 = 5711;
/// The steady load: every worker together finishes at most this many jobs a second.
const JOBS_PER_SECOND: u32 = 60;

struct Row {
    scenario: &'static str,
    jobs: usize,
    faults: String,
    /// Per fault and worker: node loss to the next outcome event, if there was one.
    failovers: Vec<(String, Option<Duration>)>,
    outcomes: Outcomes,
    dead_letters: u32,
}

/// A scenario's set-up: graph-sim, a fresh topology declared through node 1 (so node 1 leads
/// its quorum queues) holding `jobs` requests, and an outcome tracker on every node.
struct Run {
    sim: Sim,
    topology: Topology,
    outcomes: Outcomes,
    jobs: usize,
}

impl Run {
    async fn start(cluster: &Cluster, name: &str, jobs: usize) -> anyhow::Result<Run> {
        let sim = Sim::start(SimOptions {
            latency_ms: 20,
            ..SimOptions::default()
        })
        .await?;
        let topology = Topology::declare_on(name, &cluster.url(1)).await?;
        topology.publish(jobs).await?;
        let urls = (1..=cluster.nodes()).map(|i| cluster.url(i)).collect();
        let outcomes = Outcomes::track(urls, topology.settings.amqp.outcomes_queue.clone());
        Ok(Run {
            sim,
            topology,
            outcomes,
            jobs,
        })
    }

    /// A worker process whose node list starts at node `first` (then wraps round), sharing the
    /// steady load with `replicas - 1` others.
    fn worker(
        &self,
        cluster: &Cluster,
        first: usize,
        replicas: u32,
        http_port: u16,
        instance: &str,
    ) -> anyhow::Result<WorkerProcess> {
        let n = cluster.nodes();
        let urls: Vec<String> = (0..n)
            .map(|k| cluster.url((first - 1 + k) % n + 1))
            .collect();
        let rate = f64::from(JOBS_PER_SECOND) / f64::from(replicas);
        let vars = [
            ("AMQP_URL", urls.join(",")),
            ("UNASSIGN__WORKER__CONCURRENCY", "16".to_owned()),
            ("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", rate.to_string()),
            ("UNASSIGN__GRAPH__ADAPTIVE_THROTTLING", "false".to_owned()),
            ("UNASSIGN__AMQP__HEARTBEAT_SECS", "2".to_owned()),
            ("UNASSIGN__WORKER__INSTANCE", instance.to_owned()),
        ];
        WorkerProcess::spawn(&self.sim, &self.topology, http_port, &vars)
    }

    /// Waits for the rest, stops the workers and reads the dead-letter queue.
    async fn finish(
        self,
        cluster: &Cluster,
        workers: Vec<WorkerProcess>,
        scenario: &'static str,
        faults: String,
        lost_at: Vec<SystemTime>,
        instances: &[&str],
    ) -> anyhow::Result<Row> {
        self.outcomes
            .until_done(self.jobs, Duration::from_secs(60))
            .await;
        for worker in workers {
            worker.stop().await?;
        }
        let mut failovers = Vec::new();
        for t in &lost_at {
            for instance in instances {
                let source = format!("unassign-worker/{instance}");
                let after = self.outcomes.first_after(*t, Some(&source));
                failovers.push((instance.to_string(), after));
            }
        }
        let dead_letters = depth(cluster, &self.topology.settings.amqp.dead_letter_queue).await?;
        self.sim.shutdown().await;
        Ok(Row {
            scenario,
            jobs: self.jobs,
            faults,
            failovers,
            outcomes: self.outcomes,
            dead_letters,
        })
    }
}

/// Ready messages in `queue`, asked of node 1 (up again at the end of every scenario).
async fn depth(cluster: &Cluster, queue: &str) -> anyhow::Result<u32> {
    let connection = lapin::Connection::connect(&cluster.url(1), Default::default()).await?;
    let ready = ready(&connection, queue).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(ready)
}

/// Loses node `node` (`stop` or `kill`) and returns when it was lost: the moment its AMQP port
/// stopped accepting connections, watched from before the command.
async fn lose(cluster: &Arc<Cluster>, node: usize, kill: bool) -> anyhow::Result<SystemTime> {
    let addr: std::net::SocketAddr = cluster.label(node).parse()?;
    let watcher = tokio::task::spawn_blocking(move || {
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                return SystemTime::now();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    if kill {
        on_cluster(cluster, move |c| c.kill(node)).await?;
    } else {
        on_cluster(cluster, move |c| c.stop(node)).await?;
    }
    Ok(watcher.await?)
}

/// Runs a blocking cluster operation (the script) off the async threads.
async fn on_cluster<T: Send + 'static>(
    cluster: &Arc<Cluster>,
    op: impl FnOnce(&Cluster) -> Result<T, String> + Send + 'static,
) -> anyhow::Result<T> {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || op(&cluster))
        .await?
        .map_err(anyhow::Error::msg)
}

/// Stops each node in turn — graceful, as an upgrade does — and starts it again before the
/// next, while one worker (starting on node 1) drains at the steady rate. The roll starts once
/// 5 % are done and goes straight through; every loss must come while jobs are left.
async fn rolling(cluster: &Arc<Cluster>, jobs: usize) -> anyhow::Result<Row> {
    let run = Run::start(cluster, "cluster-rolling", jobs).await?;
    let worker = run.worker(cluster, 1, 1, 19510, "w")?;
    let mut lost_at = Vec::new();
    run.outcomes.until(jobs / 20).await?;
    for node in 1..=cluster.nodes() {
        anyhow::ensure!(
            run.outcomes.done() < jobs * 19 / 20,
            "the load ended before the roll did: give more --jobs"
        );
        lost_at.push(lose(cluster, node, false).await?);
        on_cluster(cluster, move |c| c.start(node)).await?;
    }
    let faults = format!("{} node restarts", cluster.nodes());
    run.finish(
        cluster,
        vec![worker],
        "rolling restart of all 3 nodes",
        faults,
        lost_at,
        &["w"],
    )
    .await
}

/// Stops the node leading the request queue while a worker on another node drains; the
/// remaining two elect a new leader.
async fn leader(cluster: &Arc<Cluster>, jobs: usize) -> anyhow::Result<Row> {
    let run = Run::start(cluster, "cluster-leader", jobs).await?;
    let queue = run.topology.settings.amqp.queue.clone();
    let leader = on_cluster(cluster, move |c| c.leader(&queue)).await?;
    let first = leader % cluster.nodes() + 1;
    let worker = run.worker(cluster, first, 1, 19520, "w")?;
    run.outcomes.until(jobs / 4).await?;
    let lost_at = vec![lose(cluster, leader, false).await?];
    run.outcomes.until(jobs * 3 / 4).await?;
    on_cluster(cluster, move |c| c.start(leader)).await?;
    let faults = format!("leader (node {leader}) stopped, worker on node {first}");
    run.finish(
        cluster,
        vec![worker],
        "quorum leader's node stopped",
        faults,
        lost_at,
        &["w"],
    )
    .await
}

/// Two workers on different nodes share the load; the first one's node is killed (`kill -9`)
/// and the worker moves to another node while the second carries on.
async fn replicas(cluster: &Arc<Cluster>, jobs: usize) -> anyhow::Result<Row> {
    let run = Run::start(cluster, "cluster-replicas", jobs).await?;
    let workers = vec![
        run.worker(cluster, 2, 2, 19530, "A")?,
        run.worker(cluster, 3, 2, 19531, "B")?,
    ];
    run.outcomes.until(jobs / 4).await?;
    let lost_at = vec![lose(cluster, 2, true).await?];
    run.outcomes.until(jobs * 3 / 4).await?;
    on_cluster(cluster, |c| c.start(2)).await?;
    let faults = "node 2 killed (-9) under replica A; B on node 3".to_owned();
    run.finish(
        cluster,
        workers,
        "2 replicas on different nodes, one node killed",
        faults,
        lost_at,
        &["A", "B"],
    )
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (jobs, only) = jobs_and_only(5000)?;
    let started = std::time::Instant::now();
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| Cluster::up(3, Some(BASE_PORT)))
            .await?
            .map_err(anyhow::Error::msg)?,
    );
    eprintln!("cluster up in {:.0?}", started.elapsed());
    println!(
        "| scenario | jobs | faults | outcomes | duplicates | lost | dead letters | fail-over |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut rows = Vec::new();
    if wanted("rolling") {
        rows.push(rolling(&cluster, jobs).await?);
    }
    if wanted("leader") {
        rows.push(leader(&cluster, jobs).await?);
    }
    if wanted("replicas") {
        rows.push(replicas(&cluster, jobs).await?);
    }
    for row in rows {
        let tally = row.outcomes.tally();
        let failovers: Vec<String> = row
            .failovers
            .iter()
            .map(|(worker, d)| {
                let d = d.map_or("none".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
                match worker.as_str() {
                    "w" => d,
                    _ => format!("{worker}: {d}"),
                }
            })
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.jobs,
            row.faults,
            tally.done,
            tally.duplicates,
            row.jobs - tally.done,
            row.dead_letters,
            failovers.join(", "),
        );
    }
    println!(
        "(fail-over: from the node's AMQP port closing (stop or kill -9) to the arrival of the first outcome event of a job finished after it; dead letters: in the dead-letter queue at the end)"
    );
    Ok(())
}
