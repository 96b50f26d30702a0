//! Metrics, `/readyz` and the job's log lines as an observer. Domain code reports what happened
//! ([`Happened`]) through [`Observe`]; this is the one place that turns it into the metrics of
//! CONTRACT section 7 ([`crate::metrics`] names them) and into readiness ([`Health`]).

use std::sync::Arc;

use crate::{
    config::TenantName,
    contract::Rejected,
    http::Health,
    job::{Call, Settlement},
    metrics::{GraphOperation, Metrics},
    retry::{Decision, PauseReason, Reply},
};

/// Something a job or a tenant went through.
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
