//! What the benchmarks add: a topology with bulk publishing (pipelined confirms) and an event
//! counter, worker processes pointed at an in-process graph-sim, their CPU and memory, and the
//! scenario flags. The worker always runs as its own release process, as in production.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures_util::StreamExt;
use graph_sim::{Sim, SimOptions};
use lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::FieldTable,
};
use unassign_worker::config::Settings;

use crate::{
    amqp_url,
    broker::{delete_objects, name_objects, ready},
    prefix,
    process::{broker_env, sim_env, worker_binary},
};

/// `--jobs N` and `--only NAME`, the flags of the scenario benchmarks.
pub fn jobs_and_only(default_jobs: usize) -> anyhow::Result<(usize, Option<String>)> {
    let (mut jobs, mut only) = (default_jobs, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            anyhow::bail!("{flag} needs a value")
        };
        match flag.as_str() {
            "--jobs" => jobs = value.parse()?,
            "--only" => only = Some(value),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok((jobs, only))
}

/// A run's broker objects, declared fresh and deleted at the end.
pub struct Topology {
    pub settings: Settings,
    pub connection: Connection,
    pub channel: Channel,
}

impl Topology {
    pub async fn declare(name: &str) -> anyhow::Result<Topology> {
        Self::declare_on(name, &amqp_url()).await
    }

    /// Declares through the broker node at `url` (on a cluster, the quorum queues' leader).
    pub async fn declare_on(name: &str, url: &str) -> anyhow::Result<Topology> {
        let mut settings = Settings::load(None)?;
        name_objects(&mut settings.amqp, &prefix(&format!("bench-{name}")));
        let connection = Connection::connect(url, Default::default()).await?;
        let channel = connection.create_channel().await?;
        unassign_worker::amqp::declare(&channel, &settings.amqp).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Topology {
            settings,
            connection,
            channel,
        })
    }

    /// Publishes `n` requests for random devices with pipelined confirms; returns msg/s.
    pub async fn publish(&self, n: usize) -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut confirms = Vec::with_capacity(n);
        let exchange = self.settings.amqp.exchange.as_str();
        for i in 0..n {
            let body = serde_json::json!({"request_id": format!("b-{i}"), "device_id": uuid::Uuid::new_v4().to_string()});
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    "request".into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    properties,
                )
                .await?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "publish nacked");
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }

    /// Counts outcome events until `n` have arrived: (succeeded, failed).
    pub async fn await_outcomes(&self, n: usize) -> anyhow::Result<(usize, usize)> {
        let channel = self.connection.create_channel().await?;
        let queue = self.settings.amqp.outcomes_queue.as_str();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (mut succeeded, mut failed) = (0, 0);
        while succeeded + failed < n {
            let delivery = tokio::time::timeout(Duration::from_secs(120), consumer.next())
                .await
                .context("no outcome event for 120 s")?
                .context("consumer ended")??;
            let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
            match event["data"]["outcome"].as_str() {
                Some("succeeded") => succeeded += 1,
                _ => failed += 1,
            }
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok((succeeded, failed))
    }

    /// The same objects over a fresh connection (after a broker restart killed the old one).
    pub async fn reconnect(self) -> anyhow::Result<Topology> {
        let connection = Connection::connect(&amqp_url(), Default::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Topology {
            settings: self.settings,
            connection,
            channel,
        })
    }

    /// Messages ready in `queue`.
    pub async fn ready(&self, queue: &str) -> anyhow::Result<u32> {
        Ok(ready(&self.connection, queue).await?)
    }

    pub async fn delete(self) {
        delete_objects(&self.connection, &self.settings.amqp).await;
    }
}

pub use crate::process::WorkerProcess;

/// The benches' ways to start a worker process: the release binary with the environment of
/// `vars` on top of the simulator's credentials and the topology's names, its logs (errors
/// only) on the bench's stderr.
impl WorkerProcess {
    pub fn spawn(
        sim: &Sim,
        topology: &Topology,
        http_port: u16,
        vars: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let app = SimOptions::default();
        let mut cmd = command("run", topology);
        cmd.envs(sim_env(sim, &app.client_id, &app.client_secret))
            .env("UNASSIGN__HTTP__LISTEN", format!("127.0.0.1:{http_port}"));
        start(cmd, vars, Some(([127, 0, 0, 1], http_port).into()))
    }

    /// `unassign-worker intake` on the topology's broker objects.
    pub fn intake(topology: &Topology, vars: &[(&str, String)]) -> anyhow::Result<Self> {
        start(command("intake", topology), vars, None)
    }
}

fn start(
    mut cmd: Command,
    vars: &[(&str, String)],
    http: Option<std::net::SocketAddr>,
) -> anyhow::Result<WorkerProcess> {
    for (k, v) in vars {
        cmd.env(k, v);
    }
    WorkerProcess::start(cmd, http).with_context(|| {
        let binary = worker_binary();
        format!("starting {} (cargo build --release)", binary.display())
    })
}

/// The release binary running `subcommand` against the local broker and the topology's names,
/// logging errors only.
fn command(subcommand: &str, topology: &Topology) -> Command {
    let mut cmd = Command::new(worker_binary());
    cmd.arg(subcommand)
        .envs(broker_env(&topology.settings))
        .env("UNASSIGN__LOG__LEVEL", "error")
        .stdout(Stdio::null());
    cmd
}

/// CPU seconds (user + system) and peak RSS (KiB) of a running process, from /proc.
pub fn process_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat format")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz: f64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?
        .trim()
        .parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmHWM")?;
    Ok((ticks as f64 / hz, hwm))
}
