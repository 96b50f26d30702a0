//! Shared test harness: a graph-sim on port 0, uniquely named broker objects per test on the
//! real RabbitMQ (`AMQP_URL`), the worker in-process with a shutdown token, and collectors for
//! outcome events and dead letters. Every wait polls with a deadline; nothing sleeps blindly.

pub mod bin;
pub mod cluster;
// Shared with the unit tests, which use the parts these tests do not.
#[allow(dead_code)]
#[path = "../../../src/test_pki.rs"]
pub mod pki;
pub mod relay;

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use unassign_worker::{
    amqp::{self, Publisher},
    config::Settings,
    contract::OutcomeEvent,
    sim::{Sim, SimOptions},
    worker::{App, RunError},
};

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

pub fn sim_options() -> SimOptions {
    SimOptions {
        client_secret: SECRET.to_owned(),
        ..SimOptions::default()
    }
}

/// Settings pointing at `sim` with broker object names unique to `prefix`.
pub fn settings(sim: &Sim, prefix: &str) -> Settings {
    let mut s = Settings::load(None).expect("the built-in defaults load");
    s.amqp.url = amqp_url().parse().unwrap();
    s.amqp.exchange = format!("{prefix}.requests.x");
    s.amqp.queue = format!("{prefix}.requests");
    s.amqp.dead_letter_exchange = format!("{prefix}.dlx");
    s.amqp.dead_letter_queue = format!("{prefix}.dead");
    s.amqp.events_exchange = format!("{prefix}.events");
    s.amqp.outcomes_queue = format!("{prefix}.outcomes");
    s.amqp.reconnect_max_delay = std::time::Duration::from_secs(1);
    // Fewer delay tiers than in production: quorum queues take a moment each to declare.
    s.amqp.delay_tiers_secs = vec![2, 4].try_into().unwrap();
    s.auth.authority_host = Some(sim.authority().parse().unwrap());
    s.auth.tenant_id = TENANT.to_owned();
    s.auth.client_id = SimOptions::default().client_id;
    s.auth.client_secret = Some(SECRET.into());
    s.graph.base_url = sim.base_url().parse().unwrap();
    // A high ceiling is where the adaptive budget starts, so tests do not wait for it to grow;
    // Retry-After holds still apply (tests of the budget itself set 0).
    s.graph.max_requests_per_second = 1000.0.try_into().unwrap();
    s.graph.timeout = std::time::Duration::from_secs(5);
    s.retry.base_delay = std::time::Duration::from_millis(20);
    s.retry.max_delay = std::time::Duration::from_secs(2);
    s.worker.concurrency = std::num::NonZeroUsize::new(8).unwrap();
    s.worker.shutdown_grace = std::time::Duration::from_secs(5);
    s.worker.instance = prefix.to_owned();
    s.http.listen = "127.0.0.1:0".parse().unwrap();
    s
}

/// A unique prefix for broker objects: test name + random suffix.
pub fn prefix(test: &str) -> String {
    format!(
        "t.{test}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub fn event(&self) -> OutcomeEvent {
        serde_json::from_slice(&self.body).expect("a CloudEvent")
    }

    pub fn header(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }
}

/// Everything consumed from one queue, collected in the background.
#[derive(Clone, Default)]
pub struct Collector(Arc<Mutex<Vec<Received>>>);

impl Collector {
    pub fn all(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        eventually(&format!("{n} message(s)"), timeout, || async {
            let all = self.all();
            (all.len() >= n).then_some(all)
        })
        .await
    }
}

/// The test's own view of the broker and the objects it names.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
    pub settings: Settings,
}

impl Broker {
    pub async fn connect(settings: &Settings) -> Broker {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("test broker connection");
        let channel = connection.create_channel().await.unwrap();
        let broker = Broker {
            connection,
            channel,
            settings: settings.clone(),
        };
        amqp::declare(&broker.channel, &settings.amqp)
            .await
            .expect("declare the test topology");
        broker
    }

    /// Consumes `queue` into a collector, acking each message.
    pub async fn collect(&self, queue: &str) -> Collector {
        let channel = self.connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let collector = Collector::default();
        let sink = collector.clone();
        tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                sink.0.lock().unwrap().push(Received {
                    body: delivery.data.clone(),
                    properties: delivery.properties.clone(),
                });
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        collector
    }

    pub async fn publisher(&self) -> Publisher {
        Publisher::open(&self.connection).await.unwrap()
    }

    /// Publishes a request body as a producer would (persistent JSON, confirmed).
    pub async fn publish(&self, body: &[u8], properties: BasicProperties) {
        let properties = properties
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let a = &self.settings.amqp;
        self.publisher()
            .await
            .publish(&a.exchange, &a.routing_key, body, properties, true)
            .await
            .expect("publish confirmed");
    }

    pub async fn publish_request(&self, request_id: &str, device_id: &str) {
        let body = serde_json::json!({"request_id": request_id, "device_id": device_id, "requested_by": "tests", "reason": "offboarding"});
        self.publish(body.to_string().as_bytes(), BasicProperties::default())
            .await;
    }

    /// Ready messages in `queue` (unacked ones are not counted).
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .expect("queue exists");
        let _ = channel.close(200, "".into()).await;
        q.message_count()
    }

    /// Deletes the test's queues and exchanges.
    pub async fn cleanup(&self) {
        let a = &self.settings.amqp;
        let channel = self.connection.create_channel().await.unwrap();
        let tiers = a.delay_tiers_secs.iter().map(|&secs| a.tier_queue(secs));
        let queues = [
            a.queue.clone(),
            a.dead_letter_queue.clone(),
            a.outcomes_queue.clone(),
        ];
        for q in queues.into_iter().chain(tiers) {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [&a.exchange, &a.dead_letter_exchange, &a.events_exchange] {
            let _ = channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

/// A worker running in this process.
pub struct Worker {
    pub http: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), RunError>>,
}

impl Worker {
    pub async fn start(settings: Settings) -> Worker {
        let app = App::build(settings).await.expect("worker builds");
        let http = app.http_addr();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run(shutdown.clone()));
        Worker {
            http,
            shutdown,
            handle,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("worker stops within grace")
            .unwrap()
            .expect("worker exits cleanly");
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.http))
            .await
            .expect("worker HTTP answers");
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The sum of the `/metrics` samples named like `sample` that carry its labels (and maybe
    /// more): `unassign_jobs_total{outcome="succeeded"}` adds up every tenant's series.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
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

    pub async fn wait_ready(&self) {
        eventually("/readyz 200", Duration::from_secs(20), || async {
            (self.get("/readyz").await.0 == 200).then_some(())
        })
        .await;
    }
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

/// The usual set-up: simulator, broker objects, collectors for events and dead letters, worker.
pub struct Env {
    pub sim: Sim,
    pub broker: Broker,
    pub events: Collector,
    pub dead: Collector,
    pub worker: Worker,
}

impl Env {
    pub async fn start(test: &str) -> Env {
        Self::start_with(test, sim_options(), |_| {}).await
    }

    pub async fn start_with(test: &str, sim: SimOptions, tweak: impl FnOnce(&mut Settings)) -> Env {
        let sim = Sim::start(sim).await.expect("graph-sim starts");
        let mut settings = settings(&sim, &prefix(test));
        tweak(&mut settings);
        let broker = Broker::connect(&settings).await;
        let events = broker.collect(&settings.amqp.outcomes_queue).await;
        let dead = broker.collect(&settings.amqp.dead_letter_queue).await;
        let worker = Worker::start(settings).await;
        worker.wait_ready().await;
        Env {
            sim,
            broker,
            events,
            dead,
            worker,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.broker.settings
    }

    /// Stops the worker and the simulator and removes the broker objects.
    pub async fn finish(self) {
        self.worker.stop().await;
        self.broker.cleanup().await;
        self.sim.shutdown().await;
    }
}

/// Makes sure the local broker has a user `user` (password `password`) with every permission on
/// the default vhost: a producer with a broker identity of its own. Idempotent.
pub fn broker_user(user: &str, password: &str) {
    let ctl = |args: &[&str]| {
        std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl runs (the tests need the local broker)")
    };
    // "already exists" is fine; the password is set again either way.
    let _ = ctl(&["add_user", user, password]);
    let changed = ctl(&["change_password", user, password]);
    assert!(changed.status.success(), "{changed:?}");
    let granted = ctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
    assert!(granted.status.success(), "{granted:?}");
}
