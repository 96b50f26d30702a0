//! What the worker's integration tests and its benches share: a graph-sim on port 0, uniquely
//! named broker objects per run on the real RabbitMQ (`AMQP_URL`) and their cleanup, the worker
//! in-process or as a process (its binary and environment), collectors and an outcome tracker for
//! what it publishes, a TCP relay to break its connection, a private broker cluster, throw-away
//! certificates. Every wait polls with a deadline; nothing sleeps blindly.
//!
//! Written once here so that a test and a bench never drift apart on how a run is set up.

pub mod bench;
pub mod broker;
pub mod cluster;
mod endpoints;
pub mod outcomes;
pub mod pki;
pub mod process;
pub mod relay;
pub mod schema;
pub mod worker;

use std::{future::Future, time::Duration};

pub use broker::{Broker, Collector, Received};
pub use worker::{Env, Worker, broker_user, settings, sim_options};

pub const TENANT: &str = "3f1c3a8e-5c1b-4f5e-9a7d-0d2f6a1b2c3d";
pub const SECRET: &str = "test-secret-3b9f0e";

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The test broker's socket address, for a relay to forward to.
pub async fn broker_addr() -> std::net::SocketAddr {
    relay::broker_addr(&amqp_url()).await
}

pub fn device() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port nothing listens on now (another process could take it; the tests do not).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("its address").port()
}

/// A uniquely named file in the temp directory, removed when dropped.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(contents: &str) -> TempFile {
        let file = TempFile(std::env::temp_dir().join(format!("uw-{}", uuid::Uuid::new_v4())));
        file.write(contents);
        file
    }

    /// Replaces the contents, as Kubernetes does when it rotates a mounted file.
    pub fn write(&self, contents: &str) {
        std::fs::write(&self.0, contents).expect("write the temp file");
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A unique prefix for broker objects: test name + random suffix.
pub fn prefix(test: &str) -> String {
    format!(
        "t.{test}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The sum of the samples in a `/metrics` text named like `sample` that carry its labels (and
/// maybe more): `unassign_jobs_total{outcome="succeeded"}` adds up every tenant's series.
pub fn sum_samples(text: &str, sample: &str) -> f64 {
    let (name, wanted) = sample_labels(sample);
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (series_name, labels) = sample_labels(series);
            series_name == name && wanted.iter().all(|l| labels.contains(l))
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// A sample's metric name and its `label="value"` pairs (values hold no comma in our metrics).
pub fn sample_labels(sample: &str) -> (&str, Vec<&str>) {
    match sample.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (sample.trim(), Vec::new()),
    }
}
