//! The intake's own metrics, on `intake.metrics_listen`. Labels are HTTP status codes and
//! fixed reasons only.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::auth::Rejected;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    /// An HTTP status the server produced: a small fixed set.
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

pub struct IntakeMetrics {
    registry: Registry,
    requests: Family<Code, Counter>,
    duration: Histogram,
    published: Counter,
    duplicates: Counter,
    auth_failures: Family<Reason, Counter>,
    inflight: Gauge,
    connected: Gauge,
    reconnects: Counter,
    channel_reopens: Counter,
}

impl Default for IntakeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IntakeMetrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            // 1 ms … ~16 s: a confirm takes milliseconds; the publish timeout sits at the top.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            published: Counter::default(),
            duplicates: Counter::default(),
            auth_failures: Family::default(),
            inflight: Gauge::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            channel_reopens: Counter::default(),
        };
        for code in [202, 400, 401, 413, 503] {
            let _ = m.requests.get_or_create(&Code { code });
        }
        for why in Rejected::ALL {
            let _ = m.auth_failures.get_or_create(&Reason {
                reason: why.as_str(),
            });
        }
        let r = &mut m.registry;
        // prometheus-client appends `_total` to counters.
        r.register(
            "unassign_intake_requests",
            "Posts to /v1/* by HTTP status",
            m.requests.clone(),
        );
        r.register(
            "unassign_intake_request_duration_seconds",
            "Time from a post's arrival to its answer",
            m.duration.clone(),
        );
        r.register(
            "unassign_intake_messages_published",
            "Requests published to the request exchange and confirmed by the broker",
            m.published.clone(),
        );
        r.register(
            "unassign_intake_duplicates",
            "Requests not published again: their message-id was confirmed within the idempotency window",
            m.duplicates.clone(),
        );
        r.register(
            "unassign_intake_auth_failures",
            "Posts refused 401, by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "unassign_intake_inflight_posts",
            "Posts being answered (SIGTERM waits for them)",
            m.inflight.clone(),
        );
        r.register(
            "unassign_intake_amqp_connected",
            "1 while the intake holds a broker connection with a confirm channel",
            m.connected.clone(),
        );
        r.register(
            "unassign_intake_amqp_reconnects",
            "Broker connections made after the first",
            m.reconnects.clone(),
        );
        r.register(
            "unassign_intake_amqp_channel_reopens",
            "Confirm channels replaced on a live connection: the broker closed one or nacked a publish on it",
            m.channel_reopens.clone(),
        );
        crate::metrics::register_process(r);
        m
    }

    pub fn started(&self) {
        self.inflight.inc();
    }

    pub fn answered(&self, code: u16, seconds: f64) {
        self.inflight.dec();
        self.requests.get_or_create(&Code { code }).inc();
        self.duration.observe(seconds);
    }

    pub fn published(&self, n: u64) {
        self.published.inc_by(n);
    }

    pub fn duplicates(&self, n: u64) {
        self.duplicates.inc_by(n);
    }

    pub fn auth_failed(&self, why: Rejected) {
        self.auth_failures
            .get_or_create(&Reason {
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    pub fn channel_reopened(&self) {
        self.channel_reopens.inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
