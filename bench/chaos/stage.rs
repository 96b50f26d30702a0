//! What every scenario stands on: graph-sim, a fresh topology holding the jobs, an outcome tracker,
//! and a relay between the worker process and the broker. A scenario injects its faults through
//! these and says when each one was over; the stage turns that into a table row.

use std::time::{Duration, SystemTime};

use test_support::{
    amqp_url,
    bench::{Topology, WorkerProcess},
    outcomes::{Outcomes, Tally},
    relay::Relay,
};
use unassign_worker::sim::{Sim, SimOptions};

/// How the worker runs in every scenario unless the scenario says otherwise.
const WORKER_VARS: &[(&str, &str)] = &[
    ("UNASSIGN__WORKER__CONCURRENCY", "16"),
    ("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0"),
    ("UNASSIGN__AMQP__HEARTBEAT_SECS", "2"),
    ("UNASSIGN__WORKER__SHUTDOWN_GRACE_SECS", "10"),
];
pub const LOAD: &str = "conc. 16, Graph 20 ms";
pub const GRACE: Duration = Duration::from_secs(10);

pub struct Stage {
    pub sim: Sim,
    pub topology: Topology,
    pub tracker: Outcomes,
    pub relay: Relay,
    pub jobs: usize,
    /// The load column of the row.
    pub load: String,
    /// Worker settings on top of [`WORKER_VARS`].
    vars: Vec<(&'static str, String)>,
    next_port: u16,
}

/// What a scenario did: the faults, when each was over, and what it noticed on the way.
#[derive(Default)]
pub struct Faults {
    pub what: String,
    pub cleared: Vec<SystemTime>,
    pub notes: Vec<String>,
}

impl Stage {
    /// graph-sim (20 ms latency unless `sim` says otherwise) and `jobs` requests in a fresh topology.
    pub async fn new(name: &str, jobs: usize, sim: SimOptions) -> anyhow::Result<Stage> {
        let sim = Sim::start(sim).await?;
        let topology = Topology::declare(&format!("chaos-{name}")).await?;
        topology.publish(jobs).await?;
        let tracker = Outcomes::track(
            vec![amqp_url()],
            topology.settings.amqp.outcomes_queue.clone(),
        );
        let relay = Relay::to_broker(&amqp_url()).await;
        Ok(Stage {
            sim,
            topology,
            tracker,
            relay,
            jobs,
            load: LOAD.to_owned(),
            vars: Vec::new(),
            next_port: 19500,
        })
    }

    pub fn sim_options() -> SimOptions {
        SimOptions {
            latency_ms: 20,
            ..SimOptions::default()
        }
    }

    /// Adds a worker setting for every worker this stage starts.
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.vars.push((key, value.into()));
        self
    }

    /// Starts a worker process connected through the relay, on its own HTTP port.
    pub fn worker(&mut self) -> anyhow::Result<(WorkerProcess, u16)> {
        let port = self.next_port;
        self.next_port += 1;
        let mut vars: Vec<(&str, String)> = WORKER_VARS
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned()))
            .collect();
        vars.extend(self.vars.iter().cloned());
        vars.push(("AMQP_URL", self.relay_url()?));
        let worker = WorkerProcess::spawn(&self.sim, &self.topology, port, &vars)?;
        Ok((worker, port))
    }

    /// The broker URL with the relay's address in place of the broker's.
    fn relay_url(&self) -> anyhow::Result<String> {
        let mut url = url::Url::parse(&amqp_url())?;
        url.set_ip_host(self.relay.addr.ip())
            .map_err(|()| anyhow::anyhow!("AMQP_URL cannot take an IP host"))?;
        url.set_port(Some(self.relay.addr.port()))
            .map_err(|()| anyhow::anyhow!("AMQP_URL cannot take a port"))?;
        Ok(url.into())
    }

    /// Waits until `share` of the jobs have an outcome.
    pub async fn progress(&self, share: f64) -> anyhow::Result<()> {
        self.tracker
            .until((self.jobs as f64 * share) as usize)
            .await
    }

    /// Waits for every job (or until nothing has happened for `idle`), stops the worker, and
    /// makes the row.
    pub async fn finish(
        self,
        scenario: &'static str,
        worker: WorkerProcess,
        faults: Faults,
        idle: Duration,
    ) -> anyhow::Result<Row> {
        self.tracker.until_done(self.jobs, idle).await;
        let (status, took) = worker.stop().await?;
        anyhow::ensure!(status.success(), "the worker exited with {status}");
        anyhow::ensure!(
            took < GRACE + Duration::from_secs(5),
            "SIGTERM took {took:?}"
        );
        // The bench's own connection may not have survived a broker fault.
        let topology = self.topology.reconnect().await?;
        let dead = topology
            .ready(&topology.settings.amqp.dead_letter_queue)
            .await?;
        let recovery = faults
            .cleared
            .iter()
            .filter_map(|c| self.tracker.longest_gap_after(*c))
            .max();
        let drained = faults
            .cleared
            .last()
            .and_then(|c| self.tracker.last_after(*c));
        let mut notes = faults.notes;
        notes.push(format!("{dead} messages in the dead-letter queue"));
        let row = Row {
            scenario,
            load: self.load,
            jobs: self.jobs,
            faults: faults.what,
            tally: self.tracker.tally(),
            recovery,
            drained,
            notes,
        };
        topology.delete().await;
        self.sim.shutdown().await;
        Ok(row)
    }
}

/// One line of the RELIABILITY.md table.
pub struct Row {
    pub scenario: &'static str,
    pub load: String,
    pub jobs: usize,
    pub faults: String,
    pub tally: Tally,
    /// The longest stretch without an outcome after a fault was over (or, for a stall, began).
    pub recovery: Option<Duration>,
    /// From the last fault being over to the last outcome event.
    pub drained: Option<Duration>,
    pub notes: Vec<String>,
}

impl Row {
    pub const HEADER: &str = "| scenario | load | faults injected | jobs | outcomes | duplicates | lost | dead letters caused | recovery | all done after |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|";

    pub fn line(&self) -> String {
        let secs = |d: Option<Duration>| {
            d.map_or("—".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
        };
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.load,
            self.faults,
            self.jobs,
            self.tally.done,
            self.tally.duplicates,
            self.jobs.saturating_sub(self.tally.done),
            self.tally.failed,
            secs(self.recovery),
            secs(self.drained),
        )
    }
}
