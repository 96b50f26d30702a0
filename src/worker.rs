//! The worker: builds everything from [`Settings`], then supervises the broker connection and
//! runs consume sessions on it until `shutdown` is cancelled. A session ends on shutdown,
//! connection loss, or a credential pause; the supervisor reacts and starts the next one. It
//! reports what happens to the link to the observer ([`crate::observe`]), which keeps the
//! connection metrics, `/healthz` and `/readyz`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::{
    Connection, Consumer, Event,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::FieldTable,
};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    amqp::{self, Publisher, TopologyError},
    config::{ConfigError, Settings},
    executor,
    graph::{self, GraphClient},
    http::{self, Health},
    job::Policy,
    metrics::{ChannelErrorReason, Metrics, WatchedQueue},
    observe::{Happened, LinkEvent, Observe, Observer},
    ports::SystemClock,
    replicas,
    retry::PauseReason,
    session::{CallSlots, Context, Session},
    settle::{Broker, Delivered},
    tenant::Tenants,
};

/// How often idle loops report that they are turning.
const TICK: Duration = Duration::from_secs(5);
/// How long closing a connection the worker is leaving may take before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Topology(TopologyError),
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
}

impl RunError {
    /// CONTRACT section 1: 2 for configuration (a conflicting topology included), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Topology(TopologyError::Conflict { .. }) => 2,
            _ => 1,
        }
    }
}

/// A built worker, its HTTP port bound, ready to [`App::run`].
pub struct App {
    settings: Settings,
    ctx: Arc<Context>,
    broker: Arc<Broker>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    listener: TcpListener,
    name: String,
}

/// How a consume session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
    Paused(PauseReason),
}

impl App {
    /// Validates credentials, builds the clients and binds the HTTP listener (port 0 works).
    pub async fn build(settings: Settings) -> Result<App, RunError> {
        let profiles = settings.tenant_profiles()?;
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let http = graph::http_client(settings.graph.timeout);
        let name = format!(
            "unassign-worker/{}",
            instance_name(&settings.worker.instance)
        );
        let observe: Arc<dyn Observe> = Arc::new(Observer {
            metrics: metrics.clone(),
            health: health.clone(),
        });
        let state_keys = Arc::new(settings.state_keys()?);
        let policy = Policy::new(&settings);
        let ctx = Context {
            graph: GraphClient::new(http.clone(), settings.graph.base_url.url().clone()),
            clock: SystemClock,
            tenants: Arc::new(Tenants::new(profiles, &http, &metrics, observe.clone())),
            graph_slots: CallSlots::new(settings.worker.concurrency.get()),
            observe,
            policy,
            state_keys: state_keys.clone(),
            state_limits: settings.state_limits(),
        };
        let broker = Broker {
            amqp: settings.amqp.clone(),
            source: name.clone(),
            state_keys,
        };
        let listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("binding http.listen {}", settings.http.listen))?;
        Ok(App {
            settings,
            ctx: Arc::new(ctx),
            broker: Arc::new(broker),
            health,
            metrics,
            listener,
            name,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Runs until `shutdown` is cancelled and in-flight work is settled or handed back.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let App {
            settings,
            ctx,
            broker,
            health,
            metrics,
            listener,
            name,
        } = self;
        // /healthz answers 200 from the start, before the supervisor's first turn.
        ctx.observe.report(Happened::Link(LinkEvent::Alive));
        let http_stop = CancellationToken::new();
        let router = http::router(metrics.clone(), health);
        let server = tokio::spawn(http::serve(listener, router, http_stop.clone()));
        tracing::info!(
            broker = %settings.amqp.redacted_url(),
            queue = %settings.amqp.queue,
            graph = %settings.graph.base_url,
            concurrency = settings.worker.concurrency,
            "worker starting"
        );
        let control = replicas::ControlPlane::spawn_for(&settings, &ctx.tenants, &metrics, &name)?;
        let supervisor = Supervisor {
            nodes: settings.amqp.url.labels(),
            settings,
            ctx,
            broker,
            name,
        };
        let result = supervisor.run(&shutdown).await;
        if let Some(control) = control {
            control.stop().await;
        }
        supervisor.ctx.tenants.stop_probing();
        http_stop.cancel();
        let _ = server.await;
        tracing::info!("worker stopped");
        result
    }
}

struct Supervisor {
    settings: Settings,
    /// `host:port` of each configured broker node, for logs and the `node` metric label.
    nodes: Vec<String>,
    ctx: Arc<Context>,
    broker: Arc<Broker>,
    name: String,
}

impl Supervisor {
    async fn run(&self, shutdown: &CancellationToken) -> Result<(), RunError> {
        let max_reconnect = self
            .settings
            .amqp
            .reconnect_max_delay
            .max(Duration::from_secs(1));
        let mut reconnect_delay = Duration::from_millis(500);
        let mut connected_before = false;
        // The node to try first: after losing one, the next in the list, so a node that went
        // away is tried last rather than first.
        let mut first_node = 0;
        self.disconnected();
        while !shutdown.is_cancelled() {
            self.report(LinkEvent::Alive);
            let (connection, node) = match self.connect(first_node).await {
                Ok(connected) => connected,
                Err(RunError::Runtime(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?reconnect_delay, "broker unavailable");
                    self.sleep(jittered(reconnect_delay), shutdown).await;
                    reconnect_delay = (reconnect_delay * 2).min(max_reconnect);
                    continue;
                }
                Err(fatal) => return Err(fatal),
            };
            // Shared with the session's publisher, which opens channels on it.
            let connection = Arc::new(connection);
            if connected_before {
                self.report(LinkEvent::Reconnected);
            }
            connected_before = true;
            reconnect_delay = Duration::from_millis(500);
            let nodes = &self.nodes;
            self.report(LinkEvent::Connected { nodes, node });
            loop {
                match self.session(&connection, shutdown).await {
                    SessionEnd::Shutdown => {
                        let _ = connection.close(200, "shutdown".into()).await;
                        self.disconnected();
                        return Ok(());
                    }
                    SessionEnd::Lost(why) => {
                        let node = &self.nodes[node];
                        tracing::warn!(error = %why, %node, "broker connection lost; reconnecting");
                        self.disconnected();
                        // Still open if only the consume channel died: closed, so the broker
                        // requeues what the session held (an error at once if already gone).
                        let closing = connection.close(200, "reconnecting".into());
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
                        break;
                    }
                    SessionEnd::Paused(reason) => self.wait_out_pause(reason, shutdown).await,
                }
            }
            first_node = node + 1;
        }
        Ok(())
    }

    /// What happened to the link, to the observer, which keeps the metrics and `/readyz`.
    fn report(&self, event: LinkEvent<'_>) {
        self.ctx.observe.report(Happened::Link(event));
    }

    /// Also at start: every configured node's series then reads 0 until one is connected to.
    fn disconnected(&self) {
        self.report(LinkEvent::Disconnected { nodes: &self.nodes });
    }

    /// Connects to the first node that answers, from `first_node` on, and declares the
    /// topology. A conflicting topology is fatal; the rest is retried.
    async fn connect(&self, first_node: usize) -> Result<(Connection, usize), RunError> {
        let amqp = &self.settings.amqp;
        let (connection, node) = amqp::connect(amqp, &self.name, first_node)
            .await
            .context("connecting to the broker")?;
        if amqp.declare_topology {
            let channel = connection
                .create_channel()
                .await
                .context("opening a channel")?;
            match amqp::declare(&channel, amqp).await {
                Ok(()) => {
                    let _ = channel.close(200, "declared".into()).await;
                }
                Err(e @ TopologyError::Conflict { .. }) => return Err(RunError::Topology(e)),
                Err(e) => return Err(RunError::Runtime(e.into())),
            }
        }
        tracing::info!(node = %self.nodes[node], "connected to the broker");
        Ok((connection, node))
    }

    /// One consume session: deliveries become jobs until shutdown, pause or connection loss.
    async fn session(
        &self,
        connection: &Arc<Connection>,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let (channel, mut consumer, publisher) = match self.open_session(connection).await {
            Ok(parts) => parts,
            Err(e) => return SessionEnd::Lost(format!("{e:#}")),
        };
        let stop = shutdown.child_token();
        let session = Arc::new(Session::new(stop.clone()));
        let link_lost = CancellationToken::new();
        let jobs = TaskTracker::new();
        let mut events = connection.events_listener();
        let poll_every = self.settings.amqp.queue_poll.max(Duration::from_secs(1));
        let mut queue_poll = tokio::time::interval(poll_every);
        self.report(LinkEvent::ConsumeStarted);
        tracing::info!(queue = %self.settings.amqp.queue, "consuming");
        let end = loop {
            self.report(LinkEvent::Alive);
            // An error event is judged by the states at the moment it arrives, and a consumer
            // stream need not end with its channel: whatever the order lapin reports things in,
            // a connection or consume channel found dead here (every TICK at the latest) ends
            // the session.
            if !(connection.status().connected() && channel.status().connected()) {
                break self.lost(
                    connection,
                    "the connection or the consume channel is gone".into(),
                );
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break match session.pause_reason() {
                    Some(reason) => SessionEnd::Paused(reason),
                    None => SessionEnd::Shutdown,
                },
                event = events.next() => match event {
                    // lapin reports a channel the broker closed here too. Only the connection's
                    // end or the consume channel's ends the session; the others' owners reopen
                    // them (the publisher) or open a fresh one each time (the queue poll).
                    Some(Event::Error(e))
                        if connection.status().connected() && channel.status().connected() =>
                    {
                        tracing::info!(error = %e, "the broker closed a channel; carrying on");
                    }
                    Some(Event::Error(e)) => break self.lost(connection, e.to_string()),
                    Some(_) => {}
                    None => break SessionEnd::Lost("connection events ended".to_owned()),
                },
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => self.spawn_job(&jobs, &session, (&publisher, &link_lost), delivery),
                    Some(Err(e)) => break self.lost(connection, e.to_string()),
                    None => break SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
                },
                _ = queue_poll.tick() => self.poll_queue_depths(connection).await,
                _ = tokio::time::sleep(TICK) => {}
            }
        };
        if let SessionEnd::Paused(reason) = &end {
            // Before "not consuming", so /readyz never shows a misleading reason in between.
            let reason = Some(*reason);
            self.report(LinkEvent::ConsumptionPaused { reason });
        }
        self.report(LinkEvent::ConsumeStopped);
        stop.cancel();
        if let SessionEnd::Lost(_) = end {
            // Nothing can be settled on a dead connection or consume channel: the broker
            // requeues what we held, and the jobs stop waiting on it (see `Delivered`).
            if !(connection.status().connected() && channel.status().connected()) {
                link_lost.cancel();
            }
            return end;
        }
        // Stop the flow, and hand back what was prefetched but not yet picked up.
        let tag = consumer.tag();
        if let Err(e) = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
        {
            tracing::warn!(error = %e, "cancelling the consumer failed");
        }
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
        {
            self.spawn_job(&jobs, &session, (&publisher, &link_lost), delivery);
        }
        jobs.close();
        let grace = self.settings.worker.shutdown_grace;
        if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
            tracing::warn!(
                left = jobs.len(),
                "grace period over; unsettled deliveries are left for the broker to requeue"
            );
        }
        // Closed here, not on drop: a drop-time close racing the connection's close makes
        // lapin report a spurious connection error.
        let _ = channel.close(200, "session over".into()).await;
        publisher.close().await;
        end
    }

    /// The session's end on an error: the connection's, or — while the connection lives on —
    /// the consume channel's (counted), whose deliveries the broker requeues either way.
    fn lost(&self, connection: &Connection, why: String) -> SessionEnd {
        if connection.status().connected() {
            self.report(LinkEvent::ChannelClosed(ChannelErrorReason::Consume));
        }
        SessionEnd::Lost(why)
    }

    async fn open_session(
        &self,
        connection: &Arc<Connection>,
    ) -> anyhow::Result<(lapin::Channel, Consumer, Publisher)> {
        let amqp = &self.settings.amqp;
        let channel = connection
            .create_channel()
            .await
            .context("opening the consume channel")?;
        let prefetch = amqp.effective_prefetch(self.settings.worker.concurrency.get());
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        let observe = self.ctx.observe.clone();
        let reopened = move || {
            let closed = LinkEvent::ChannelClosed(ChannelErrorReason::Publish);
            observe.report(Happened::Link(closed));
        };
        let publisher = Publisher::reopening(connection, reopened)
            .await
            .context("opening the publish channel")?;
        let tag = format!("{}/{}", self.name, uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                amqp.queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming from {}", amqp.queue))?;
        Ok((channel, consumer, publisher))
    }

    /// Reads the ready counts of the request and dead-letter queues (passive declares on a
    /// throwaway channel, since a missing queue closes the channel it was asked on — counted,
    /// and nothing more: the session goes on).
    async fn poll_queue_depths(&self, connection: &Connection) {
        let Ok(channel) = connection.create_channel().await else {
            return;
        };
        let amqp = &self.settings.amqp;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let queues = [
            (WatchedQueue::Requests, &amqp.queue),
            (WatchedQueue::DeadLetter, &amqp.dead_letter_queue),
        ];
        for (watched, queue) in queues {
            let declared =
                channel.queue_declare(queue.as_str().into(), passive, FieldTable::default());
            match declared.await {
                Ok(q) => self.report(LinkEvent::QueueDepth {
                    queue: watched,
                    ready: q.message_count(),
                }),
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "queue depth unavailable");
                    if connection.status().connected() {
                        self.report(LinkEvent::ChannelClosed(ChannelErrorReason::QueuePoll));
                    }
                    return;
                }
            }
        }
        let _ = channel.close(200, "polled".into()).await;
    }

    fn spawn_job(
        &self,
        jobs: &TaskTracker,
        session: &Arc<Session>,
        (publisher, link_lost): (&Publisher, &CancellationToken),
        delivery: lapin::message::Delivery,
    ) {
        let (ctx, session) = (self.ctx.clone(), session.clone());
        let (publisher, link_lost) = (publisher.clone(), link_lost.clone());
        let (message, settle) = Delivered::new(self.broker.clone(), publisher, delivery, link_lost);
        jobs.spawn(async move { executor::handle(&ctx, &session, message, settle).await });
    }

    /// Credential trouble in every tenant: not ready, nothing consumed, until one tenant's
    /// probe (see [`Tenants`]) gets a token again. The session reported the pause as it ended.
    async fn wait_out_pause(&self, reason: PauseReason, shutdown: &CancellationToken) {
        tracing::warn!(reason = reason.as_str(), "consumption paused");
        let tenants = &self.ctx.tenants;
        while tenants.all_paused() {
            self.report(LinkEvent::Alive);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tenants.one_works() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        if !shutdown.is_cancelled() {
            tracing::info!("credentials work again; resuming consumption");
        }
        self.report(LinkEvent::ConsumptionPaused { reason: None });
    }

    /// Sleeps, reporting the loop alive; `false` if shutdown came first.
    async fn sleep(&self, duration: Duration, shutdown: &CancellationToken) -> bool {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            self.report(LinkEvent::Alive);
            let step = deadline.saturating_duration_since(Instant::now()).min(TICK);
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(step) => {}
            }
        }
        !shutdown.is_cancelled()
    }
}

/// ±25 % so a fleet of workers does not reconnect in lockstep.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.75 + rand::random::<f64>() * 0.5)
}

/// `worker.instance`, else the host name (the pod name on Kubernetes).
fn instance_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
