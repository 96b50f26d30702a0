//! The binary as a black box: exit codes, `enqueue`, `check`, SIGTERM, the JSON log lines, and
//! secrets in logs.
//!
//! This file holds what the files below share: the worker as a process of its own (started, sent
//! SIGTERM, waited for with its logs) and the other credentials than the client secret.

mod check;
mod enqueue;
mod logs;
mod shutdown;
mod usage;

use crate::common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    Broker, TempFile,
    bin::{command, env_for, output},
    device, eventually,
    pki::TestCertificate,
};
use unassign_worker::sim::Sim;

const WAIT: Duration = Duration::from_secs(30);

/// A worker process whose logs (stderr) are read as they come, so a full pipe never blocks it.
struct Running {
    child: Child,
    logs: std::thread::JoinHandle<String>,
}

/// A test that fails half-way must not leave its worker running.
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_worker(vars: &[(String, String)]) -> Running {
    let mut child = command(vars)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the worker starts");
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
        logs
    });
    Running { child, logs }
}

fn sigterm(worker: &Running) {
    let pid = worker.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
}

/// Waits for the process to exit, returning its exit code, how long it took, and its logs.
async fn wait_exit(mut worker: Running, limit: Duration) -> (i32, Duration, String) {
    let started = Instant::now();
    let status = eventually("the worker to exit", limit, || {
        let status = worker.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    let logs = std::mem::replace(&mut worker.logs, std::thread::spawn(String::new));
    (
        status.code().unwrap_or(-1),
        started.elapsed(),
        logs.join().unwrap(),
    )
}

/// The environment for `settings` with `credential` (one `AZURE_*` variable and its file)
/// instead of the client secret.
fn with_credential(
    sim: &Sim,
    settings: &unassign_worker::config::Settings,
    credential: (&str, &std::path::Path),
) -> Vec<(String, String)> {
    let mut vars = env_for(sim, settings);
    vars.retain(|(k, _)| k != "AZURE_CLIENT_SECRET");
    vars.push((credential.0.into(), credential.1.display().to_string()));
    vars
}

/// A fresh key and certificate, and a simulator whose app registration holds the certificate.
async fn sim_with_certificate() -> (TestCertificate, Sim) {
    let pki = TestCertificate::generate();
    let registered = TempFile::new(&pki.cert_pem);
    let sim = Sim::start(unassign_worker::sim::SimOptions {
        client_certificates: vec![registered.0.clone()],
        ..common::sim_options()
    })
    .await
    .unwrap();
    (pki, sim)
}

/// A line from the middle of the private key's PEM body: no log may hold any of it.
fn key_material(pki: &TestCertificate) -> String {
    pki.key_pem.lines().nth(5).expect("a PEM body").to_owned()
}
