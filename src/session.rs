//! What jobs share: with every other job for the life of the worker ([`Context`]: the ports,
//! the tenants, the policy, the concurrency slots), and with the consume session that delivered
//! them ([`Session`]: its stop signal — shutdown, connection loss, every tenant paused).

use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::{
    contract::{Limits, StateKeys},
    graph::GraphClient,
    job::Policy,
    observe::Observe,
    ports::SystemClock,
    retry::PauseReason,
    tenant::Tenants,
};

/// What every job shares for the life of the worker.
pub struct Context<G = GraphClient, C = SystemClock> {
    pub graph: G,
    pub clock: C,
    /// The tenant profiles; a request naming a tenant none of them has is invalid.
    pub tenants: Arc<Tenants>,
    pub graph_slots: CallSlots,
    pub observe: Arc<dyn Observe>,
    pub policy: Policy,
    /// Tell the state a job carries in headers from a forgery.
    pub state_keys: Arc<StateKeys>,
    /// What a carried state is clamped to.
    pub state_limits: Limits,
}

/// Bounds Graph calls in flight (`worker.concurrency`).
pub struct CallSlots {
    semaphore: Semaphore,
    size: u32,
}

impl CallSlots {
    pub fn new(size: usize) -> Self {
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        let semaphore = Semaphore::new(size as usize);
        Self { semaphore, size }
    }

    pub(crate) async fn acquire(&self) -> Option<SemaphorePermit<'_>> {
        self.semaphore.acquire().await.ok()
    }

    /// Waits until no call is in flight. Jobs that stop must not leave while an answer is still
    /// on its way: a 429 in it would extend the tenant's hold that they carry away.
    pub(crate) async fn settled(&self) {
        let _all = self.semaphore.acquire_many(self.size).await;
    }
}

/// What a job needs from the consume session that delivered it.
#[derive(Default)]
pub struct Session {
    /// Cancelled on shutdown, pause or connection loss: stop waiting and hand the job back.
    pub stop: CancellationToken,
    pause: Mutex<Option<PauseReason>>,
}

impl Session {
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            stop,
            pause: Mutex::default(),
        }
    }

    /// Every tenant is paused: the session stops, and every job in it hands itself back.
    pub fn pause(&self, reason: PauseReason) {
        self.pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
        self.stop.cancel();
    }

    pub fn pause_reason(&self) -> Option<PauseReason> {
        *self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }
}
