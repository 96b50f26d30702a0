//! The adaptive budget: plain data driven by an injected clock.
//!
//! The rate is the tenant's *shared* budget — what all replicas serving the tenant may send
//! together — and each replica sends its share of it, the budget over the live replicas. Alone,
//! the share is the whole budget, which is the single-worker behaviour.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    curve::{Curve, Growth, since},
    history::{History, SPAN},
};

/// The budget never falls below this, so a tenant is always probed again.
pub(super) const FLOOR: f64 = 0.2;
/// How long a decrease takes to show in the tenant's usage: Graph counts in windows of a
/// second or more, so 429s for calls sent sooner are the same congestion event.
const SETTLE: Duration = Duration::from_secs(1);
/// Budget use is measured over at least this much recent time…
const UTILISATION_WINDOW: Duration = Duration::from_millis(250);
/// …and the budget grows only while at least this share of it is used.
const UTILISED: f64 = 0.75;
/// Growth per second before the first 429: from Intune's 5/s to a 50/s tenant in about a second.
const SLOW_START_PER_SEC: f64 = 8.0;
/// Multiplicative decrease on a 429.
const DECREASE: f64 = 0.9;
/// After a decrease, recover quickly to this fraction of the rate that was throttled…
const PLATEAU: f64 = 0.985;
/// …at this fraction of that rate per second…
const RECOVER_PER_SEC: f64 = 0.1;
/// …then probe above it slowly, so 429s stay rare: this fraction of that rate per second
/// (0.025/s at 50/s: from the plateau to the limit in half a minute, at any limit).
const PROBE_PER_SEC: f64 = 0.0005;
/// Replicas that cannot talk (the degraded mode) converge on sharing the limit by probing with
/// the same absolute step — Chiu and Jain's additive increase; a step proportional to each one's
/// own rate would keep their ratios. This fraction of the *reference* rate (the configured
/// ceiling, else Intune's documented budget) per second is that step's least.
const PROBE_FLOOR_PER_SEC: f64 = 0.004;
/// Growth in time is taken only as the calls take it: the budget runs ahead of the highest it
/// was in use at by at most this share of it…
const HEADROOM: f64 = 0.05;
/// …or by the growth of this long after the last moment it was in use, whichever is more (so
/// that calls held back by a Retry-After or a retry's backoff do not stall the recovery).
const GRACE: Duration = Duration::from_secs(1);
/// A peer's event older than this is taken as this old: its growth since is bounded by what the
/// budget was in use at anyway, and an `Instant` so far back may not exist.
pub(super) const MAX_EVENT_AGE: Duration = Duration::from_secs(3600);

/// A congestion event, as replicas tell each other: when a 429 decreased the budget, the budget
/// after it and the rate that was throttled. The budget from then on is a function of the time
/// since ([`Curve`]), so replicas that know the same event agree on the budget at every moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    pub at: Instant,
    pub rate: f64,
    pub throttled_at: f64,
}

/// Slow start (×8 a second) until the first 429, then decrease by [`DECREASE`] per congestion
/// event and grow back — fast to just under the rate that was throttled, slowly beyond it.
#[derive(Debug, Clone)]
pub struct Aimd {
    /// In slow start the budget; past it, the highest budget this replica's share was in use
    /// at since the last event, which bounds the budget (see [`HEADROOM`])…
    rate: f64,
    /// …and when it last was (see [`GRACE`]).
    in_use_at: Instant,
    ceiling: f64,
    /// Calls per second added per second while probing, at least.
    probe_floor: f64,
    /// Live replicas sharing the budget, this one included.
    replicas: u32,
    /// When this replica's calls of the last second went out: how much of its share is in use
    /// (calls in flight included), and the rate a 429 speaks for.
    sent: History,
    /// The last congestion event and the budget's growth since; `None` in slow start.
    event: Option<(Event, Curve)>,
    /// The last growth in slow start.
    last_growth: Instant,
}

impl Aimd {
    /// `reference` scales the probing step: the same for every replica of a tenant.
    pub fn new(initial: f64, ceiling: f64, reference: f64, now: Instant) -> Self {
        Self {
            rate: initial.min(ceiling).max(FLOOR),
            ceiling,
            probe_floor: PROBE_FLOOR_PER_SEC * reference,
            replicas: 1,
            sent: History::default(),
            event: None,
            in_use_at: now,
            last_growth: now,
        }
    }

    /// The tenant's shared budget.
    pub fn rate(&self, now: Instant) -> f64 {
        match &self.event {
            None => self.rate,
            Some((event, curve)) => curve.rate_at(since(event.at, now)).min(self.cap()),
        }
    }

    /// How far the budget may run ahead of its use (past slow start).
    fn cap(&self) -> f64 {
        let Some((event, curve)) = &self.event else {
            return self.rate;
        };
        let grace = since(event.at, self.in_use_at) + GRACE.as_secs_f64();
        (self.rate * (1.0 + HEADROOM)).max(curve.rate_at(grace))
    }

    /// Whether other replicas share the budget.
    pub fn shared(&self) -> bool {
        self.replicas > 1
    }

    /// Live replicas sharing the budget, this one included.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// This replica's share of it.
    pub fn share(&self, now: Instant) -> f64 {
        self.rate(now) / f64::from(self.replicas)
    }

    /// The last congestion event and the growth since, while the budget follows it: not in slow
    /// start, nor while this replica has not used enough of its share to take the growth.
    pub fn curve(&self, now: Instant) -> Option<(Instant, Curve)> {
        let (event, curve) = self.event.as_ref()?;
        let tau = since(event.at, now);
        (curve.rate_at(tau) <= self.cap()).then_some((event.at, *curve))
    }

    pub fn set_replicas(&mut self, replicas: u32) {
        self.replicas = replicas.max(1);
    }

    /// A call went out.
    pub fn sent(&mut self, now: Instant) {
        self.sent.record(now, f64::from(self.replicas));
    }

    /// A call went through. The budget grows only while this replica's share is in use — calls
    /// went out at three quarters of it or more over the last quarter second — so an idle or
    /// otherwise limited worker learns nothing about the tenant's ceiling (as TCP validates its
    /// window).
    pub fn succeeded(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.last_growth)
            .min(Duration::from_secs(1));
        self.last_growth = now;
        let share = self.share(now);
        // Long enough to expect a few calls, so one call does not look like a busy budget.
        let window = Duration::from_secs_f64(4.0 / share).clamp(UTILISATION_WINDOW, SPAN);
        let used = self.sent.count(now, window) as f64 / window.as_secs_f64();
        if used < UTILISED * share {
            return;
        }
        self.rate = match self.event {
            None => (self.rate * SLOW_START_PER_SEC.powf(dt.as_secs_f64())).min(self.ceiling),
            Some(_) => self.rate(now),
        };
        self.in_use_at = now;
    }

    /// A call sent at `sent_at` was answered 429; `true` if that decreased the budget. Calls
    /// sent before the last decrease — or so soon after it that a rate-limit window cannot show
    /// it yet — belong to the congestion event already counted, so they do not decrease it again.
    pub fn throttled(&mut self, sent_at: Instant, now: Instant) -> bool {
        if self
            .event
            .is_some_and(|(event, _)| sent_at <= event.at + SETTLE)
        {
            return false;
        }
        let event = self.congestion(sent_at, now);
        self.follow(event, now);
        true
    }

    /// The congestion event a 429 for the call sent at `sent_at` is, answered at `now`.
    fn congestion(&self, sent_at: Instant, now: Instant) -> Event {
        let (rate, slow_start) = (self.rate(now), self.event.is_none());
        // The limit the 429 speaks for is the rate the tenant was sent at before this call:
        // this replica's calls of the last second, each times the replicas sharing when it went
        // out (see `History`). The budget can be well past
        // it — growing exponentially in slow start when the first 429 comes back, or not
        // reached by a replica short of jobs or CPU — and then the budget would settle where
        // 429s repeat. Never above the budget (a 429 never raises it), and no lower than the
        // budget a second of slow start ago, which was in use and accepted: a 429 on the very
        // first calls (another client saturating the tenant) must not send it to the floor.
        // Past slow start the budget has been probed up slowly from a plateau just under the
        // last limit, so the limit is about where it stands: a measure thrown off by a hold in
        // the last second, or by shares not yet in step, takes it no lower than the plateau.
        let lowest = match slow_start {
            true => rate / SLOW_START_PER_SEC,
            false => rate * PLATEAU,
        };
        // In slow start the calls of the last second, as the tenant's window counted them (the
        // stream accelerates, so its latest gaps say little); past it the rate of the steady
        // stream, which a count would round to a whole call per second per replica.
        let measured = match slow_start {
            true => Some(self.sent.count_rate_before(sent_at)),
            false => self.sent.rate_before(sent_at),
        };
        let throttled_at = measured
            .filter(|sent| *sent > 0.0)
            .unwrap_or(rate)
            .clamp(lowest, rate);
        Event {
            at: now,
            rate: (throttled_at * DECREASE).max(FLOOR),
            throttled_at,
        }
    }

    /// What this budget has learned, once it has seen a 429.
    pub fn learned(&self) -> Option<Event> {
        self.event.map(|(event, _)| event)
    }

    /// What another replica learned: a 429 it was answered, or its last one. Replicas throttled
    /// in the same event (within [`SETTLE`] of each other) each measure it their own way and
    /// hear each other in any order, so they merge it the same way whatever the order — the
    /// earliest time, the lowest budget, the highest measure — and end on the same budget. The
    /// highest measure, because one too high costs one more 429 and decrease, one too low is
    /// probed back only slowly. A later event replaces this one, an earlier one changes nothing.
    /// The budget of slow start is no knowledge of the tenant, but the calls it sent are: a
    /// replica in slow start merges what they measure, as if it had been answered 429 itself —
    /// or a replica that had only just started, measuring its own few calls a second, would set
    /// the budget of replicas that were sending far more (in the model, six at 20/s fell to 72 %
    /// of the limit when they started 0.3 s apart).
    pub fn peer_learned(&mut self, peer: Event, now: Instant) {
        let peer = self.clamped(peer, now);
        let own = match self.event {
            Some((own, _)) => Some(own),
            // Its calls of the last second were part of the overload the peer was just told of.
            None if now <= peer.at + SETTLE && self.sent.count(now, SPAN) > 0 => {
                Some(self.congestion(now, now))
            }
            None => None,
        };
        let merged = match own {
            Some(own) if peer.at + SETTLE < own.at => return,
            Some(own) if peer.at <= own.at + SETTLE => Event {
                at: own.at.min(peer.at),
                rate: own.rate.min(peer.rate),
                throttled_at: own.throttled_at.max(peer.throttled_at),
            },
            _ => peer,
        };
        if self.event.is_none_or(|(own, _)| own != merged) {
            self.follow(merged, now);
        }
    }

    /// From now on the budget follows `event`'s curve. The budget it stands at now is taken as
    /// in use up to the rate that was throttled, since the tenant was sent at that: a replica
    /// that hears of an event long past takes the growth since only as its calls take it.
    fn follow(&mut self, event: Event, now: Instant) {
        let curve = Curve::new(Growth {
            from: event.rate,
            plateau: PLATEAU * event.throttled_at,
            recover: RECOVER_PER_SEC * event.throttled_at,
            probe: (PROBE_PER_SEC * event.throttled_at).max(self.probe_floor),
            ceiling: self.ceiling,
        });
        self.rate = curve.rate_at(since(event.at, now)).min(event.throttled_at);
        self.in_use_at = event.at;
        self.event = Some((event, curve));
    }

    /// A peer's figures within this budget's own bounds (they come over the network): rates
    /// within the floor and the ceiling, the time no later than now and no earlier than
    /// [`MAX_EVENT_AGE`] ago.
    fn clamped(&self, peer: Event, now: Instant) -> Event {
        let bound = |r: f64| {
            if r.is_finite() {
                r.clamp(FLOOR, self.ceiling)
            } else {
                self.rate(now)
            }
        };
        let oldest = now.checked_sub(MAX_EVENT_AGE).unwrap_or(now);
        Event {
            at: peer.at.clamp(oldest, now),
            rate: bound(peer.rate),
            throttled_at: bound(peer.throttled_at),
        }
    }
}

#[cfg(test)]
mod tests;
