//! Throughput benchmark: N jobs against graph-sim with no latency and no throttling, the worker
//! as a separate release process. Prints jobs/s, CPU µs per job and the worker's peak RSS.
//!
//!     bench/run.sh throughput               # builds the release binary, then runs this
//!     cargo run --release --example throughput -- --jobs 5000 --concurrency 64

use test_support::bench as common;

use std::time::Instant;

use anyhow::bail;
use common::{Topology, WorkerProcess};
use unassign_worker::sim::{Sim, SimOptions};

struct Args {
    jobs: usize,
    concurrency: usize,
    latency_ms: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        jobs: 5000,
        concurrency: 64,
        latency_ms: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            bail!("{flag} needs a value")
        };
        match flag.as_str() {
            "--jobs" => args.jobs = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            "--latency-ms" => args.latency_ms = value.parse()?,
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
    let topology = Topology::declare("throughput").await?;
    let publish_rate = topology.publish(args.jobs).await?;
    let vars = [
        (
            "UNASSIGN__WORKER__CONCURRENCY",
            args.concurrency.to_string(),
        ),
        ("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0".to_owned()),
        ("UNASSIGN__GRAPH__ADAPTIVE_THROTTLING", "false".to_owned()),
    ];
    let worker = WorkerProcess::spawn(&sim, &topology, 19464, &vars)?;
    let started = Instant::now();
    let (_, failed) = topology.await_outcomes(args.jobs).await?;
    let wall = started.elapsed().as_secs_f64();
    let (cpu_secs, peak_rss_kib) = common::process_usage(worker.pid())?;
    worker.stop().await?;

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
        sim.stats().action_calls,
        failed,
        publish_rate,
    );
    println!(
        "(jobs/s: from worker start, including its connect and declare, to the last outcome event)"
    );
    topology.delete().await;
    sim.shutdown().await;
    Ok(())
}
