//! HTTP intake load: the release binary's `intake` against the local broker, driven over
//! loopback by this process with a fixed number of connections, each posting as fast as its
//! answers come. Two shapes: one request per post, and 100 per post. Every post is signed
//! (HMAC, the costlier check) and carries fresh request ids, so every message is published and
//! confirmed. Prints posts/s, messages/s, p50/p99 latency, the intake's CPU per post and its
//! peak RSS. Bounded: `--posts` per shape, and at most `--max-secs` each.
//!
//!     bench/run.sh intake                   # builds the release binary, then runs this
//!     cargo run --release --example intake -- --posts 4000 --batch-posts 200 --connections 16

use test_support::bench as common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure};
use common::{Topology, WorkerProcess};
use unassign_worker::intake::auth::sign;

const SECRET: &str = "bench-intake-hmac-secret-0123456789";
const LISTEN: &str = "127.0.0.1:18089";
const OPS: &str = "127.0.0.1:19469";

struct Args {
    posts: usize,
    batch_posts: usize,
    connections: usize,
    max_secs: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        posts: 4000,
        batch_posts: 200,
        connections: 16,
        max_secs: 60,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            bail!("{flag} needs a value")
        };
        match flag.as_str() {
            "--posts" => args.posts = value.parse()?,
            "--batch-posts" => args.batch_posts = value.parse()?,
            "--connections" => args.connections = value.parse()?,
            "--max-secs" => args.max_secs = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

/// One shape's figures.
struct Run {
    posts: usize,
    wall: f64,
    latencies: Vec<Duration>,
    cpu_secs: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let topology = Topology::declare("intake").await?;
    let secrets = std::env::temp_dir().join(format!("bench-intake-{}", uuid::Uuid::new_v4()));
    std::fs::write(&secrets, format!("{SECRET}\n"))?;
    let vars = [
        ("UNASSIGN__INTAKE__LISTEN", LISTEN.to_owned()),
        ("UNASSIGN__INTAKE__METRICS_LISTEN", OPS.to_owned()),
        (
            "UNASSIGN__INTAKE__HMAC_SECRET_FILE",
            secrets.display().to_string(),
        ),
        ("UNASSIGN__INTAKE__RATE_LIMIT_PER_SECOND", "0".to_owned()),
        ("UNASSIGN__AMQP__DECLARE_TOPOLOGY", "false".to_owned()),
    ];
    let intake = WorkerProcess::intake(&topology, &vars)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let ready = Instant::now();
    while client
        .get(format!("http://{OPS}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        ensure!(
            ready.elapsed() < Duration::from_secs(20),
            "the intake is not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut rows = Vec::new();
    for (name, per_post, posts) in [
        ("single", 1, args.posts),
        ("batch of 100", 100, args.batch_posts),
    ] {
        let run = drive(&client, &args, intake.pid(), per_post, posts).await?;
        rows.push((name, per_post, run));
    }
    // Every 202 stands for confirmed messages: they must all be in the queue.
    let answered: usize = rows
        .iter()
        .map(|(_, per_post, run)| per_post * run.posts)
        .sum();
    let queued = topology.ready(&topology.settings.amqp.queue).await? as usize;
    ensure!(
        queued == answered,
        "{answered} messages answered 202, {queued} in the queue"
    );
    let (_, peak_rss_kib) = common::process_usage(intake.pid())?;
    let (status, _) = intake.stop().await?;
    ensure!(status.success(), "the intake exited with {status}");

    println!(
        "| shape | connections | posts | posts/s | messages/s | p50 | p99 | CPU µs/post | CPU µs/message |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, per_post, mut run) in rows {
        run.latencies.sort();
        let pct = |p: f64| {
            let i = ((run.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
            run.latencies[i].as_secs_f64() * 1000.0
        };
        let rate = run.posts as f64 / run.wall;
        println!(
            "| {name} | {} | {} | {rate:.0} | {:.0} | {:.1} ms | {:.1} ms | {:.0} | {:.1} |",
            args.connections,
            run.posts,
            rate * per_post as f64,
            pct(0.50),
            pct(0.99),
            run.cpu_secs * 1e6 / run.posts as f64,
            run.cpu_secs * 1e6 / (run.posts * per_post) as f64,
        );
    }
    println!(
        "peak RSS of the intake: {:.1} MiB",
        peak_rss_kib as f64 / 1024.0
    );
    let _ = std::fs::remove_file(secrets);
    topology.delete().await;
    Ok(())
}

/// `posts` signed posts of `per_post` requests over `args.connections` concurrent loops; the
/// intake's CPU time is read from /proc before and after.
async fn drive(
    client: &reqwest::Client,
    args: &Args,
    pid: u32,
    per_post: usize,
    posts: usize,
) -> anyhow::Result<Run> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let (cpu_before, _) = common::process_usage(pid)?;
    let started = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..args.connections {
        let (client, next) = (client.clone(), next.clone());
        loops.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= posts || Instant::now() > deadline {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let items: Vec<serde_json::Value> = (0..per_post)
                    .map(|i| {
                        serde_json::json!({
                            "request_id": format!("load-{per_post}-{n}-{i}"),
                            "device_id": uuid::Uuid::new_v4().to_string(),
                            "requested_by": "bench",
                        })
                    })
                    .collect();
                let body = if per_post == 1 {
                    items[0].to_string()
                } else {
                    serde_json::Value::from(items).to_string()
                };
                let t = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
                let signature = sign(SECRET, t, body.as_bytes());
                let sent = Instant::now();
                let response = client
                    .post(format!("http://{LISTEN}/v1/requests"))
                    .header("content-type", "application/json")
                    .header("x-unassign-signature", signature)
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                response.bytes().await?;
                ensure!(status == 202, "post {n} answered {status}");
                latencies.push(sent.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for l in loops {
        latencies.extend(l.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu_after, _) = common::process_usage(pid)?;
    Ok(Run {
        posts: latencies.len(),
        wall,
        latencies,
        cpu_secs: cpu_after - cpu_before,
    })
}
