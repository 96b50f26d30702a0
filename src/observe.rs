//! Metrics, `/readyz` and the job's log lines as an observer. Domain code — the job, the tenants,
//! and the supervisor with its publisher for the broker link ([`LinkEvent`]) — reports what
//! happened ([`Happened`]) through [`Observe`]; this is the one place that turns it into the
//! metrics of CONTRACT section 7 ([`crate::metrics`] names them) and into `/healthz` and
//! `/readyz` ([`Health`]).

use std::sync::Arc;

use crate::{
    config::TenantName,
    contract::Rejected,
    http::Health,
    job::{Call, Settlement},
    metrics::{ChannelErrorReason, GraphOperation, Metrics, WatchedQueue},
    retry::{Decision, PauseReason, Reply},
};

/// Something a job, a tenant or the broker link went through.
#[derive(Debug)]
pub enum Happened<'a> {
    /// A delivery is being worked on…
    JobStarted,
    /// …and no longer is (settled, handed back, or left to the broker).
    JobEnded,
    /// A delivery's state headers did not verify and were ignored.
    StateRejected(Rejected),
    /// A Graph call went out and this came back, after `seconds`.
    Called {
        tenant: &'a TenantName,
        call: &'a Call,
        reply: &'a Reply,
        seconds: f64,
    },
    /// What the job took Graph's answer to `call` to mean.
    Decided {
        tenant: &'a TenantName,
        call: &'a Call,
        decision: &'a Decision,
        /// Graph's answer, described.
        answer: &'a str,
    },
    /// A delivery was settled for good (published, confirmed, acked).
    Settled {
        tenant: &'a TenantName,
        settlement: &'a Settlement,
    },
    /// A tenant profile is served: its series start at zero.
    TenantServed(&'a TenantName),
    /// The tenant's credentials failed (`Some`) or work again (`None`).
    TenantPaused {
        tenant: &'a TenantName,
        reason: Option<PauseReason>,
    },
    /// What the supervisor or its publisher saw of the broker link.
    Link(LinkEvent<'a>),
}

/// The broker link as the supervisor keeps it, and the supervisor's own loop.
#[derive(Debug)]
pub enum LinkEvent<'a> {
    /// The supervisor's loop turned (each time round, and while it waits): it is not stuck.
    Alive,
    /// Connected to `nodes[node]`, of the `host:port`s `amqp.url` configures.
    Connected { nodes: &'a [String], node: usize },
    /// Connected to none of `nodes`: at start, and whenever a connection is lost or closed.
    Disconnected { nodes: &'a [String] },
    /// Connected again after an earlier connection was lost.
    Reconnected,
    /// A consume session began taking deliveries…
    ConsumeStarted,
    /// …and stopped (shutdown, connection loss or a pause).
    ConsumeStopped,
    /// Every tenant's credentials failed and consumption waits (`Some`), or one works again
    /// (`None`).
    ConsumptionPaused { reason: Option<PauseReason> },
    /// The broker closed this channel while the connection lived on.
    ChannelClosed(ChannelErrorReason),
    /// A queue's ready messages, as just read from the broker.
    QueueDepth { queue: WatchedQueue, ready: u32 },
}

/// Where domain code reports to.
pub trait Observe: Send + Sync {
    fn report(&self, happened: Happened<'_>);
}

/// Reports a job started, and its end on every path out (a dropped future's included).
pub struct Inflight<'a>(&'a dyn Observe);

impl<'a> Inflight<'a> {
    pub fn new(observe: &'a dyn Observe) -> Self {
        observe.report(Happened::JobStarted);
        Self(observe)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.report(Happened::JobEnded);
    }
}

/// The worker's observer: Prometheus metrics and the health endpoints.
pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Observe for Observer {
    fn report(&self, happened: Happened<'_>) {
        let m = &self.metrics;
        match happened {
            Happened::TenantServed(tenant) => m.register_tenant(tenant),
            Happened::JobStarted => m.inflight_inc(),
            Happened::JobEnded => m.inflight_dec(),
            Happened::StateRejected(why) => {
                tracing::warn!(
                    reason = why.as_str(),
                    "state headers that do not verify were ignored; the request starts afresh"
                );
                m.state_rejected(why);
            }
            Happened::Called {
                tenant,
                call,
                reply,
                seconds,
            } => {
                m.graph_call(tenant, operation(call), reply.answer.label(), seconds);
                let response = reply.response();
                // The job's span names Graph's id of its latest call, for support cases.
                if let Some(id) = response.and_then(|r| r.request_id.as_deref()) {
                    tracing::Span::current().record("graph_request_id", id);
                }
                tracing::debug!(
                    client_request_id = %reply.client_request_id,
                    activity_id = response.and_then(|r| r.error.as_ref()?.activity_id.as_deref()),
                    answer = %reply.describe(),
                    "graph call"
                );
            }
            Happened::Decided {
                tenant,
                call,
                decision,
                answer,
            } => decided(m, tenant, call, decision, answer),
            Happened::Settled { tenant, settlement } => settled(m, tenant, settlement),
            Happened::TenantPaused { tenant, reason } => {
                m.set_tenant_paused(tenant, reason.is_some());
                self.health
                    .set_tenant_paused(tenant.as_str(), reason.map(PauseReason::as_str));
                match reason {
                    Some(reason) => {
                        tracing::error!(%tenant, reason = reason.as_str(), "tenant paused");
                    }
                    None => {
                        tracing::info!(%tenant, "credentials work again; resuming the tenant");
                    }
                }
            }
            Happened::Link(event) => self.link(event),
        }
    }
}

impl Observer {
    /// The broker link's metrics and the health endpoints. The supervisor logs these itself,
    /// with the errors and nodes it has at hand.
    fn link(&self, event: LinkEvent<'_>) {
        let (m, health) = (&self.metrics, &self.health);
        match event {
            LinkEvent::Alive => health.tick(),
            LinkEvent::Connected { nodes, node } => {
                health.set_connected(true);
                m.set_amqp_connected(true);
                m.set_amqp_node(nodes, Some(node));
            }
            LinkEvent::Disconnected { nodes } => {
                health.set_connected(false);
                m.set_amqp_connected(false);
                m.set_amqp_node(nodes, None);
            }
            LinkEvent::Reconnected => m.amqp_reconnected(),
            LinkEvent::ConsumeStarted => health.set_consuming(true),
            LinkEvent::ConsumeStopped => health.set_consuming(false),
            LinkEvent::ConsumptionPaused { reason } => {
                health.set_paused(reason.map(|r| r.as_str().to_owned()));
            }
            LinkEvent::ChannelClosed(reason) => m.amqp_channel_error(reason),
            LinkEvent::QueueDepth { queue, ready } => m.set_queue_messages(queue, ready),
        }
    }
}

fn operation(call: &Call) -> GraphOperation {
    match call {
        Call::Unassign(_) => GraphOperation::Unassign,
        Call::List(_) => GraphOperation::List,
    }
}

fn decided(m: &Metrics, tenant: &TenantName, call: &Call, decision: &Decision, answer: &str) {
    match decision {
        Decision::Succeed => {
            if let Call::Unassign(device) = call {
                tracing::info!(device_id = %device, "unassigned");
            }
        }
        Decision::Retry { delay, reason, .. } => {
            m.retry(tenant, *reason);
            tracing::warn!(
                reason = reason.as_str(),
                delay_ms = delay.as_millis() as u64,
                answer,
                "retrying"
            );
        }
        Decision::RefreshToken => tracing::info!("graph answered 401; fetching a fresh token"),
        Decision::Fail(kind) => {
            tracing::warn!(kind = kind.as_str(), answer, "call failed");
        }
        Decision::Pause(_) => {}
    }
}

fn settled(m: &Metrics, tenant: &TenantName, settlement: &Settlement) {
    match settlement {
        Settlement::Finish(outcome) => {
            let seconds = (outcome.completed_at - outcome.received_at)
                .as_seconds_f64()
                .max(0.0);
            m.job_finished(tenant, outcome.error.is_some(), seconds);
            if let Some(failure) = &outcome.error {
                m.dead_lettered(tenant, failure.kind);
                tracing::warn!(kind = failure.kind.as_str(), message = %failure.message, "failed; dead-lettered");
            }
        }
        Settlement::HandBack(back) => match back.tier {
            Some(tier) => tracing::info!(tier_secs = tier.as_secs(), "parked in a delay queue"),
            None => tracing::info!("handed back to the queue"),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NODES: [&str; 2] = ["a:5701", "b:5702"];

    fn observer() -> Observer {
        Observer {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
        }
    }

    fn nodes() -> Vec<String> {
        NODES.map(str::to_owned).to_vec()
    }

    impl Observer {
        fn link_event(&self, event: LinkEvent<'_>) {
            self.report(Happened::Link(event));
        }

        /// Whether `/metrics` has this line, exactly.
        fn shows(&self, line: &str) -> bool {
            self.metrics.render().lines().any(|l| l == line)
        }

        /// Connected to the first node and consuming: ready.
        fn consuming_on_a(&self, nodes: &[String]) {
            self.link_event(LinkEvent::Connected { nodes, node: 0 });
            self.link_event(LinkEvent::ConsumeStarted);
        }

        /// `/readyz`'s `reason` when not ready, `None` when ready.
        fn not_ready(&self) -> Option<String> {
            let body = self.health.readiness().err()?;
            Some(body["reason"].as_str().unwrap().to_owned())
        }
    }

    #[test]
    fn alive_keeps_healthz_up() {
        let o = observer();
        assert!(!o.health.alive(), "never ticked");
        o.link_event(LinkEvent::Alive);
        assert!(o.health.alive());
    }

    #[test]
    fn connected_names_the_node_and_disconnected_none() {
        let (o, nodes) = (observer(), nodes());
        o.link_event(LinkEvent::Disconnected { nodes: &nodes });
        assert!(o.shows("unassign_amqp_connected 0"));
        assert!(o.shows("unassign_amqp_node{node=\"a:5701\"} 0"));
        assert!(o.shows("unassign_amqp_node{node=\"b:5702\"} 0"));
        assert_eq!(o.not_ready().as_deref(), Some("broker_disconnected"));

        o.link_event(LinkEvent::Connected {
            nodes: &nodes,
            node: 1,
        });
        assert!(o.shows("unassign_amqp_connected 1"));
        assert!(o.shows("unassign_amqp_node{node=\"a:5701\"} 0"));
        assert!(o.shows("unassign_amqp_node{node=\"b:5702\"} 1"));
        assert_eq!(o.not_ready().as_deref(), Some("not_consuming"));

        o.link_event(LinkEvent::Disconnected { nodes: &nodes });
        assert!(o.shows("unassign_amqp_connected 0"));
        assert!(o.shows("unassign_amqp_node{node=\"b:5702\"} 0"));
        assert_eq!(o.not_ready().as_deref(), Some("broker_disconnected"));
    }

    #[test]
    fn reconnected_counts_one_reconnect() {
        let o = observer();
        assert!(o.shows("unassign_amqp_reconnects_total 0"));
        o.link_event(LinkEvent::Reconnected);
        assert!(o.shows("unassign_amqp_reconnects_total 1"));
        assert_eq!(o.not_ready().as_deref(), Some("broker_disconnected"));
    }

    #[test]
    fn consuming_makes_a_connected_worker_ready_until_it_stops() {
        let (o, nodes) = (observer(), nodes());
        o.consuming_on_a(&nodes);
        assert_eq!(o.health.readiness(), Ok(json!({"ready": true})));
        o.link_event(LinkEvent::ConsumeStopped);
        assert_eq!(o.not_ready().as_deref(), Some("not_consuming"));
    }

    #[test]
    fn a_consumption_pause_makes_readyz_name_the_credentials_until_it_ends() {
        let (o, nodes) = (observer(), nodes());
        o.consuming_on_a(&nodes);
        let reason = Some(PauseReason::Forbidden);
        o.link_event(LinkEvent::ConsumptionPaused { reason });
        let body = json!({
            "ready": false,
            "reason": "credentials",
            "detail": PauseReason::Forbidden.as_str(),
            "paused_tenants": {},
        });
        assert_eq!(o.health.readiness(), Err(body));
        o.link_event(LinkEvent::ConsumptionPaused { reason: None });
        assert_eq!(o.health.readiness(), Ok(json!({"ready": true})));
    }

    #[test]
    fn a_closed_channel_counts_under_its_own_reason() {
        let o = observer();
        o.link_event(LinkEvent::ChannelClosed(ChannelErrorReason::QueuePoll));
        o.link_event(LinkEvent::ChannelClosed(ChannelErrorReason::QueuePoll));
        o.link_event(LinkEvent::ChannelClosed(ChannelErrorReason::Consume));
        assert!(o.shows("unassign_amqp_channel_errors_total{reason=\"publish\"} 0"));
        assert!(o.shows("unassign_amqp_channel_errors_total{reason=\"queue_poll\"} 2"));
        assert!(o.shows("unassign_amqp_channel_errors_total{reason=\"consume\"} 1"));
    }

    #[test]
    fn a_queue_depth_sets_its_queue_label_only() {
        let o = observer();
        let (queue, ready) = (WatchedQueue::DeadLetter, 7);
        o.link_event(LinkEvent::QueueDepth { queue, ready });
        assert!(o.shows("unassign_queue_messages{queue=\"dead_letter\"} 7"));
        assert!(o.shows("unassign_queue_messages{queue=\"requests\"} 0"));
    }
}
