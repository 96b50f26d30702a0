//! Draining at Graph's ceiling: the scenarios of the throttling issue against graph-sim, each
//! with the worker as separate release processes, printed as one table.
//!
//!     bench/run.sh throttle                       # all scenarios, 3,000 jobs each
//!     cargo run --release --example throttle -- --jobs 3000 --only 1
//!     bench/run.sh throttle --only r              # replicas sharing one tenant (issue 13)
//!     bench/run.sh throttle --only b              # the same with the control plane off

use test_support::bench as common;

use std::time::{Duration, Instant};

use common::{Topology, WorkerProcess};
use unassign_worker::sim::{RetryAfterMode, Sim, SimOptions};

/// The simulator's limit in the throttled scenarios: 50 calls per 1 s sliding window.
const LIMIT: u32 = 50;

struct Scenario {
    name: String,
    sim: SimOptions,
    replicas: u16,
    /// Extra worker settings.
    vars: Vec<(&'static str, String)>,
    /// Ideal jobs/s, for the "fraction" column.
    ideal: f64,
}

fn throttled(retry_after: RetryAfterMode) -> SimOptions {
    limited(LIMIT, retry_after)
}

fn limited(limit: u32, retry_after: RetryAfterMode) -> SimOptions {
    SimOptions {
        throttle_limit: limit,
        throttle_window_ms: 1000,
        retry_after,
        ..SimOptions::default()
    }
}

fn scenarios() -> Vec<Scenario> {
    // Adaptive only: no configured ceiling, the worker must find the tenant's budget itself.
    let adaptive = || vec![("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0".to_owned())];
    let limit = f64::from(LIMIT);
    vec![
        Scenario {
            name: "1 throttled, fractional Retry-After".into(),
            sim: throttled(RetryAfterMode::Fractional),
            replicas: 1,
            vars: adaptive(),
            ideal: limit,
        },
        Scenario {
            name: "2a throttled, no Retry-After".into(),
            sim: throttled(RetryAfterMode::Absent),
            replicas: 1,
            vars: adaptive(),
            ideal: limit,
        },
        Scenario {
            name: "2b throttled, HTTP-date Retry-After".into(),
            sim: throttled(RetryAfterMode::HttpDate),
            replicas: 1,
            vars: adaptive(),
            ideal: limit,
        },
        Scenario {
            name: "3 throttled, 3 replicas".into(),
            sim: throttled(RetryAfterMode::Fractional),
            replicas: 3,
            vars: adaptive(),
            ideal: limit,
        },
        Scenario {
            name: "4 latency 200 ms, no limit, concurrency 64".into(),
            sim: SimOptions {
                latency_ms: 200,
                ..SimOptions::default()
            },
            replicas: 1,
            vars: vec![
                ("UNASSIGN__WORKER__CONCURRENCY", "64".to_owned()),
                ("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0".to_owned()),
                ("UNASSIGN__GRAPH__ADAPTIVE_THROTTLING", "false".to_owned()),
            ],
            ideal: 64.0 / 0.2,
        },
        Scenario {
            name: "5 naive baseline (scenario 1, gate and adaptive off)".into(),
            sim: throttled(RetryAfterMode::Fractional),
            replicas: 1,
            vars: vec![
                ("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0".to_owned()),
                ("UNASSIGN__GRAPH__ADAPTIVE_THROTTLING", "false".to_owned()),
            ],
            ideal: limit,
        },
    ]
    .into_iter()
    .chain(sharing())
    .collect()
}

/// Replicas on one tenant, adaptive-only, at two limits: `r…` with the control plane (holds,
/// decreases and membership shared), `b…` the same replicas with it off — each learning the
/// tenant's budget from its own 429s, which is how every replica worked before it.
fn sharing() -> Vec<Scenario> {
    let mut out = Vec::new();
    for limit in [50, 20] {
        for (replicas, shared) in [(1, true), (3, true), (6, true), (3, false), (6, false)] {
            let mut vars = vec![("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0".to_owned())];
            if !shared {
                vars.push(("UNASSIGN__REPLICAS__ENABLED", "false".to_owned()));
            }
            let name = match shared {
                true => format!("r{replicas} {limit}/s, {replicas} replica(s), shared"),
                false => format!("b{replicas} {limit}/s, {replicas} replicas, control plane off"),
            };
            out.push(Scenario {
                name,
                sim: limited(limit, RetryAfterMode::Fractional),
                replicas,
                vars,
                ideal: f64::from(limit),
            });
        }
    }
    out
}

struct Row {
    jobs: usize,
    succeeded: usize,
    failed: usize,
    /// From the tenant's first call (graph-sim's clock) to the last outcome.
    wall: f64,
    /// From the workers' start to the tenant's first call: connecting, not draining.
    startup: f64,
    calls: u64,
    throttled: u64,
    late: u64,
}

async fn run(scenario: &Scenario, jobs: usize) -> anyhow::Result<Row> {
    let sim = Sim::start(scenario.sim.clone()).await?;
    let topology = Topology::declare("throttle").await?;
    topology.publish(jobs).await?;
    let started = Instant::now();
    let workers = (0..scenario.replicas)
        .map(|i| WorkerProcess::spawn(&sim, &topology, 19470 + i, &scenario.vars))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (succeeded, failed) = topology.await_outcomes(jobs).await?;
    let finished = Instant::now();
    for worker in workers {
        worker.stop().await?;
    }
    let stats = sim.stats();
    let first_call = stats
        .first_action_offset_ms
        .map_or(started, |ms| sim.started() + Duration::from_millis(ms));
    topology.delete().await;
    sim.shutdown().await;
    Ok(Row {
        jobs,
        succeeded,
        failed,
        wall: finished.duration_since(first_call).as_secs_f64(),
        startup: first_call.saturating_duration_since(started).as_secs_f64(),
        calls: stats.action_calls,
        throttled: stats.responses_by_status.get(&429).copied().unwrap_or(0),
        late: stats.late_calls,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (jobs, only) = common::jobs_and_only(3000)?;
    println!(
        "| scenario | jobs | succeeded jobs/s | of ideal | of ideal from start | 429s / calls | late calls | dead letters | wall | start-up |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for scenario in scenarios() {
        if only
            .as_deref()
            .is_some_and(|o| !scenario.name.starts_with(o))
        {
            continue;
        }
        let row = run(&scenario, jobs).await?;
        let rate = row.succeeded as f64 / row.wall;
        let from_start = row.succeeded as f64 / (row.wall + row.startup);
        println!(
            "| {} | {} | {:.1} | {:.1} % | {:.1} % | {:.2} % ({} / {}) | {} | {} | {:.1} s | {:.1} s |",
            scenario.name,
            row.jobs,
            rate,
            100.0 * rate / scenario.ideal,
            100.0 * from_start / scenario.ideal,
            100.0 * row.throttled as f64 / row.calls.max(1) as f64,
            row.throttled,
            row.calls,
            row.late,
            row.failed,
            row.wall,
            row.startup,
        );
    }
    println!(
        "(wall and of ideal: from graph-sim's first call to the last outcome event; of ideal from \
         start and start-up: from the workers' start, connecting included)"
    );
    println!(
        "(late calls: arriving more than 0.1 s after any replica was told to wait, before it ended)"
    );
    Ok(())
}
