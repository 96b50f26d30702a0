//! The HTTP intake (`unassign-worker intake`, CONTRACT section 9): HR systems that speak
//! webhooks post requests over HTTPS; the intake validates them with `enqueue`'s own rules and
//! publishes them to the request exchange exactly as a producer would, answering 202 only once
//! the broker confirmed every one. A process of its own, so the public endpoint scales and is
//! exposed apart from the worker. Start reading at [`accept`](Intake::accept).

mod accept;
pub mod auth;
mod idempotency;
mod inflight;
mod metrics;
mod publish;
mod ratelimit;
mod routes;
mod window;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::{
    auth::Authenticator, idempotency::Confirmed, inflight::InFlight, metrics::IntakeMetrics,
    publish::Broker, ratelimit::RateLimit,
};
use crate::{config::Settings, http, worker::RunError};

/// What every post shares.
pub struct Intake {
    auth: Authenticator,
    limit: RateLimit,
    confirmed: Confirmed,
    inflight: InFlight,
    broker: Broker,
    metrics: Arc<IntakeMetrics>,
    max_body: usize,
    max_batch: usize,
}

/// A built intake, its ports bound (port 0 works), ready to [`Server::run`].
pub struct Server {
    intake: Arc<Intake>,
    supervisor: publish::Supervisor,
    public: TcpListener,
    operations: TcpListener,
}

impl Server {
    /// Checks the intake's settings and secrets files (exit 2 naming the key) and binds both
    /// ports; the broker is connected to by [`Server::run`], and reconnected to by itself.
    pub async fn build(settings: &Settings) -> Result<Server, RunError> {
        let config = &settings.intake;
        config.validate()?;
        let auth = Authenticator::from_settings(config)?;
        let metrics = Arc::new(IntakeMetrics::new());
        let (broker, supervisor) =
            publish::link(&settings.amqp, config.publish_timeout, metrics.clone());
        let public = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding intake.listen {}", config.listen))?;
        let operations = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("binding intake.metrics_listen {}", config.metrics_listen))?;
        let intake = Intake {
            auth,
            limit: RateLimit::new(config.rate_limit_per_second.get()),
            confirmed: Confirmed::new(config.idempotency_window, config.idempotency_capacity.get()),
            inflight: InFlight::default(),
            broker,
            metrics,
            max_body: config.max_body_bytes.get(),
            max_batch: config.max_batch.get(),
        };
        Ok(Server {
            intake: Arc::new(intake),
            supervisor,
            public,
            operations,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.public.local_addr().expect("a bound listener")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.operations.local_addr().expect("a bound listener")
    }

    /// Serves until `shutdown`: then stops accepting, lets every post in progress finish its
    /// confirms (each is bounded by `intake.publish_timeout_secs`), and closes the connection.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let Server {
            intake,
            supervisor,
            public,
            operations,
        } = self;
        let link_stop = CancellationToken::new();
        let mut link = tokio::spawn(supervisor.run(link_stop.clone()));
        let ops_stop = CancellationToken::new();
        let ops = tokio::spawn(http::serve(
            operations,
            routes::operations(intake.clone()),
            ops_stop.clone(),
        ));
        tracing::info!(
            listen = %public.local_addr().map_err(anyhow::Error::from)?,
            broker = %intake.broker_url(),
            "intake serving /v1/requests"
        );
        let served = axum::serve(public, routes::public(intake))
            .with_graceful_shutdown(shutdown.cancelled_owned());
        let result = tokio::select! {
            served = served => served.context("serving the intake").map_err(RunError::from),
            linked = &mut link => match linked {
                Ok(Err(conflict)) => Err(RunError::Topology(conflict)),
                _ => Err(anyhow::anyhow!("the broker supervisor ended").into()),
            },
        };
        link_stop.cancel();
        if !link.is_finished() {
            let _ = link.await;
        }
        ops_stop.cancel();
        let _ = ops.await;
        tracing::info!("intake stopped");
        result
    }
}

impl Intake {
    fn broker_url(&self) -> String {
        self.broker.redacted_url()
    }
}
