//! The worker as a black box: its binary, the environment that points it at a graph-sim and a
//! run's broker objects, and its exit code and output. Tests and benches start it the same way.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use graph_sim::Sim;
use unassign_worker::config::Settings;

use crate::{SECRET, TENANT, amqp_url};

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
