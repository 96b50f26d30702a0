//! The worker in this process: the test settings that point it at a graph-sim and a run's broker
//! objects, and the usual set-up of simulator, broker, collectors and worker.

use std::{num::NonZeroUsize, time::Duration};

use graph_sim::{Sim, SimOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use unassign_worker::{
    config::Settings,
    worker::{App, RunError},
};

use crate::{Broker, Collector, SECRET, TENANT, amqp_url, broker::name_objects, endpoints, prefix};

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
    name_objects(&mut s.amqp, prefix);
    s.amqp.reconnect_max_delay = Duration::from_secs(1);
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
    s.graph.timeout = Duration::from_secs(5);
    s.retry.base_delay = Duration::from_millis(20);
    s.retry.max_delay = Duration::from_secs(2);
    s.worker.concurrency = NonZeroUsize::new(8).unwrap();
    s.worker.shutdown_grace = Duration::from_secs(5);
    s.worker.instance = prefix.to_owned();
    s.http.listen = "127.0.0.1:0".parse().unwrap();
    s
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
        endpoints::get(self.http, path).await
    }

    /// The sum of the `/metrics` samples named like `sample` that carry its labels (and maybe
    /// more): `unassign_jobs_total{outcome="succeeded"}` adds up every tenant's series.
    pub async fn metric(&self, sample: &str) -> f64 {
        endpoints::metric(self.http, sample).await
    }

    pub async fn wait_ready(&self) {
        endpoints::wait_ready(self.http).await;
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
