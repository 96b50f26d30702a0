//! The gates' report and the replica control plane's metrics (docs/contract.md, Metrics).

use std::sync::{Arc, atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{Metrics, Tenant};
use crate::{
    config::TenantName,
    throttle::{self, Budget},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantBudget {
    tenant: TenantName,
    budget: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Why {
    reason: &'static str,
}

/// Why a control message was dropped (`unassign_replica_messages_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRejected {
    /// No MAC, or one no state key verifies: not from a replica of this deployment.
    Signature,
    /// Verified but not a message this version understands.
    Malformed,
    /// Sent too long ago (or too far ahead) by the wall clock: a replay, or a clock far off.
    Stale,
}

impl ControlRejected {
    const ALL: [Self; 3] = [Self::Signature, Self::Malformed, Self::Stale];

    fn as_str(self) -> &'static str {
        match self {
            Self::Signature => "signature",
            Self::Malformed => "malformed",
            Self::Stale => "stale",
        }
    }
}

#[derive(Default)]
pub(super) struct ReplicaMetrics {
    shared_budget: Family<TenantBudget, Gauge<f64, AtomicU64>>,
    holds_received: Family<Tenant, Counter>,
    rejected: Family<Why, Counter>,
    live: Gauge,
    connected: Gauge,
}

impl ReplicaMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        for why in ControlRejected::ALL {
            let _ = self.rejected.get_or_create(&Why {
                reason: why.as_str(),
            });
        }
        self.live.set(1);
        r.register(
            "unassign_tenant_shared_budget_per_second",
            "The tenant's Graph budget shared by all live replicas, by budget (writes, reads)",
            self.shared_budget.clone(),
        );
        r.register(
            "unassign_replica_holds_received",
            "Retry-After holds on the tenant received from other replicas",
            self.holds_received.clone(),
        );
        r.register(
            "unassign_replica_messages_rejected",
            "Control messages dropped, by reason",
            self.rejected.clone(),
        );
        r.register(
            "unassign_replicas_live",
            "Replicas of the worker seen alive on the control exchange, this one included",
            self.live.clone(),
        );
        r.register(
            "unassign_replica_control_connected",
            "1 while this replica's control-plane connection is up",
            self.connected.clone(),
        );
    }
}

impl Metrics {
    /// Where the gates of `tenant` report: their budgets and its hold.
    pub fn gate_observer(self: &Arc<Self>, tenant: &TenantName) -> Arc<dyn throttle::Observer> {
        let _ = self.replicas.holds_received.get_or_create(&Tenant {
            tenant: tenant.clone(),
        });
        Arc::new(GateMetrics {
            metrics: Arc::clone(self),
            tenant: tenant.clone(),
        })
    }

    pub fn replica_hold_received(&self, tenant: &TenantName) {
        let tenant = tenant.clone();
        self.replicas
            .holds_received
            .get_or_create(&Tenant { tenant })
            .inc();
    }

    pub fn replica_message_rejected(&self, why: ControlRejected) {
        self.replicas
            .rejected
            .get_or_create(&Why {
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn set_replicas_live(&self, live: u32) {
        self.replicas.live.set(live.into());
    }

    pub fn set_control_connected(&self, connected: bool) {
        self.replicas.connected.set(connected.into());
    }
}

struct GateMetrics {
    metrics: Arc<Metrics>,
    tenant: TenantName,
}

impl throttle::Observer for GateMetrics {
    fn budget(&self, budget: Budget, shared: f64, share: f64) {
        // The existing per-tenant gauges keep meaning what this replica sends.
        let gauges = match budget {
            Budget::Writes => &self.metrics.rate_limit,
            Budget::Reads => &self.metrics.read_rate_limit,
        };
        let tenant = self.tenant.clone();
        gauges.get_or_create(&Tenant { tenant }).set(share);
        self.metrics
            .replicas
            .shared_budget
            .get_or_create(&TenantBudget {
                tenant: self.tenant.clone(),
                budget: budget.as_str(),
            })
            .set(shared);
    }

    fn held(&self, held: bool) {
        let tenant = self.tenant.clone();
        self.metrics
            .throttled
            .get_or_create(&Tenant { tenant })
            .set(held.into());
    }
}
