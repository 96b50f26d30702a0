//! The tenant's gate: every Graph call to a tenant passes through it.
//!
//! - **Hold**: a `Retry-After` (429, or 503/504 naming one) holds back *every* call to the tenant
//!   until it has passed, not only the call that got it (CONTRACT section 6, item 6).
//! - **Proactive limit**: calls are spaced at the current budget, never above
//!   `graph.max_requests_per_second`, so a burst of jobs does not trip Graph's throttling.
//! - **Adaptive rate**: the budget is learned from 429s — multiplicative decrease on a 429,
//!   growth while the budget is the bottleneck — so the worker runs at the tenant's real ceiling,
//!   and replicas sharing a tenant converge on sharing it without talking to each other.
//!
//! [`Schedule`] and [`Aimd`] are plain data driven by an injected clock; [`Gate`] adds the waiting.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{config::TenantName, metrics::Metrics, retry::MAX_RETRY_AFTER};

/// Start of the adaptive budget when no limit is configured: Intune's documented write limit
/// for one app (100 per 20 s per tenant).
pub const INTUNE_WRITES_PER_SECOND: f64 = 5.0;
/// The same for reads: what Intune's limit on any request (1,000 per 20 s per app per tenant)
/// leaves beside the writes.
pub const INTUNE_READS_PER_SECOND: f64 = 45.0;
/// Effectively unlimited, for an adaptive budget with no configured ceiling.
const NO_CEILING: f64 = 10_000.0;
/// The budget never falls below this, so a tenant is always probed again.
const FLOOR: f64 = 0.2;
/// How long a decrease takes to show in the tenant's usage: Graph counts in windows of a
/// second or more, so 429s for calls sent sooner are the same congestion event.
const SETTLE: Duration = Duration::from_secs(1);
/// Budget use is measured over at least this much recent time…
const UTILISATION_WINDOW: Duration = Duration::from_millis(250);
/// …and the budget grows only while at least this share of it is used.
const UTILISED: f64 = 0.75;
/// Growth per second before the first 429: from Intune's 5/s to a 50/s tenant in under 2 s.
const SLOW_START_PER_SEC: f64 = 4.0;
/// Multiplicative decrease on a 429.
const DECREASE: f64 = 0.9;
/// After a decrease, recover quickly to this fraction of the rate that was throttled…
const PLATEAU: f64 = 0.97;
/// …at this fraction of that rate per second…
const RECOVER_PER_SEC: f64 = 0.1;
/// …then probe above it slowly, so 429s stay rare: this fraction of the *reference* rate (the
/// configured ceiling, else Intune's documented budget) per second. The same absolute step for
/// every replica of a tenant is what makes them converge on equal shares (Chiu and Jain's
/// additive increase); a step proportional to each one's own rate would keep their ratios.
const PROBE_PER_SEC: f64 = 0.05;

/// How the gate behaves (from `[graph]` settings, or the tenant profile's own).
#[derive(Debug, Clone, Copy)]
pub struct GateConfig {
    /// Ceiling in calls per second; 0 = none.
    pub max_per_second: f64,
    /// Shared holds and the adaptive budget. Off only for comparison benchmarks: then each call
    /// honours its own Retry-After and nothing else, as the Graph SDKs do.
    pub adaptive: bool,
    pub budget: Budget,
}

/// Which of the tenant's budgets a gate spends: Intune limits writes and reads apart, so a
/// lookup never spends the unassign budget, nor an unassign the lookups'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// The adaptive budget: slow start (×4 a second) until the first 429, then decrease by [`DECREASE`] per
/// congestion event and grow back — fast to just under the rate that was throttled, slowly
/// beyond it.
#[derive(Debug, Clone)]
pub struct Aimd {
    rate: f64,
    ceiling: f64,
    /// Calls per second added per second while probing.
    probe_step: f64,
    slow_start: bool,
    /// Successes of the last second: what the tenant demonstrably accepts, and how much of the
    /// budget is in use.
    recent: std::collections::VecDeque<Instant>,
    throttled_at: Option<f64>,
    last_decrease: Option<Instant>,
    last_growth: Instant,
}

impl Aimd {
    /// `reference` scales the probing step: the same for every replica of a tenant.
    pub fn new(initial: f64, ceiling: f64, reference: f64, now: Instant) -> Self {
        Self {
            rate: initial.min(ceiling).max(FLOOR),
            ceiling,
            probe_step: PROBE_PER_SEC * reference,
            slow_start: true,
            recent: std::collections::VecDeque::new(),
            throttled_at: None,
            last_decrease: None,
            last_growth: now,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// A call went through. The budget grows only while it is in use — calls went out at
    /// three quarters of it or more over the last quarter second — so an idle or otherwise
    /// limited worker learns nothing about the tenant's ceiling (as TCP validates its window).
    pub fn succeeded(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.last_growth)
            .min(Duration::from_secs(1));
        self.last_growth = now;
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now - *t > Duration::from_secs(1))
        {
            self.recent.pop_front();
        }
        // Long enough to expect a few calls, so one call does not look like a busy budget.
        let window = Duration::from_secs_f64(4.0 / self.rate)
            .clamp(UTILISATION_WINDOW, Duration::from_secs(1));
        // `recent` is in time order: a binary search, not a walk, on this per-call path.
        let in_window = self.recent.len() - self.recent.partition_point(|t| now - *t > window);
        let used = in_window as f64 / window.as_secs_f64();
        if used < UTILISED * self.rate {
            return;
        }
        let dt = dt.as_secs_f64();
        self.rate = match self.throttled_at {
            _ if self.slow_start => self.rate * SLOW_START_PER_SEC.powf(dt),
            // Capped at the plateau: after a long Retry-After hold, `dt` is a whole second of
            // no sending, which must not carry the budget past it in one step.
            Some(max) if self.rate < PLATEAU * max => {
                (self.rate + RECOVER_PER_SEC * max * dt).min(PLATEAU * max)
            }
            _ => self.rate + self.probe_step * dt,
        }
        .min(self.ceiling);
    }

    /// A call sent at `sent_at` was answered 429. Calls sent before the last decrease — or so soon
    /// after it that a rate-limit window cannot show it yet — belong to the congestion event
    /// already counted, so they do not decrease the budget again.
    pub fn throttled(&mut self, sent_at: Instant, now: Instant) {
        if self.last_decrease.is_some_and(|t| sent_at <= t + SETTLE) {
            return;
        }
        // Growing exponentially, the budget is well past the tenant's limit by the time the
        // first 429 comes back; the calls accepted in the last second are the better estimate.
        let throttled_at = match self.slow_start {
            // No lower than the budget a second ago, which was in use and accepted: a 429 on
            // the very first calls (another client saturating the tenant) must not send the
            // budget to the floor.
            true => (self.recent.len() as f64).clamp(self.rate / SLOW_START_PER_SEC, self.rate),
            false => self.rate,
        };
        self.throttled_at = Some(throttled_at);
        self.rate = (throttled_at * DECREASE).max(FLOOR);
        self.slow_start = false;
        self.last_decrease = Some(now);
    }
}

/// Holds and spacing, separate from waiting so it can be tested with a hand-made clock.
/// Slots are not reserved ahead: a budget that changes applies to the very next call.
#[derive(Debug)]
struct Schedule {
    held_until: Option<Instant>,
    last_sent: Option<Instant>,
}

impl Schedule {
    /// `Ok` if a call may go now (and records it), else the instant to ask again.
    fn try_admit(&mut self, now: Instant, interval: Option<Duration>) -> Result<(), Instant> {
        if let Some(at) = self.next_due(now, interval) {
            return Err(at);
        }
        let due = self.due(now, interval);
        // A call a little late keeps the cadence (so the average stays on budget); after an
        // idle spell the cadence restarts now, with no burst of saved-up calls.
        let late = interval.is_some_and(|i| now - due < i);
        self.last_sent = Some(if late { due } else { now });
        Ok(())
    }

    /// When a call may go, if not now: the end of the hold, or the next turn at the budget.
    fn next_due(&self, now: Instant, interval: Option<Duration>) -> Option<Instant> {
        if let Some(until) = self.held_until(now) {
            return Some(until);
        }
        Some(self.due(now, interval)).filter(|due| *due > now)
    }

    fn due(&self, now: Instant, interval: Option<Duration>) -> Instant {
        match (interval, self.last_sent) {
            (Some(interval), Some(last)) => last + interval,
            _ => now,
        }
    }

    /// Extends the hold; a shorter Retry-After never shortens one already in force.
    fn hold(&mut self, until: Instant) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    fn held_until(&self, now: Instant) -> Option<Instant> {
        self.held_until.filter(|until| *until > now)
    }
}

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
}

impl State {
    fn interval(&self) -> Option<Duration> {
        match &self.aimd {
            Some(aimd) => Some(Duration::from_secs_f64(1.0 / aimd.rate())),
            None => self.fixed_interval,
        }
    }

    fn rate(&self) -> f64 {
        self.aimd.as_ref().map_or_else(
            || self.fixed_interval.map_or(0.0, |i| 1.0 / i.as_secs_f64()),
            Aimd::rate,
        )
    }
}

/// One tenant's gate; share it between jobs through the `Arc`.
pub struct Gate {
    state: Mutex<State>,
    adaptive: bool,
    budget: Budget,
    /// The tenant this gate guards, for its metrics.
    tenant: TenantName,
    metrics: Arc<Metrics>,
}

impl Gate {
    pub fn new(config: GateConfig, tenant: TenantName, metrics: Arc<Metrics>) -> Arc<Self> {
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
            schedule: Schedule {
                held_until: None,
                last_sent: None,
            },
            aimd,
            fixed_interval: ceiling.map(|c| Duration::from_secs_f64(1.0 / c)),
        };
        let gate = Self {
            state: Mutex::new(state),
            adaptive: config.adaptive,
            budget: config.budget,
            tenant,
            metrics,
        };
        gate.report_rate(gate.lock().rate());
        Arc::new(gate)
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
                let interval = state.interval();
                state.schedule.try_admit(Instant::now(), interval)
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
                let state = self.lock();
                state.schedule.next_due(Instant::now(), state.interval())
            };
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => return,
            }
        }
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
    /// an `Instant` can hold would panic.
    pub fn hold(self: &Arc<Self>, duration: Duration) {
        if !self.adaptive {
            return;
        }
        let until = Instant::now() + duration.min(MAX_RETRY_AFTER);
        self.lock().schedule.hold(until);
        // A hold is the tenant's, put on both gates: the write gate alone reports it.
        if self.budget == Budget::Reads {
            return;
        }
        self.metrics.set_throttled(&self.tenant, true);
        let gate = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            if gate.lock().schedule.held_until(Instant::now()).is_none() {
                gate.metrics.set_throttled(&gate.tenant, false);
            }
        });
    }

    /// The call of `ticket` was answered 429: the budget shrinks.
    pub fn throttled(&self, ticket: Ticket) {
        self.update(|aimd, now| {
            let before = aimd.rate();
            aimd.throttled(ticket.sent_at, now);
            tracing::debug!(before, after = aimd.rate(), "429: tenant budget");
        });
    }

    /// The call of `ticket` went through: the budget may grow.
    pub fn succeeded(&self) {
        self.update(|aimd, now| aimd.succeeded(now));
    }

    fn update(&self, f: impl FnOnce(&mut Aimd, Instant)) {
        let mut state = self.lock();
        if let Some(aimd) = state.aimd.as_mut() {
            f(aimd, Instant::now());
            self.report_rate(aimd.rate());
        }
    }

    fn report_rate(&self, rate: f64) {
        match self.budget {
            Budget::Writes => self.metrics.set_rate_limit(&self.tenant, rate),
            Budget::Reads => self.metrics.set_read_rate_limit(&self.tenant, rate),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data updated atomically under the lock, so a poisoned lock
        // still holds a consistent value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// A write gate of its own, with a cap (0 = none) and adaptive throttling on or off.
    fn write_gate(max_per_second: f64, adaptive: bool) -> Arc<Gate> {
        let config = GateConfig {
            max_per_second,
            adaptive,
            budget: Budget::Writes,
        };
        Gate::new(
            config,
            TenantName::default_profile(),
            Arc::new(Metrics::new()),
        )
    }

    fn schedule() -> Schedule {
        Schedule {
            held_until: None,
            last_sent: None,
        }
    }

    #[test]
    fn unlimited_goes_at_once() {
        let now = Instant::now();
        let mut s = schedule();
        for _ in 0..100 {
            assert_eq!(s.try_admit(now, None), Ok(()));
        }
    }

    #[test]
    fn rate_spaces_calls_evenly() {
        let now = Instant::now();
        let mut s = schedule();
        let quarter = Some(SECOND / 4);
        assert_eq!(s.try_admit(now, quarter), Ok(()));
        assert_eq!(s.try_admit(now, quarter), Err(now + SECOND / 4));
        // Slightly late keeps the cadence…
        let late = now + SECOND / 4 + Duration::from_millis(10);
        assert_eq!(s.try_admit(late, quarter), Ok(()));
        assert_eq!(s.try_admit(late, quarter), Err(now + SECOND / 2));
        // …a budget change applies to the next call at once…
        assert_eq!(s.try_admit(late, Some(SECOND / 100)), Ok(()));
        // …and after an idle spell there is no burst credit.
        let later = now + 5 * SECOND;
        assert_eq!(s.try_admit(later, quarter), Ok(()));
        assert_eq!(s.try_admit(later, quarter), Err(later + SECOND / 4));
    }

    #[test]
    fn hold_blocks_everyone_and_only_grows() {
        let now = Instant::now();
        let mut s = schedule();
        s.hold(now + 2 * SECOND);
        s.hold(now + SECOND);
        assert_eq!(s.try_admit(now, None), Err(now + 2 * SECOND));
        assert!(
            s.held_until(now + 2 * SECOND - Duration::from_millis(1))
                .is_some()
        );
        assert_eq!(s.held_until(now + 2 * SECOND), None);
        assert_eq!(s.try_admit(now + 2 * SECOND, None), Ok(()));
    }

    /// A budget past slow start, as after its first 429.
    fn avoiding(rate: f64, now: Instant) -> Aimd {
        Aimd {
            slow_start: false,
            ..Aimd::new(rate, 1000.0, 5.0, now)
        }
    }

    /// Feeds `aimd` one waited success every `1/rate` for `secs` seconds.
    fn run(aimd: &mut Aimd, now: &mut Instant, secs: f64) {
        let end = *now + Duration::from_secs_f64(secs);
        while *now < end {
            *now += Duration::from_secs_f64(1.0 / aimd.rate());
            aimd.succeeded(*now);
        }
    }

    #[test]
    fn slow_start_quadruples_each_second_up_to_the_ceiling() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(5.0, 60.0, 5.0, now);
        // Growth starts once a few calls show the budget in use, then quadruples each second.
        run(&mut aimd, &mut now, 1.0);
        let after_one = aimd.rate();
        assert!((10.0..=22.0).contains(&after_one), "{after_one}");
        run(&mut aimd, &mut now, 0.5);
        assert!(
            (1.7..=2.3).contains(&(aimd.rate() / after_one)),
            "{}",
            aimd.rate()
        );
        run(&mut aimd, &mut now, 5.0);
        assert_eq!(aimd.rate(), 60.0, "never above the configured ceiling");
    }

    #[test]
    fn leaving_slow_start_falls_back_to_what_the_tenant_accepted() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(5.0, 1000.0, 5.0, now);
        run(&mut aimd, &mut now, 3.0);
        let accepted = aimd.recent.len() as f64;
        assert!(
            aimd.rate() > 1.5 * accepted,
            "{} vs {accepted}",
            aimd.rate()
        );
        aimd.throttled(now, now);
        assert_eq!(aimd.rate(), accepted * DECREASE);
    }

    #[test]
    fn a_long_hold_does_not_jump_the_budget_past_the_plateau() {
        let mut now = Instant::now();
        let mut aimd = avoiding(50.0, now);
        aimd.throttled(now, now);
        now += 2 * SECOND;
        run(&mut aimd, &mut now, 0.1);
        assert!(aimd.rate() <= PLATEAU * 50.0, "{}", aimd.rate());
    }

    #[test]
    fn a_429_on_the_first_call_does_not_floor_the_budget() {
        let now = Instant::now();
        let mut aimd = Aimd::new(5.0, 5.0, 5.0, now);
        aimd.throttled(now, now);
        assert_eq!(aimd.rate(), 5.0 / SLOW_START_PER_SEC * DECREASE);
    }

    #[test]
    fn an_idle_worker_learns_nothing() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(5.0, 100.0, 5.0, now);
        for _ in 0..10 {
            now += SECOND;
            aimd.succeeded(now);
        }
        assert_eq!(
            aimd.rate(),
            5.0,
            "one call a second does not test a budget of five"
        );
    }

    #[test]
    fn one_decrease_per_congestion_event() {
        let now = Instant::now();
        let mut aimd = avoiding(50.0, now);
        let sent = now;
        let later = now + Duration::from_millis(5);
        aimd.throttled(sent, later);
        assert_eq!(aimd.rate(), 45.0);
        // Calls already in flight when the first 429 came back are the same event, and so are
        // calls sent before the decrease can show in the tenant's window.
        aimd.throttled(sent, later + Duration::from_millis(1));
        let soon = later + Duration::from_millis(2);
        aimd.throttled(soon, soon);
        assert_eq!(aimd.rate(), 45.0);
        // A call sent well after the decrease and still throttled is a new event.
        let mut t = later + SETTLE + Duration::from_millis(1);
        aimd.throttled(t, t);
        assert_eq!(aimd.rate(), 40.5);
        for _ in 0..100 {
            t += 2 * SETTLE;
            aimd.throttled(t, t);
        }
        assert_eq!(aimd.rate(), FLOOR, "never below the floor");
    }

    #[test]
    fn recovers_fast_to_the_plateau_then_probes_slowly() {
        let mut now = Instant::now();
        let mut aimd = avoiding(50.0, now);
        aimd.throttled(now, now);
        run(&mut aimd, &mut now, 1.0);
        assert!((48.5..49.0).contains(&aimd.rate()), "{}", aimd.rate());
        run(&mut aimd, &mut now, 4.0);
        assert!(
            aimd.rate() < 50.0,
            "slow beyond the plateau: {}",
            aimd.rate()
        );
    }

    /// Three replicas against one shared limit, each seeing the 429s of its own calls: the
    /// aggregate settles near the limit and no replica starves.
    #[test]
    fn replicas_converge_on_sharing_the_limit() {
        const LIMIT: f64 = 50.0;
        let start = Instant::now();
        let mut replicas: Vec<Aimd> = [5.0, 5.0, 30.0]
            .map(|r| Aimd::new(r, 1000.0, 5.0, start))
            .into();
        let step = Duration::from_millis(10);
        let mut now = start;
        let (mut sum_total, mut samples) = (0.0, 0);
        for tick in 0..12_000 {
            now += step;
            let total: f64 = replicas.iter().map(Aimd::rate).sum();
            let over = total > LIMIT;
            for r in &mut replicas {
                // Each call over the limit is a 429 for whoever sent it; all calls wait for slots.
                if over {
                    r.throttled(now - step, now);
                } else {
                    r.succeeded(now);
                }
            }
            if tick >= 6_000 {
                sum_total += replicas.iter().map(Aimd::rate).sum::<f64>();
                samples += 1;
            }
        }
        let mean = sum_total / samples as f64;
        assert!(
            mean > 0.9 * LIMIT && mean <= 1.02 * LIMIT,
            "aggregate {mean}"
        );
        for r in &replicas {
            assert!(r.rate() > 0.15 * LIMIT, "a replica starved: {}", r.rate());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn admit_waits_out_a_hold_that_arrives_during_a_slot_wait() {
        let gate = write_gate(1.0, true);
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
        let gate = write_gate(0.0, false);
        gate.hold(Duration::from_secs(5));
        assert_eq!(gate.held_for(), None);
        let start = Instant::now();
        gate.admit().await;
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_hold_is_capped_not_an_overflow() {
        let gate = write_gate(0.0, true);
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
}
