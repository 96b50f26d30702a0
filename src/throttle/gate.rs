//! [`Gate`]: the schedule and the budget behind a lock, with the waiting, and the hooks through
//! which replicas of the worker tell each other about holds and congestion.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{
    Budget, GateConfig, Learned, Link, MAX_RETRY_AFTER, NO_CEILING, Observer,
    aimd::{Aimd, Event, MAX_EVENT_AGE},
    grid::Grid,
    schedule::{Pace, Schedule},
};

/// A call's pass through the gate: when it went.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    sent_at: Instant,
}

struct State {
    schedule: Schedule,
    /// `None`: a fixed budget (the ceiling, or none at all).
    aimd: Option<Aimd>,
    fixed_interval: Option<Duration>,
    /// This replica's place among the live ones (0 alone, or first).
    rank: u32,
}

impl State {
    /// Alone, calls are spaced at the budget. Replicas sharing it take turns on one grid once
    /// they follow the same congestion event (see [`Grid`]); before the first 429, or while
    /// this replica does not use its share, each spaces its own.
    fn pace(&self, now: Instant) -> Pace {
        match &self.aimd {
            Some(aimd) => match aimd.curve(now) {
                Some((origin, curve)) if aimd.shared() => {
                    Pace::Turns(Grid::new(origin, curve, aimd.replicas(), self.rank))
                }
                _ => Pace::Every(Duration::from_secs_f64(1.0 / aimd.share(now))),
            },
            None => self.fixed_interval.map_or(Pace::Free, Pace::Every),
        }
    }

    /// The shared budget and this replica's share (the same without an adaptive budget).
    fn rates(&self, now: Instant) -> (f64, f64) {
        match &self.aimd {
            Some(aimd) => (aimd.rate(now), aimd.share(now)),
            None => {
                let rate = self.fixed_interval.map_or(0.0, |i| 1.0 / i.as_secs_f64());
                (rate, rate)
            }
        }
    }
}

/// One tenant's gate for one of its budgets; share it between jobs through the `Arc`.
pub struct Gate {
    state: Mutex<State>,
    adaptive: bool,
    budget: Budget,
    observer: Arc<dyn Observer>,
    /// The other replicas, once the control plane is up.
    link: OnceLock<Arc<dyn Link>>,
}

impl Gate {
    pub fn new(config: GateConfig, observer: Arc<dyn Observer>) -> Arc<Self> {
        let now = Instant::now();
        let ceiling = (config.max_per_second > 0.0).then_some(config.max_per_second);
        let aimd = config.adaptive.then(|| match ceiling {
            // A configured ceiling is where an operator says to start.
            Some(c) => Aimd::new(c, c, c, now),
            // Without one, start at Intune's documented budget and find the real one.
            None => Aimd::new(
                config.budget.documented(),
                NO_CEILING,
                config.budget.documented(),
                now,
            ),
        });
        let state = State {
            schedule: Schedule::default(),
            aimd,
            fixed_interval: ceiling.map(|c| Duration::from_secs_f64(1.0 / c)),
            rank: 0,
        };
        let gate = Self {
            state: Mutex::new(state),
            adaptive: config.adaptive,
            budget: config.budget,
            observer,
            link: OnceLock::new(),
        };
        gate.report(&gate.lock());
        Arc::new(gate)
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Connects the gate to the other replicas: its holds and decreases go out through `link`.
    /// The first link stays; a gate belongs to one control plane.
    pub fn link(&self, link: Arc<dyn Link>) {
        let _ = self.link.set(link);
    }

    /// Waits until a call may be sent now. Cancel-safe: dropping it at most wastes a slot.
    pub async fn admit(&self) -> Ticket {
        self.admit_with(|| async {}).await.1
    }

    /// Waits for the tenant's turn, then takes a concurrency slot from `slot` and the turn
    /// together. The wait for the turn holds no slot, so a tenant held back by a Retry-After or
    /// a low budget never keeps other tenants' calls from theirs. Cancel-safe like [`Gate::admit`].
    pub async fn admit_with<P, F>(&self, mut slot: impl FnMut() -> F) -> (P, Ticket)
    where
        F: std::future::Future<Output = P>,
    {
        loop {
            self.turn().await;
            let permit = slot().await;
            let admitted = {
                let mut state = self.lock();
                let now = Instant::now();
                let pace = state.pace(now);
                let admitted = state.schedule.try_admit(now, pace);
                if let (Ok(()), Some(aimd)) = (admitted, state.aimd.as_mut()) {
                    aimd.sent(now);
                }
                admitted
            };
            // Waiters wake together and one takes the turn; the others give their slot back
            // and wait for the next.
            if admitted.is_ok() {
                let ticket = Ticket {
                    sent_at: Instant::now(),
                };
                return (permit, ticket);
            }
        }
    }

    /// Resolves once a call may go (without taking the turn).
    async fn turn(&self) {
        loop {
            let due = {
                let (state, now) = (self.lock(), Instant::now());
                state.schedule.next_due(now, state.pace(now))
            };
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => return,
            }
        }
    }

    /// The shared budget and this replica's share now.
    #[cfg(test)]
    pub(crate) fn rates(&self) -> (f64, f64) {
        self.lock().rates(Instant::now())
    }

    /// How much longer the tenant is held back, if it is.
    pub fn held_for(&self) -> Option<Duration> {
        let now = Instant::now();
        self.lock()
            .schedule
            .held_until(now)
            .map(|until| until - now)
    }

    /// Holds every call to this tenant back for `duration` (Graph's Retry-After), at most
    /// [`MAX_RETRY_AFTER`]: a hold of years would stop the tenant for good, and one past what
    /// an `Instant` can hold would panic. The write gate tells the other replicas (a hold is
    /// the tenant's, put on both its gates here and there).
    pub fn hold(self: &Arc<Self>, duration: Duration) {
        let duration = duration.min(MAX_RETRY_AFTER);
        if self.hold_until(Instant::now() + duration)
            && self.budget == Budget::Writes
            && let Some(link) = self.link.get()
        {
            link.hold(SystemTime::now() + duration);
        }
    }

    /// Another replica was told to wait until `until`: this one waits too (extend-only).
    pub fn peer_hold(self: &Arc<Self>, until: Instant) {
        self.hold_until(until.min(Instant::now() + MAX_RETRY_AFTER));
    }

    /// `true` if the hold was extended.
    fn hold_until(self: &Arc<Self>, until: Instant) -> bool {
        if !self.adaptive {
            return false;
        }
        if !self.lock().schedule.hold(until) {
            return false;
        }
        // The write gate alone reports the tenant's hold.
        if self.budget == Budget::Writes {
            self.observer.held(true);
            let gate = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep_until(until).await;
                if gate.lock().schedule.held_until(Instant::now()).is_none() {
                    gate.observer.held(false);
                }
            });
        }
        true
    }

    /// The call of `ticket` was answered 429: the budget shrinks, and the other replicas' with it.
    pub fn throttled(&self, ticket: Ticket) {
        let learned = self.update(|aimd, now| {
            let before = aimd.rate(now);
            let decreased = aimd.throttled(ticket.sent_at, now);
            tracing::debug!(before, after = aimd.rate(now), "429: tenant budget");
            decreased.then(|| aimd.learned()).flatten()
        });
        if let (Some(event), Some(link)) = (learned.flatten(), self.link.get()) {
            link.throttled(self.budget, to_wall(event));
        }
    }

    /// The call of `ticket` went through: the budget may grow.
    pub fn succeeded(&self) {
        self.update(|aimd, now| aimd.succeeded(now));
    }

    /// What another replica learned: a 429 it was just answered, or its last one.
    pub fn peer_learned(&self, learned: Learned) {
        self.update(|aimd, now| aimd.peer_learned(from_wall(learned), now));
    }

    /// What this budget has learned, for the other replicas.
    pub fn learned(&self) -> Option<Learned> {
        self.lock()
            .aimd
            .as_ref()
            .and_then(Aimd::learned)
            .map(to_wall)
    }

    /// How many replicas (this one included) share the tenant's budget now, and this one's
    /// place among them (0 to `replicas - 1`, the same order in every replica).
    pub fn set_replicas(&self, replicas: u32, rank: u32) {
        self.update(|aimd, _| aimd.set_replicas(replicas));
        self.lock().rank = rank;
    }

    fn update<T>(&self, f: impl FnOnce(&mut Aimd, Instant) -> T) -> Option<T> {
        let mut state = self.lock();
        let out = f(state.aimd.as_mut()?, Instant::now());
        self.report(&state);
        Some(out)
    }

    fn report(&self, state: &State) {
        let (shared, share) = state.rates(Instant::now());
        self.observer.budget(self.budget, shared, share);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data updated atomically under the lock, so a poisoned lock
        // still holds a consistent value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An event as the other replicas hear it: its time on the wall clock, which crosses machines.
fn to_wall(event: Event) -> Learned {
    let ago = Instant::now().saturating_duration_since(event.at);
    let now = SystemTime::now();
    Learned {
        at: now.checked_sub(ago).unwrap_or(now),
        rate: event.rate,
        throttled_at: event.throttled_at,
    }
}

/// A peer's event on this process's clock: no later than now (the peer's clock may be ahead),
/// and no more than [`MAX_EVENT_AGE`] ago.
fn from_wall(learned: Learned) -> Event {
    let ago = SystemTime::now()
        .duration_since(learned.at)
        .unwrap_or_default()
        .min(MAX_EVENT_AGE);
    let now = Instant::now();
    Event {
        at: now.checked_sub(ago).unwrap_or(now),
        rate: learned.rate,
        throttled_at: learned.throttled_at,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts what a gate tells the other replicas.
    #[derive(Default)]
    struct Told {
        holds: AtomicUsize,
        decreases: AtomicUsize,
    }

    impl Link for Told {
        fn hold(&self, _: SystemTime) {
            self.holds.fetch_add(1, Ordering::Relaxed);
        }
        fn throttled(&self, _: Budget, _: Learned) {
            self.decreases.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Quiet;

    impl Observer for Quiet {
        fn budget(&self, _: Budget, _: f64, _: f64) {}
        fn held(&self, _: bool) {}
    }

    /// A gate of its own, with a cap (0 = none) and adaptive throttling on or off.
    fn gate(max_per_second: f64, adaptive: bool, budget: Budget) -> Arc<Gate> {
        let config = GateConfig {
            max_per_second,
            adaptive,
            budget,
        };
        Gate::new(config, Arc::new(Quiet))
    }

    #[tokio::test(start_paused = true)]
    async fn admit_waits_out_a_hold_that_arrives_during_a_slot_wait() {
        let gate = gate(1.0, true, Budget::Writes);
        let start = Instant::now();
        gate.admit().await;
        let waiter = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move { gate.admit().await })
        };
        tokio::task::yield_now().await;
        gate.hold(Duration::from_secs(5));
        waiter.await.unwrap();
        assert!(
            Instant::now() >= start + Duration::from_secs(5),
            "never before the Retry-After"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_adaptive_throttling_holds_are_per_call_only() {
        let gate = gate(0.0, false, Budget::Writes);
        gate.hold(Duration::from_secs(5));
        gate.peer_hold(Instant::now() + Duration::from_secs(5));
        assert_eq!(gate.held_for(), None);
        let start = Instant::now();
        gate.admit().await;
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_hold_is_capped_not_an_overflow() {
        let gate = gate(0.0, true, Budget::Writes);
        gate.hold(Duration::MAX);
        assert_eq!(gate.held_for(), Some(MAX_RETRY_AFTER));
        let start = Instant::now();
        gate.admit().await;
        assert_eq!(
            Instant::now(),
            start + MAX_RETRY_AFTER,
            "the tenant is not stopped for good"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_write_gate_tells_its_holds_and_decreases_once() {
        let told = Arc::new(Told::default());
        let writes = gate(0.0, true, Budget::Writes);
        let reads = gate(0.0, true, Budget::Reads);
        writes.link(told.clone());
        reads.link(told.clone());
        writes.hold(Duration::from_secs(2));
        writes.hold(Duration::from_secs(1));
        reads.hold(Duration::from_secs(3));
        assert_eq!(
            told.holds.load(Ordering::Relaxed),
            1,
            "extensions only, writes only"
        );
        let ticket = writes.admit().await;
        writes.throttled(ticket);
        writes.throttled(ticket);
        assert_eq!(
            told.decreases.load(Ordering::Relaxed),
            1,
            "one congestion event"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_hold_holds_without_echo_and_is_capped() {
        let told = Arc::new(Told::default());
        let gate = gate(0.0, true, Budget::Writes);
        gate.link(told.clone());
        gate.peer_hold(Instant::now() + 10 * MAX_RETRY_AFTER);
        assert_eq!(gate.held_for(), Some(MAX_RETRY_AFTER));
        assert_eq!(told.holds.load(Ordering::Relaxed), 0);
    }

    /// A budget of 10/s, steady since a congestion event long ago, shared by `replicas`.
    fn steady(gate: &Gate, replicas: u32, rank: u32) {
        let learned = Learned {
            at: SystemTime::now() - Duration::from_secs(100),
            rate: 10.0,
            throttled_at: 10.0,
        };
        gate.peer_learned(learned);
        gate.set_replicas(replicas, rank);
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_resume_at_their_turns_after_a_hold() {
        let start = Instant::now();
        let first = gate(10.0, true, Budget::Writes);
        let third = gate(10.0, true, Budget::Writes);
        steady(&first, 3, 0);
        steady(&third, 3, 2);
        first.hold(Duration::from_secs(1));
        third.peer_hold(start + Duration::from_secs(1));
        assert_eq!(first.held_for(), Some(Duration::from_secs(1)));
        assert_eq!(
            third.held_for(),
            Some(Duration::from_secs(1)),
            "the hold as told, to pass on unchanged"
        );
        let resumed = |gate: Arc<Gate>| async move {
            gate.admit().await;
            Instant::now() - start
        };
        let (first, third) = tokio::join!(resumed(first), resumed(third));
        // Turns every 0.1 s on one grid (its origin a few microseconds off, as the clocks are
        // read): each resumes at its own first turn after the hold, one or two turns apart.
        let gap = third.abs_diff(first);
        assert!(first >= Duration::from_secs(1) && third >= Duration::from_secs(1));
        assert!(
            first.max(third) <= Duration::from_millis(1301),
            "{first:?} {third:?}"
        );
        assert!(
            gap.abs_diff(Duration::from_millis(100)) < Duration::from_millis(2)
                || gap.abs_diff(Duration::from_millis(200)) < Duration::from_millis(2),
            "{first:?} {third:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_divide_the_spacing() {
        let gate = gate(10.0, true, Budget::Writes);
        steady(&gate, 2, 0);
        gate.admit().await;
        let first = Instant::now();
        gate.admit().await;
        let gap = Instant::now() - first;
        assert!(
            gap.abs_diff(Duration::from_millis(200)) < Duration::from_millis(2),
            "{gap:?}"
        );
    }
}
