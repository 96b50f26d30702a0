//! The tenant's gate: every Graph call to a tenant passes through it.
//!
//! - **Hold**: a `Retry-After` (429, or 503/504 naming one) holds back *every* call to the tenant
//!   until it has passed, not only the call that got it (CONTRACT section 6, item 6) — in every
//!   replica of the worker, once the control plane ([`crate::replicas`]) carries it to them.
//! - **Proactive limit**: calls are spaced at the current budget, never above
//!   `graph.max_requests_per_second`, so a burst of jobs does not trip Graph's throttling.
//! - **Adaptive rate**: the budget is learned from 429s — multiplicative decrease on a 429,
//!   growth while the budget is the bottleneck — so the worker runs at the tenant's real ceiling.
//!   The budget is the tenant's, shared by the live replicas: each sends its share, and a
//!   decrease in one is a decrease in all. A replica that hears from no other runs on the whole
//!   budget, and replicas that cannot talk still converge on sharing it through their own 429s.
//!
//! The module depends on nothing else in the crate: it reports through an [`Observer`] and tells
//! other replicas through a [`Link`], both supplied by its user.
//!
//! [`schedule`], [`grid`], [`curve`] and [`aimd`] are plain data driven by an injected clock; [`Gate`] adds
//! the waiting.

mod aimd;
mod curve;
mod gate;
mod grid;
mod history;
mod schedule;
#[cfg(test)]
mod tests;

use std::time::SystemTime;

pub use gate::{Gate, Ticket};

/// Start of the adaptive budget when no limit is configured: Intune's documented write limit
/// for one app (100 per 20 s per tenant).
pub const INTUNE_WRITES_PER_SECOND: f64 = 5.0;
/// The same for reads: what Intune's limit on any request (1,000 per 20 s per app per tenant)
/// leaves beside the writes.
pub const INTUNE_READS_PER_SECOND: f64 = 45.0;
/// Effectively unlimited, for an adaptive budget with no configured ceiling.
const NO_CEILING: f64 = 10_000.0;

/// Holds are capped at the longest Retry-After honoured, whoever heard it: this replica or another.
pub use crate::contract::MAX_RETRY_AFTER;

/// How the gate behaves (from `[graph]` settings, or the tenant profile's own).
#[derive(Debug, Clone, Copy)]
pub struct GateConfig {
    /// Ceiling in calls per second, for the tenant (all replicas together); 0 = none.
    pub max_per_second: f64,
    /// Shared holds and the adaptive budget. Off only for comparison benchmarks: then each call
    /// honours its own Retry-After and nothing else, as the Graph SDKs do.
    pub adaptive: bool,
    pub budget: Budget,
}

/// Which of the tenant's budgets a gate spends: Intune limits writes and reads apart, so a
/// lookup never spends the unassign budget, nor an unassign the lookups'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    Writes,
    Reads,
}

impl Budget {
    /// Intune's documented rate for one app, where an uncapped adaptive budget starts.
    fn documented(self) -> f64 {
        match self {
            Self::Writes => INTUNE_WRITES_PER_SECOND,
            Self::Reads => INTUNE_READS_PER_SECOND,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writes => "writes",
            Self::Reads => "reads",
        }
    }
}

/// Where a gate reports its state (the metrics, in the worker).
pub trait Observer: Send + Sync {
    /// The tenant's shared budget and this replica's share of it, in calls per second (0 = none).
    fn budget(&self, budget: Budget, shared: f64, share: f64);
    /// The tenant is held back by a Retry-After (`true`) or no longer (`false`).
    fn held(&self, held: bool);
}

/// What a budget has learned from its last 429, as replicas tell each other: when it was (wall
/// clock: it crosses machines), the shared budget after the decrease and the rate that was
/// throttled. Replicas that know the same event compute the same budget from then on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learned {
    pub at: SystemTime,
    pub rate: f64,
    pub throttled_at: f64,
}

/// How a gate tells the other replicas of the worker. Called on the call path: it must not block.
pub trait Link: Send + Sync {
    /// The tenant was told to wait until `until` (wall clock: it crosses machines).
    fn hold(&self, until: SystemTime);
    /// A 429 decreased the tenant's shared `budget` to what `learned` says.
    fn throttled(&self, budget: Budget, learned: Learned);
}
