//! The scenarios: each starts a stage, lets the worker drain for a while, injects its faults,
//! and hands the stage what it did.

use std::{
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use unassign_worker::sim::SimOptions;

use crate::{
    Flags,
    common::WorkerProcess,
    stage::{Faults, GRACE, Row, Stage},
};

/// How long the bench waits for another outcome before it calls the rest lost.
const IDLE: Duration = Duration::from_secs(60);

fn faults(what: impl Into<String>) -> Faults {
    Faults {
        what: what.into(),
        ..Faults::default()
    }
}

pub async fn kill(f: &Flags) -> anyhow::Result<Row> {
    let mut stage = Stage::new("kill", f.jobs, Stage::sim_options()).await?;
    let (mut worker, _) = stage.worker()?;
    let mut faults = faults("5 × SIGKILL, restarted at once");
    for share in [0.1, 0.25, 0.45, 0.65, 0.85] {
        stage.progress(share).await?;
        worker.kill()?;
        (worker, _) = stage.worker()?;
        faults.cleared.push(SystemTime::now());
    }
    stage
        .finish("SIGKILL the worker", worker, faults, IDLE)
        .await
}

/// SIGTERM and check the exit: code 0 within the grace period; notes what was left in the queue.
async fn sigterm_and_restart(
    stage: &mut Stage,
    worker: WorkerProcess,
    faults: &mut Faults,
) -> anyhow::Result<WorkerProcess> {
    let (status, took) = worker.stop().await?;
    anyhow::ensure!(status.success(), "SIGTERM: the worker exited with {status}");
    anyhow::ensure!(
        took <= GRACE,
        "SIGTERM: exit took {took:?}, grace {GRACE:?}"
    );
    let queue = &stage.topology.settings.amqp.queue;
    let back = stage.topology.ready(queue).await?;
    faults.notes.push(format!(
        "exit 0 {:.2} s after SIGTERM (grace {} s), {back} requests ready in the queue afterwards",
        took.as_secs_f64(),
        GRACE.as_secs()
    ));
    let (worker, _) = stage.worker()?;
    faults.cleared.push(SystemTime::now());
    Ok(worker)
}

pub async fn sigterm(f: &Flags) -> anyhow::Result<Row> {
    let mut stage = Stage::new("sigterm", f.jobs, Stage::sim_options()).await?;
    let (worker, _) = stage.worker()?;
    let mut faults = faults("SIGTERM under load, then a new worker");
    stage.progress(0.3).await?;
    let worker = sigterm_and_restart(&mut stage, worker, &mut faults).await?;
    stage
        .finish("SIGTERM during load", worker, faults, IDLE)
        .await
}

/// graph-sim allows 100 calls a second and answers the rest 429 with a Retry-After; the worker
/// (adaptive budget off) is stopped while calls are held back by it.
pub async fn sigterm_throttled(f: &Flags) -> anyhow::Result<Row> {
    let sim = SimOptions {
        throttle_limit: 100,
        throttle_window_ms: 1000,
        ..Stage::sim_options()
    };
    let mut stage = Stage::new("sigterm-throttled", f.jobs, sim).await?;
    stage.load = "conc. 16, Graph 20 ms, limit 100/s".into();
    let (worker, port) = stage.worker()?;
    let mut faults = faults("SIGTERM while a Retry-After holds calls back");
    stage.progress(0.2).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let inflight = loop {
        let throttled = metric(port, "unassign_throttled{tenant=\"default\"}").await?;
        let inflight = metric(port, "unassign_inflight_jobs").await?;
        if throttled == 1.0 && inflight > 0.0 {
            break inflight;
        }
        anyhow::ensure!(Instant::now() < deadline, "the worker was never throttled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    faults.notes.push(format!(
        "SIGTERM with unassign_throttled 1 and {inflight} jobs in flight"
    ));
    let worker = sigterm_and_restart(&mut stage, worker, &mut faults).await?;
    stage
        .finish("SIGTERM while throttled", worker, faults, IDLE)
        .await
}

/// Three replicas share a tenant limited to 50 calls a second (adaptive-only): one is SIGKILLed,
/// then another is SIGKILLed while a Retry-After holds the tenant (its limit halved for the
/// moment) and restarted at once. The
/// figure: how long until the survivor sends the tenant's budget over the two replicas left.
pub async fn replicas(f: &Flags) -> anyhow::Result<Row> {
    let sim = SimOptions {
        throttle_limit: 50,
        throttle_window_ms: 1000,
        ..Stage::sim_options()
    };
    let mut stage = Stage::new("replicas", f.jobs, sim)
        .await?
        .with("UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND", "0");
    stage.load = "3 replicas, conc. 16, Graph 20 ms, limit 50/s".into();
    let (survivor, port) = stage.worker()?;
    let (victim, _) = stage.worker()?;
    let (restarted, restarted_port) = stage.worker()?;
    let mut faults = faults(
        "SIGKILL one of 3 replicas; limit halved, SIGKILL another while throttled, restarted",
    );
    stage.progress(0.25).await?;
    victim.kill()?;
    let killed = Instant::now();
    faults.cleared.push(SystemTime::now());
    let deadline = killed + Duration::from_secs(30);
    while metric(port, "unassign_replicas_live").await? != 2.0 {
        anyhow::ensure!(Instant::now() < deadline, "the survivors never took over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shared = "unassign_tenant_shared_budget_per_second{tenant=\"default\",budget=\"writes\"}";
    let share = metric(port, "unassign_rate_limit_per_second{tenant=\"default\"}").await?;
    faults.notes.push(format!(
        "after the SIGKILL the survivors took over its share in {:.2} s (shared budget {:.1}/s, the survivor's share {share:.1}/s)",
        killed.elapsed().as_secs_f64(),
        metric(port, shared).await?,
    ));
    // The replicas share the budget well enough that a 429 is rare and its hold lasts
    // milliseconds: the tenant's limit halves for a moment, as another app's burst would do,
    // so that the restarted replica is surely killed while it holds the tenant.
    stage.sim.update(|b| b.throttle_limit = 25);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(restarted_port, "unassign_throttled{tenant=\"default\"}").await? != 1.0 {
        anyhow::ensure!(Instant::now() < deadline, "the tenant was never throttled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    restarted.kill()?;
    stage.sim.update(|b| b.throttle_limit = 50);
    let (restarted, _) = stage.worker()?;
    faults.cleared.push(SystemTime::now());
    faults
        .notes
        .push("the second replica SIGKILLed while unassign_throttled was 1".into());
    stage.tracker.until_done(f.jobs, IDLE).await;
    let stats = stage.sim.stats();
    faults.notes.push(format!(
        "{} of {} calls answered 429, {} late calls",
        stats.responses_by_status.get(&429).copied().unwrap_or(0),
        stats.action_calls,
        stats.late_calls
    ));
    let (status, _) = restarted.stop().await?;
    anyhow::ensure!(
        status.success(),
        "the restarted replica exited with {status}"
    );
    stage
        .finish(
            "replicas: SIGKILL and restart while throttled",
            survivor,
            faults,
            IDLE,
        )
        .await
}

/// The private broker node of the bench, driven by `scripts/rabbitmq-cluster.sh`.
fn broker(args: &[&str]) -> anyhow::Result<()> {
    let port = std::env::var("CHAOS_RABBITMQ_PORT")
        .context("CHAOS_RABBITMQ_PORT: run the broker scenarios through bench/run.sh chaos")?;
    let status = Command::new("scripts/rabbitmq-cluster.sh")
        .args(["--nodes", "1", "--base-port", &port])
        .args(args)
        .status()
        .context("scripts/rabbitmq-cluster.sh")?;
    anyhow::ensure!(status.success(), "rabbitmq-cluster.sh {args:?} failed");
    Ok(())
}

/// Brings the broker back however a broker scenario ends.
struct RestoreBroker;

impl Drop for RestoreBroker {
    fn drop(&mut self) {
        let _ = broker(&["start", "1"]);
        let _ = broker(&["ctl", "1", "start_app"]);
    }
}

/// Runs `fault` against the broker at 20% and checks that the same worker process carried on.
async fn broker_fault(
    f: &Flags,
    name: &str,
    what: &str,
    fault: impl AsyncFnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(Stage, WorkerProcess, Faults)> {
    let mut stage = Stage::new(name, f.jobs, Stage::sim_options()).await?;
    let (mut worker, _) = stage.worker()?;
    let mut faults = faults(what);
    stage.progress(0.2).await?;
    {
        let _restore = RestoreBroker;
        fault().await?;
    }
    faults.cleared.push(SystemTime::now());
    stage.tracker.until(stage.tracker.done() + 1).await?;
    anyhow::ensure!(
        worker.alive(),
        "the worker process died instead of reconnecting"
    );
    faults
        .notes
        .push("the same worker process reconnected by itself".to_owned());
    Ok((stage, worker, faults))
}

pub async fn broker_restart(f: &Flags) -> anyhow::Result<Row> {
    let what = "stop_app, 5 s down, start_app";
    let (stage, worker, faults) = broker_fault(f, "broker-restart", what, async || {
        broker(&["ctl", "1", "stop_app"])?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        broker(&["ctl", "1", "start_app"])
    })
    .await?;
    stage.finish("broker restart", worker, faults, IDLE).await
}

pub async fn broker_kill(f: &Flags) -> anyhow::Result<Row> {
    let what = "kill -9 of the broker VM, then a cold start";
    let (stage, worker, faults) = broker_fault(f, "broker-kill", what, async || {
        broker(&["kill", "1"])?;
        broker(&["start", "1"])
    })
    .await?;
    stage.finish("broker hard kill", worker, faults, IDLE).await
}

pub async fn net_drop(f: &Flags) -> anyhow::Result<Row> {
    let mut stage = Stage::new("net-drop", f.jobs, Stage::sim_options()).await?;
    let (worker, _) = stage.worker()?;
    let mut faults = faults("3 connection cuts (relay closes both sockets)");
    for share in [0.2, 0.45, 0.7] {
        stage.progress(share).await?;
        let cut = stage.relay.cut();
        faults.cleared.push(SystemTime::now());
        faults.notes.push(format!("{cut} connection(s) cut"));
    }
    stage.finish("network drop", worker, faults, IDLE).await
}

pub async fn net_stall(f: &Flags) -> anyhow::Result<Row> {
    let mut stage = Stage::new("net-stall", f.jobs, Stage::sim_options()).await?;
    let (worker, _) = stage.worker()?;
    let mut faults = faults("link stalled without closing (heartbeat 2 s)");
    stage.progress(0.3).await?;
    let stalled = stage.relay.stall();
    // Recovery counts from the stall itself: noticing it is the worker's job.
    faults.cleared.push(SystemTime::now());
    faults.notes.push(format!(
        "{stalled} connection(s) stalled; recovery includes noticing the silence"
    ));
    stage.finish("network stall", worker, faults, IDLE).await
}

pub async fn net_slow(f: &Flags) -> anyhow::Result<Row> {
    let mut stage = Stage::new("net-slow", f.jobs, Stage::sim_options()).await?;
    let (worker, _) = stage.worker()?;
    let mut faults = faults("200 ms added per chunk each way, for 20 s");
    stage.progress(0.2).await?;
    let before = stage.tracker.done();
    stage.relay.slow(Duration::from_millis(200));
    tokio::time::sleep(Duration::from_secs(20)).await;
    stage.relay.slow(Duration::ZERO);
    faults.cleared.push(SystemTime::now());
    faults.notes.push(format!(
        "{} outcomes during the 20 slow seconds",
        stage.tracker.done() - before
    ));
    stage.finish("network slow", worker, faults, IDLE).await
}

/// Every Graph call answers 503 for `f.outage`, with or without a Retry-After.
pub async fn graph_outage(f: &Flags, retry_after: bool) -> anyhow::Result<Row> {
    let name = if retry_after {
        "graph-outage-ra"
    } else {
        "graph-outage"
    };
    let mut stage = Stage::new(name, f.jobs, Stage::sim_options()).await?;
    let (worker, _) = stage.worker()?;
    let header = if retry_after {
        "Retry-After: 1"
    } else {
        "no Retry-After"
    };
    let mut faults = faults(format!("Graph 503 for {} s, {header}", f.outage.as_secs()));
    stage.progress(0.2).await?;
    stage.sim.update(|b| {
        b.outage = true;
        b.outage_retry_after = retry_after;
    });
    tokio::time::sleep(f.outage).await;
    stage.sim.update(|b| b.outage = false);
    faults.cleared.push(SystemTime::now());
    let answered = stage.sim.stats().responses_by_status.get(&503).copied();
    faults
        .notes
        .push(format!("{} calls answered 503", answered.unwrap_or(0)));
    // Jobs parked with exponential backoff come back up to a few minutes later.
    let scenario = if retry_after {
        "Graph outage, Retry-After"
    } else {
        "Graph outage"
    };
    stage
        .finish(scenario, worker, faults, Duration::from_secs(360))
        .await
}

/// Graph answers slower than the worker's 2 s timeout for 20 s.
pub async fn graph_slow(f: &Flags) -> anyhow::Result<Row> {
    let stage = Stage::new("graph-slow", f.jobs, Stage::sim_options()).await?;
    let mut stage = stage.with("UNASSIGN__GRAPH__TIMEOUT_SECS", "2");
    let (worker, port) = stage.worker()?;
    let mut faults = faults("Graph answers after 3 s (timeout 2 s), for 20 s");
    stage.progress(0.2).await?;
    stage.sim.update(|b| b.latency_ms = 3000);
    tokio::time::sleep(Duration::from_secs(20)).await;
    stage.sim.update(|b| b.latency_ms = 20);
    faults.cleared.push(SystemTime::now());
    let timeouts = metric(
        port,
        "unassign_graph_requests_total{operation=\"unassign\",status=\"timeout\",tenant=\"default\"}",
    )
    .await?;
    faults
        .notes
        .push(format!("{timeouts} calls timed out and were retried"));
    stage.finish("Graph slow", worker, faults, IDLE).await
}

/// The client secret stops working mid-run (and every issued token is revoked) for 30 s.
pub async fn credentials_revoked(f: &Flags) -> anyhow::Result<Row> {
    let mut stage = Stage::new("credentials", f.jobs, Stage::sim_options()).await?;
    let (worker, port) = stage.worker()?;
    let mut faults = faults("secret and tokens revoked for 30 s, then the secret works again");
    stage.progress(0.2).await?;
    let secret = SimOptions::default().client_secret;
    stage.sim.update(|b| b.client_secret = "revoked".into());
    stage.sim.revoke_tokens();
    let revoked = Instant::now();
    while status(port, "/readyz").await? != 503 {
        anyhow::ensure!(
            revoked.elapsed() < Duration::from_secs(30),
            "/readyz stayed 200"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let red = revoked.elapsed();
    let paused_at = stage.tracker.done();
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(revoked.elapsed())).await;
    let queue = &stage.topology.settings.amqp.queue;
    let waiting = stage.topology.ready(queue).await?;
    faults.notes.push(format!(
        "/readyz 503 after {:.2} s; {} outcomes while paused; {waiting} requests ready in the queue",
        red.as_secs_f64(),
        stage.tracker.done() - paused_at,
    ));
    stage.sim.update(|b| b.client_secret = secret);
    faults.cleared.push(SystemTime::now());
    stage
        .finish("credentials revoked", worker, faults, IDLE)
        .await
}

/// HTTP status of `path` on the worker's port.
async fn status(port: u16, path: &str) -> anyhow::Result<u16> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await?;
    Ok(response.status().as_u16())
}

/// One sample from the worker's `/metrics`, by its name and labels as exposed.
async fn metric(port: u16, sample: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .with_context(|| format!("{sample} not in /metrics"))?
        .trim()
        .parse()
        .context("metric value")
}
