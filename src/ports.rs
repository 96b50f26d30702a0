//! The three I/O edges of a job, as small traits: Graph, settlement and the clock. The executor
//! ([`crate::executor`]) only talks to these; the real adapters are [`crate::graph::GraphClient`],
//! [`crate::settle::Delivered`] and [`SystemClock`], and the lifecycle tests run the whole
//! job against in-memory fakes under paused time.

use std::{future::Future, time::Duration};

use lapin::types::FieldTable;
use time::OffsetDateTime;

use crate::{
    contract::TraceContext,
    job::{Call, Settlement},
    retry::Reply,
    tenant::Tenant,
};

/// A delivery as the job sees it: owned, and no broker type but the headers' table.
#[derive(Debug, Clone, Default)]
pub struct Message {
    pub body: Vec<u8>,
    pub headers: FieldTable,
    pub message_id: Option<String>,
}

/// Microsoft Graph, for one tenant at a time.
pub trait Graph: Send + Sync {
    /// What a call is authorised with.
    type Token: Clone + Send + Sync;

    /// The tenant's token, fetched if need be; `Err` says why none could be had.
    fn token(&self, tenant: &Tenant) -> impl Future<Output = Result<Self::Token, String>> + Send;

    /// Graph refused `token` (401): the next [`Graph::token`] fetches a fresh one.
    fn invalidate(&self, tenant: &Tenant, token: &Self::Token);

    /// Sends `call` once. Never fails: a timeout or a refused connection is an answer too.
    fn call(&self, token: &Self::Token, call: &Call) -> impl Future<Output = Reply> + Send;
}

/// Why a settlement did not go through.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotSettled(pub String);

/// The broker, for one delivery: publish what the settlement calls for with confirms, then ack
/// — or give the delivery back.
pub trait Settle: Send + Sync {
    /// Publishes the outcome event (and its copy to `reply-to`, and the dead letter), or the
    /// handed-back request, and waits for every confirm. Safe to call again after an error:
    /// the event keeps its id.
    fn publish(
        &self,
        settlement: &Settlement,
        trace: Option<&TraceContext>,
    ) -> impl Future<Output = Result<(), NotSettled>> + Send;

    /// Acks the delivery; `false` when the ack could not reach the broker (which redelivers).
    fn ack(&self) -> impl Future<Output = bool> + Send;

    /// Gives the delivery back to the broker unsettled (nack with requeue).
    fn requeue(&self) -> impl Future<Output = ()> + Send;

    /// The delivery's channel is gone: nothing can be settled, the broker redelivers.
    fn channel_gone(&self) -> bool;
}

/// Time, and the one other input that differs between runs: the jitter of retry delays.
pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send;
    /// Uniform in [0, 1).
    fn jitter(&self) -> f64;
}

/// The wall clock, tokio's timers and a random jitter.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }

    fn jitter(&self) -> f64 {
        rand::random()
    }
}
