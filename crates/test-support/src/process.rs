//! The worker as a black box: its binary, the environment that points it at a graph-sim and a
//! run's broker objects, its exit code and output, and a running worker process driven from
//! outside. Tests and benches start it the same way.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use graph_sim::Sim;
use unassign_worker::config::Settings;

use crate::{SECRET, TENANT, amqp_url, endpoints, eventually};

/// The `unassign-worker` binary of the profile this test or example was built in: cargo puts
/// test binaries in `target/<profile>/deps` and examples in `target/<profile>/examples`, the
/// binaries one level up (cargo builds it for integration tests; `bench/run.sh` for benches).
pub fn worker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary's path");
    let dir = exe.parent().expect("a directory");
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => dir.parent().expect("the profile directory"),
        _ => dir,
    };
    profile.join("unassign-worker")
}

/// `AMQP_URL` and the names of the run's broker objects from `settings`.
pub fn broker_env(settings: &Settings) -> Vec<(String, String)> {
    let a = &settings.amqp;
    pairs([
        ("AMQP_URL", amqp_url()),
        ("UNASSIGN__AMQP__EXCHANGE", a.exchange.clone()),
        ("UNASSIGN__AMQP__QUEUE", a.queue.clone()),
        (
            "UNASSIGN__AMQP__DEAD_LETTER_EXCHANGE",
            a.dead_letter_exchange.clone(),
        ),
        (
            "UNASSIGN__AMQP__DEAD_LETTER_QUEUE",
            a.dead_letter_queue.clone(),
        ),
        ("UNASSIGN__AMQP__EVENTS_EXCHANGE", a.events_exchange.clone()),
        ("UNASSIGN__AMQP__OUTCOMES_QUEUE", a.outcomes_queue.clone()),
        (
            "UNASSIGN__AMQP__DELIVERY_LIMIT",
            a.delivery_limit.to_string(),
        ),
        // The same delay tiers as the run's settings, so its cleanup finds every queue.
        (
            "UNASSIGN__AMQP__DELAY_TIERS_SECS",
            format!("{:?}", a.delay_tiers_secs),
        ),
    ])
}

/// The app registration `sim` knows (tenant [`TENANT`]) and its Graph URL.
pub fn sim_env(sim: &Sim, client_id: &str, client_secret: &str) -> Vec<(String, String)> {
    pairs([
        ("AZURE_TENANT_ID", TENANT.to_owned()),
        ("AZURE_CLIENT_ID", client_id.to_owned()),
        ("AZURE_CLIENT_SECRET", client_secret.to_owned()),
        ("AZURE_AUTHORITY_HOST", sim.authority()),
        ("UNASSIGN__GRAPH__BASE_URL", sim.base_url()),
    ])
}

/// The tests' environment: `settings`' broker objects, `sim` with the tests' secret, and the
/// tests' fast settings (no rate ceiling to grow into, short retry delays, any HTTP port).
pub fn env_for(sim: &Sim, settings: &Settings) -> Vec<(String, String)> {
    let mut vars = broker_env(settings);
    vars.extend(sim_env(sim, &settings.auth.client_id, SECRET));
    vars.extend(pairs([
        (
            "UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND",
            "1000".to_owned(),
        ),
        ("UNASSIGN__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        ("UNASSIGN__RETRY__BASE_DELAY_MS", "20".to_owned()),
    ]));
    vars
}

fn pairs<const N: usize>(vars: [(&str, String); N]) -> Vec<(String, String)> {
    vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The binary with exactly `vars` (and `PATH`) as its environment.
pub fn command(vars: &[(String, String)]) -> Command {
    let mut cmd = Command::new(worker_binary());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.envs(vars.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Runs `cmd` to the end: exit code, stdout, stderr.
pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("the binary runs");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into(),
        String::from_utf8_lossy(&stderr).into(),
    )
}

/// A worker process (`run`, or the benches' `intake`) driven from outside, as an orchestrator
/// would: its HTTP endpoints, SIGTERM, SIGKILL. Dropped while still running — a test or a bench
/// that failed half-way — it is killed, and the path of its log, if it has one, is printed.
pub struct WorkerProcess {
    child: Child,
    /// Where its `/metrics`, `/healthz` and `/readyz` answer, when known.
    http: Option<SocketAddr>,
    /// Its logs (stderr), when they go to a file.
    log: Option<PathBuf>,
}

impl WorkerProcess {
    /// Starts `cmd` (the binary with its subcommand and environment), serving HTTP on `http`.
    pub fn start(mut cmd: Command, http: Option<SocketAddr>) -> std::io::Result<WorkerProcess> {
        let child = cmd.spawn()?;
        Ok(WorkerProcess {
            child,
            http,
            log: None,
        })
    }

    /// `unassign-worker run` with exactly `vars` (see [`command`]), its logs written to `log` and
    /// kept for a failure to be read. It may listen on port 0: where it serves is read from its
    /// log, so the logs must be JSON (the default) at `info` or finer.
    pub async fn run(vars: &[(String, String)], log: &Path) -> WorkerProcess {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).expect("the log's directory");
        }
        let file = std::fs::File::create(log).expect("the worker's log file");
        let mut cmd = command(vars);
        cmd.arg("run").stdout(Stdio::null()).stderr(file);
        let mut worker = WorkerProcess::start(cmd, None).expect("the worker starts");
        worker.log = Some(log.to_owned());
        let http = eventually(
            &format!("the worker to serve HTTP (its log: {})", log.display()),
            Duration::from_secs(20),
            || {
                let exited = worker.child.try_wait().expect("the worker's status");
                assert!(exited.is_none(), "the worker exited: {}", read(log));
                async { serving_at(&read(log)) }
            },
        )
        .await;
        worker.http = Some(http);
        worker
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its `/metrics`, `/healthz` and `/readyz` answer.
    pub fn http(&self) -> SocketAddr {
        self.http.expect("a worker started with its HTTP address")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        endpoints::get(self.http(), path).await
    }

    /// The sum of its `/metrics` samples named like `sample` that carry its labels (and maybe
    /// more), as [`crate::Worker::metric`].
    pub async fn metric(&self, sample: &str) -> f64 {
        endpoints::metric(self.http(), sample).await
    }

    pub async fn wait_ready(&self) {
        endpoints::wait_ready(self.http()).await;
    }

    /// SIGKILL: a crash, nothing settled.
    pub fn kill(mut self) -> std::io::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits for the exit without blocking the runtime (a graph-sim or a collector
    /// on it may be what the worker waits for): its status, and how long it took.
    pub async fn stop(mut self) -> std::io::Result<(ExitStatus, Duration)> {
        let sent = Instant::now();
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, sent.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Where its logs are, if they go to a file.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let (true, Some(log)) = (std::thread::panicking(), &self.log) {
            eprintln!("the worker's log: {}", log.display());
        }
    }
}

/// The file's contents so far ("" before it exists).
fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Where a worker serves HTTP, from the JSON line it logs once it does (its fields are at the
/// top level).
fn serving_at(log: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        let line: serde_json::Value = serde_json::from_str(line).ok()?;
        let serving = line["message"].as_str()?.starts_with("serving /metrics");
        serving.then(|| line["http"].as_str()?.parse().ok())?
    })
}
