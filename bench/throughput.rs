//! Throughput benchmark: N jobs against graph-sim with no latency and no throttling, the worker
//! as a separate release process. Prints jobs/s, CPU µs per job and the worker's peak RSS.
//!
//!     bench/run.sh                # builds the release binary, then runs this
//!     cargo run --release --example throughput -- --jobs 5000 --concurrency 64

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};
use unassign_worker::{
    config::Settings,
    sim::{Sim, SimOptions},
};

const TENANT: &str = "3f1c3a8e-5c1b-4f5e-9a7d-0d2f6a1b2c3d";

struct Args {
    jobs: usize,
    concurrency: usize,
    latency_ms: u64,
    binary: String,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        jobs: 5000,
        concurrency: 64,
        latency_ms: 0,
        binary: "target/release/unassign-worker".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--jobs" => args.jobs = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            "--latency-ms" => args.latency_ms = value.parse()?,
            "--binary" => args.binary = value,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let sim = Sim::start(SimOptions {
        latency_ms: args.latency_ms,
        ..SimOptions::default()
    })
    .await?;
    let prefix = format!("bench.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut settings = Settings::load(None)?;
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let a = &mut settings.amqp;
    a.exchange = format!("{prefix}.x");
    a.queue = format!("{prefix}.requests");
    a.dead_letter_exchange = format!("{prefix}.dlx");
    a.dead_letter_queue = format!("{prefix}.dead");
    a.events_exchange = format!("{prefix}.events");
    a.outcomes_queue = format!("{prefix}.outcomes");

    let connection = Connection::connect(&amqp_url, Default::default()).await?;
    let channel = connection.create_channel().await?;
    unassign_worker::amqp::declare(&channel, &settings.amqp).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let publish_started = Instant::now();
    let mut confirms = Vec::with_capacity(args.jobs);
    for i in 0..args.jobs {
        let body = serde_json::json!({"request_id": format!("b-{i}"), "device_id": uuid::Uuid::new_v4().to_string()});
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = channel
            .basic_publish(
                settings.amqp.exchange.as_str().into(),
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
    let publish_secs = publish_started.elapsed().as_secs_f64();

    let http = "127.0.0.1:19464";
    let a = &settings.amqp;
    let mut worker = Command::new(&args.binary)
        .arg("run")
        .env("AMQP_URL", &amqp_url)
        .env("AZURE_TENANT_ID", TENANT)
        .env("AZURE_CLIENT_ID", SimOptions::default().client_id)
        .env("AZURE_CLIENT_SECRET", SimOptions::default().client_secret)
        .env("AZURE_AUTHORITY_HOST", sim.authority())
        .env("UNASSIGN__GRAPH__BASE_URL", sim.base_url())
        .env("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0")
        .env(
            "UNASSIGN__WORKER__CONCURRENCY",
            args.concurrency.to_string(),
        )
        .env("UNASSIGN__HTTP__LISTEN", http)
        .env("UNASSIGN__LOG__LEVEL", "warn")
        .env("UNASSIGN__AMQP__EXCHANGE", &a.exchange)
        .env("UNASSIGN__AMQP__QUEUE", &a.queue)
        .env(
            "UNASSIGN__AMQP__DEAD_LETTER_EXCHANGE",
            &a.dead_letter_exchange,
        )
        .env("UNASSIGN__AMQP__DEAD_LETTER_QUEUE", &a.dead_letter_queue)
        .env("UNASSIGN__AMQP__EVENTS_EXCHANGE", &a.events_exchange)
        .env("UNASSIGN__AMQP__OUTCOMES_QUEUE", &a.outcomes_queue)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release)",
                args.binary
            )
        })?;
    let started = Instant::now();
    let pid = worker.id();

    let events = connection.create_channel().await?;
    let mut consumer = events
        .basic_consume(
            a.outcomes_queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (mut succeeded, mut failed) = (0usize, 0usize);
    while succeeded + failed < args.jobs {
        let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("no event for 60 s")?
            .context("consumer ended")??;
        let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
        match event["data"]["outcome"].as_str() {
            Some("succeeded") => succeeded += 1,
            _ => failed += 1,
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu_secs, peak_rss_kib) = process_usage(pid)?;
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    worker.wait()?;

    let stats = sim.stats();
    println!(
        "| jobs | concurrency | latency | jobs/s | CPU µs/job | peak RSS | Graph calls | failed | publish (bench) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} ms | {:.0} | {:.0} | {:.1} MiB | {} | {} | {:.0} msg/s |",
        args.jobs,
        args.concurrency,
        args.latency_ms,
        args.jobs as f64 / wall,
        cpu_secs * 1e6 / args.jobs as f64,
        peak_rss_kib as f64 / 1024.0,
        stats.action_calls,
        failed,
        args.jobs as f64 / publish_secs,
    );
    println!(
        "(jobs/s: from worker start, including its connect and declare, to the last outcome event)"
    );

    for q in [&a.queue, &a.dead_letter_queue, &a.outcomes_queue] {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    sim.shutdown().await;
    Ok(())
}

/// CPU seconds (user + system) and peak RSS (KiB) of a running process, from /proc.
fn process_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
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
