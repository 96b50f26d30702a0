//! The one place that names metrics (CONTRACT section 7). The observer ([`crate::observe`]) calls
//! its typed methods for the job and the supervisor; beside it only the token source, the tenant
//! gates' observer and the control plane do. No label ever carries an unbounded value (ids, user
//! names).

mod process;
mod replicas;

pub use replicas::ControlRejected;

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    config::TenantName,
    contract::{ErrorKind, Rejected},
    retry::RetryReason,
};

/// Profile names only: configured at start, so the label stays bounded.
impl EncodeLabelValue for TenantName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
    tenant: TenantName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
    tenant: TenantName,
}

/// An HTTP code, or `timeout` / `connect_error`: a bounded set by construction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    operation: &'static str,
    status: std::borrow::Cow<'static, str>,
    tenant: TenantName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    operation: &'static str,
    tenant: TenantName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
    tenant: TenantName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenResult {
    result: &'static str,
    tenant: TenantName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Tenant {
    tenant: TenantName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateRejected {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Queue {
    queue: &'static str,
}

/// `host:port` of a configured broker node: bounded by the configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Node {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelError {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

/// What every process of this binary exposes beside its own metrics (the worker's and the
/// intake's alike): `unassign_build_info{version}` and the standard `process_*` series.
pub fn register_process(r: &mut Registry) {
    let build_info = Family::<Version, Gauge>::default();
    build_info
        .get_or_create(&Version {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    r.register("unassign_build_info", "Build information", build_info);
    r.register_collector(Box::new(process::Process));
}

/// Which channel the broker closed while the connection lived on
/// (`unassign_amqp_channel_errors_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelErrorReason {
    /// The publish channel, reopened: found closed (a publish the broker refused at channel
    /// level), or retired after a nack.
    Publish,
    /// The throwaway channel of the queue-depth poll (a queue that is gone).
    QueuePoll,
    /// The consume channel: the session ends and its deliveries go back to the queue.
    Consume,
}

impl ChannelErrorReason {
    const ALL: [Self; 3] = [Self::Publish, Self::QueuePoll, Self::Consume];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::QueuePoll => "queue_poll",
            Self::Consume => "consume",
        }
    }
}

/// Which queue's ready count, as the `queue` label of `unassign_queue_messages`: the configured
/// names stay out of the labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchedQueue {
    Requests,
    DeadLetter,
}

impl WatchedQueue {
    const ALL: [Self; 2] = [Self::Requests, Self::DeadLetter];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::DeadLetter => "dead_letter",
        }
    }
}

/// Which Graph call, as the `operation` label: the write, or a page of a device lookup (serial
/// number and user requests), which Graph budgets separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphOperation {
    Unassign,
    List,
}

impl GraphOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unassign => "unassign",
            Self::List => "list",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    jobs: Family<Outcome, Counter>,
    dead_letters: Family<Kind, Counter>,
    graph_requests: Family<Status, Counter>,
    graph_duration: Family<Operation, Histogram, fn() -> Histogram>,
    job_duration: Family<Tenant, Histogram, fn() -> Histogram>,
    retries: Family<Reason, Counter>,
    throttled: Family<Tenant, Gauge>,
    rate_limit: Family<Tenant, Gauge<f64, AtomicU64>>,
    read_rate_limit: Family<Tenant, Gauge<f64, AtomicU64>>,
    tenant_paused: Family<Tenant, Gauge>,
    inflight: Gauge,
    amqp_connected: Gauge,
    amqp_reconnects: Counter,
    amqp_channel_errors: Family<ChannelError, Counter>,
    amqp_node: Family<Node, Gauge>,
    token_requests: Family<TokenResult, Counter>,
    queue_messages: Family<Queue, Gauge>,
    state_rejected: Family<StateRejected, Counter>,
    runtime_tasks: Gauge,
    replicas: replicas::ReplicaMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            jobs: Family::default(),
            dead_letters: Family::default(),
            graph_requests: Family::default(),
            // 5 ms … ~82 s: Graph answers in tens of ms to seconds; timeouts sit at the top.
            graph_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 15))
            }),
            // 10 ms … ~1.9 days: a throttled or retried job can legitimately take hours.
            job_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 3.0, 18))
            }),
            retries: Family::default(),
            throttled: Family::default(),
            rate_limit: Family::default(),
            read_rate_limit: Family::default(),
            tenant_paused: Family::default(),
            inflight: Gauge::default(),
            amqp_connected: Gauge::default(),
            amqp_reconnects: Counter::default(),
            amqp_channel_errors: Family::default(),
            amqp_node: Family::default(),
            token_requests: Family::default(),
            queue_messages: Family::default(),
            state_rejected: Family::default(),
            runtime_tasks: Gauge::default(),
            replicas: replicas::ReplicaMetrics::default(),
        };
        for queue in WatchedQueue::ALL {
            let queue = queue.as_str();
            let _ = m.queue_messages.get_or_create(&Queue { queue });
        }
        for why in Rejected::ALL {
            let _ = m.state_rejected.get_or_create(&StateRejected {
                reason: why.as_str(),
            });
        }
        for reason in ChannelErrorReason::ALL {
            let reason = reason.as_str();
            let _ = m
                .amqp_channel_errors
                .get_or_create(&ChannelError { reason });
        }
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        // prometheus-client appends `_total` to counters.
        r.register(
            "unassign_jobs",
            "Requests that reached a final outcome",
            self.jobs.clone(),
        );
        r.register(
            "unassign_dead_letters",
            "Requests dead-lettered by the worker",
            self.dead_letters.clone(),
        );
        r.register(
            "unassign_graph_requests",
            "Graph calls by operation and HTTP status",
            self.graph_requests.clone(),
        );
        r.register(
            "unassign_graph_request_duration_seconds",
            "Graph call latency by operation",
            self.graph_duration.clone(),
        );
        r.register(
            "unassign_job_duration_seconds",
            "First receipt to final outcome",
            self.job_duration.clone(),
        );
        r.register(
            "unassign_retries",
            "Graph calls retried, by reason",
            self.retries.clone(),
        );
        r.register(
            "unassign_throttled",
            "1 while calls to the tenant are held back by a Retry-After",
            self.throttled.clone(),
        );
        r.register(
            "unassign_tenant_paused",
            "1 while the tenant's jobs wait for its credentials to work again",
            self.tenant_paused.clone(),
        );
        r.register(
            "unassign_rate_limit_per_second",
            "Current Graph request budget per tenant (0 = none)",
            self.rate_limit.clone(),
        );
        r.register(
            "unassign_read_rate_limit_per_second",
            "Current budget for Graph reads (device lookups) per tenant (0 = none)",
            self.read_rate_limit.clone(),
        );
        r.register(
            "unassign_inflight_jobs",
            "Deliveries being processed",
            self.inflight.clone(),
        );
        r.register(
            "unassign_amqp_connected",
            "1 while connected to the broker",
            self.amqp_connected.clone(),
        );
        r.register(
            "unassign_amqp_reconnects",
            "Broker reconnections",
            self.amqp_reconnects.clone(),
        );
        r.register(
            "unassign_amqp_channel_errors",
            "Broker channels closed by the broker while the connection stayed up, by channel",
            self.amqp_channel_errors.clone(),
        );
        r.register(
            "unassign_amqp_node",
            "1 for the broker node in use, 0 for the other configured ones",
            self.amqp_node.clone(),
        );
        r.register(
            "unassign_token_requests",
            "Token endpoint requests by result",
            self.token_requests.clone(),
        );
        r.register(
            "unassign_queue_messages",
            "Messages ready in the request and dead-letter queues, as last seen",
            self.queue_messages.clone(),
        );
        r.register(
            "unassign_state_rejected",
            "Deliveries whose x-unassign-state headers did not verify and were ignored, by reason",
            self.state_rejected.clone(),
        );
        r.register(
            "unassign_runtime_alive_tasks",
            "Tokio tasks alive in the worker, as of this scrape (a leak shows as steady growth)",
            self.runtime_tasks.clone(),
        );
        register_process(r);
        self.replicas.register(r);
    }

    /// The registry in the text exposition format.
    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let tasks = runtime.metrics().num_alive_tasks();
            self.runtime_tasks
                .set(i64::try_from(tasks).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Starts a tenant's series at zero, so dashboards and alerts see them from the start.
    pub fn register_tenant(&self, tenant: &TenantName) {
        for outcome in ["succeeded", "failed"] {
            let _ = self.jobs.get_or_create(&Outcome {
                outcome,
                tenant: tenant.clone(),
            });
        }
        for kind in ErrorKind::ALL {
            let _ = self.dead_letters.get_or_create(&Kind {
                kind: kind.as_str(),
                tenant: tenant.clone(),
            });
        }
        for reason in RetryReason::ALL {
            let _ = self.retries.get_or_create(&Reason {
                reason: reason.as_str(),
                tenant: tenant.clone(),
            });
        }
        for result in ["ok", "error"] {
            let _ = self.token_requests.get_or_create(&TokenResult {
                result,
                tenant: tenant.clone(),
            });
        }
        let tenant = Tenant {
            tenant: tenant.clone(),
        };
        let _ = self.throttled.get_or_create(&tenant);
        let _ = self.rate_limit.get_or_create(&tenant);
        let _ = self.read_rate_limit.get_or_create(&tenant);
        let _ = self.tenant_paused.get_or_create(&tenant);
    }

    pub fn job_finished(&self, tenant: &TenantName, failed: bool, seconds: f64) {
        let outcome = if failed { "failed" } else { "succeeded" };
        self.job_duration
            .get_or_create(&Tenant {
                tenant: tenant.clone(),
            })
            .observe(seconds);
        let tenant = tenant.clone();
        self.jobs.get_or_create(&Outcome { outcome, tenant }).inc();
    }

    pub fn dead_lettered(&self, tenant: &TenantName, kind: ErrorKind) {
        self.dead_letters
            .get_or_create(&Kind {
                kind: kind.as_str(),
                tenant: tenant.clone(),
            })
            .inc();
    }

    pub fn graph_call(
        &self,
        tenant: &TenantName,
        operation: GraphOperation,
        status: std::borrow::Cow<'static, str>,
        seconds: f64,
    ) {
        let operation = operation.as_str();
        self.graph_duration
            .get_or_create(&Operation {
                operation,
                tenant: tenant.clone(),
            })
            .observe(seconds);
        let tenant = tenant.clone();
        self.graph_requests
            .get_or_create(&Status {
                operation,
                status,
                tenant,
            })
            .inc();
    }

    pub fn retry(&self, tenant: &TenantName, reason: RetryReason) {
        self.retries
            .get_or_create(&Reason {
                reason: reason.as_str(),
                tenant: tenant.clone(),
            })
            .inc();
    }

    pub fn set_tenant_paused(&self, tenant: &TenantName, paused: bool) {
        let tenant = tenant.clone();
        self.tenant_paused
            .get_or_create(&Tenant { tenant })
            .set(paused.into());
    }

    pub fn inflight_inc(&self) {
        self.inflight.inc();
    }

    pub fn inflight_dec(&self) {
        self.inflight.dec();
    }

    pub fn set_amqp_connected(&self, connected: bool) {
        self.amqp_connected.set(connected.into());
    }

    /// `nodes` are the configured `host:port`s; `current` indexes the one connected to.
    pub fn set_amqp_node(&self, nodes: &[String], current: Option<usize>) {
        for (i, node) in nodes.iter().enumerate() {
            let gauge = self.amqp_node.get_or_create(&Node { node: node.clone() });
            gauge.set((current == Some(i)).into());
        }
    }

    pub fn amqp_reconnected(&self) {
        self.amqp_reconnects.inc();
    }

    pub fn amqp_channel_error(&self, reason: ChannelErrorReason) {
        let reason = reason.as_str();
        self.amqp_channel_errors
            .get_or_create(&ChannelError { reason })
            .inc();
    }

    pub fn set_queue_messages(&self, queue: WatchedQueue, ready: u32) {
        let queue = queue.as_str();
        self.queue_messages
            .get_or_create(&Queue { queue })
            .set(ready.into());
    }

    /// A delivery's state headers did not verify and were ignored.
    pub fn state_rejected(&self, why: Rejected) {
        self.state_rejected
            .get_or_create(&StateRejected {
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn token_request(&self, tenant: &TenantName, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        let tenant = tenant.clone();
        self.token_requests
            .get_or_create(&TokenResult { result, tenant })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_every_contract_metric() {
        let m = Metrics::new();
        let tenant = TenantName::default_profile();
        m.register_tenant(&tenant);
        m.graph_call(&tenant, GraphOperation::Unassign, "204".into(), 0.01);
        m.graph_call(&tenant, GraphOperation::List, "timeout".into(), 30.0);
        m.job_finished(&tenant, false, 1.0);
        m.set_amqp_node(&["a:5701".into(), "b:5702".into()], Some(1));
        let text = m.render();
        for name in [
            "unassign_jobs_total{outcome=\"succeeded\",tenant=\"default\"}",
            "unassign_dead_letters_total{kind=\"device_not_found\",tenant=\"default\"}",
            "unassign_graph_requests_total{operation=\"unassign\",status=\"204\",tenant=\"default\"}",
            "unassign_graph_requests_total{operation=\"list\",status=\"timeout\",tenant=\"default\"}",
            "unassign_graph_request_duration_seconds_bucket{le=\"0.005\",operation=\"unassign\",tenant=\"default\"}",
            "unassign_graph_request_duration_seconds_count{operation=\"list\",tenant=\"default\"} 1",
            "unassign_job_duration_seconds_bucket{le=\"0.01\",tenant=\"default\"}",
            "unassign_retries_total{reason=\"throttled\",tenant=\"default\"}",
            "unassign_throttled{tenant=\"default\"} ",
            "unassign_rate_limit_per_second{tenant=\"default\"} ",
            "unassign_read_rate_limit_per_second{tenant=\"default\"} ",
            "unassign_tenant_paused{tenant=\"default\"} ",
            "unassign_inflight_jobs ",
            "unassign_amqp_connected ",
            "unassign_amqp_reconnects_total ",
            "unassign_amqp_channel_errors_total{reason=\"publish\"} 0",
            "unassign_amqp_channel_errors_total{reason=\"queue_poll\"} 0",
            "unassign_amqp_channel_errors_total{reason=\"consume\"} 0",
            "unassign_amqp_node{node=\"a:5701\"} 0",
            "unassign_amqp_node{node=\"b:5702\"} 1",
            "unassign_token_requests_total{result=\"ok\",tenant=\"default\"}",
            "unassign_build_info{version=",
            "unassign_queue_messages{queue=\"requests\"}",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
