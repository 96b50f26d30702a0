//! Driving the binary as a black box: its environment, and its exit code and output.

use std::process::{Command, Output};

use unassign_worker::{config::Settings, sim::Sim};

use super::{SECRET, TENANT, amqp_url};

pub const BIN: &str = env!("CARGO_BIN_EXE_unassign-worker");

/// The environment that points the binary at `sim` and the broker objects of `settings`.
pub fn env_for(sim: &Sim, settings: &Settings) -> Vec<(String, String)> {
    let a = &settings.amqp;
    [
        ("AMQP_URL", amqp_url()),
        ("AZURE_TENANT_ID", TENANT.to_owned()),
        ("AZURE_CLIENT_ID", settings.auth.client_id.clone()),
        ("AZURE_CLIENT_SECRET", SECRET.to_owned()),
        ("AZURE_AUTHORITY_HOST", sim.authority()),
        ("UNASSIGN__GRAPH__BASE_URL", sim.base_url()),
        (
            "UNASSIGN__GRAPH__MAX_REQUESTS_PER_SECOND",
            "1000".to_owned(),
        ),
        ("UNASSIGN__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        ("UNASSIGN__RETRY__BASE_DELAY_MS", "20".to_owned()),
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
        // The same delay tiers as the test's settings, so its cleanup finds every queue.
        (
            "UNASSIGN__AMQP__DELAY_TIERS_SECS",
            format!("{:?}", a.delay_tiers_secs),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The binary with exactly `vars` (and `PATH`) as its environment.
pub fn command(vars: &[(String, String)]) -> Command {
    let mut cmd = Command::new(BIN);
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
