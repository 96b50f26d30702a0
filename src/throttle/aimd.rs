//! The adaptive budget: plain data driven by an injected clock.
//!
//! The rate is the tenant's *shared* budget — what all replicas serving the tenant may send
//! together — and each replica sends its share of it, the budget over the live replicas. Alone,
//! the share is the whole budget, which is the single-worker behaviour.

use std::time::Duration;

use tokio::time::Instant;

use super::history::{History, SPAN};

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
/// …then probe above it slowly, so 429s stay rare: this fraction of the budget per second
/// (0.025/s at 50/s: from the plateau to the limit in half a minute, at any limit).
const PROBE_PER_SEC: f64 = 0.0005;
/// Replicas that cannot talk (the degraded mode) converge on sharing the limit by probing with
/// the same absolute step — Chiu and Jain's additive increase; a step proportional to each one's
/// own rate would keep their ratios. This fraction of the *reference* rate (the configured
/// ceiling, else Intune's documented budget) per second is that step's least.
const PROBE_FLOOR_PER_SEC: f64 = 0.004;

/// What a budget has learned from 429s, as replicas tell each other: the shared budget after
/// the last decrease and the rate that was throttled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learned {
    pub rate: f64,
    pub throttled_at: f64,
}

/// Slow start (×8 a second) until the first 429, then decrease by [`DECREASE`] per congestion
/// event and grow back — fast to just under the rate that was throttled, slowly beyond it.
#[derive(Debug, Clone)]
pub struct Aimd {
    rate: f64,
    ceiling: f64,
    /// Calls per second added per second while probing, at least.
    probe_floor: f64,
    slow_start: bool,
    /// Live replicas sharing the budget, this one included.
    replicas: u32,
    /// When this replica's calls of the last second went out: how much of its share is in use
    /// (calls in flight included), and the rate a 429 speaks for.
    sent: History,
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
            probe_floor: PROBE_FLOOR_PER_SEC * reference,
            slow_start: true,
            replicas: 1,
            sent: History::default(),
            throttled_at: None,
            last_decrease: None,
            last_growth: now,
        }
    }

    /// The tenant's shared budget.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// This replica's share of it.
    /// Whether other replicas share the budget.
    pub fn shared(&self) -> bool {
        self.replicas > 1
    }

    pub fn share(&self) -> f64 {
        self.rate / f64::from(self.replicas)
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
    /// window). Busy replicas grow the shared budget at the same pace, so they stay in step.
    pub fn succeeded(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.last_growth)
            .min(Duration::from_secs(1));
        self.last_growth = now;
        let share = self.share();
        // Long enough to expect a few calls, so one call does not look like a busy budget.
        let window = Duration::from_secs_f64(4.0 / share).clamp(UTILISATION_WINDOW, SPAN);
        let used = self.sent.count(now, window) as f64 / window.as_secs_f64();
        if used < UTILISED * share {
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
            _ => self.rate + (PROBE_PER_SEC * self.rate).max(self.probe_floor) * dt,
        }
        .min(self.ceiling);
    }

    /// A call sent at `sent_at` was answered 429; `true` if that decreased the budget. Calls
    /// sent before the last decrease — or so soon after it that a rate-limit window cannot show
    /// it yet — belong to the congestion event already counted, so they do not decrease it again.
    pub fn throttled(&mut self, sent_at: Instant, now: Instant) -> bool {
        if self.last_decrease.is_some_and(|t| sent_at <= t + SETTLE) {
            return false;
        }
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
        let lowest = match self.slow_start {
            true => self.rate / SLOW_START_PER_SEC,
            false => self.rate * PLATEAU,
        };
        // In slow start the calls of the last second, as the tenant's window counted them (the
        // stream accelerates, so its latest gaps say little); past it the rate of the steady
        // stream, which a count would round to a whole call per second per replica.
        let measured = match self.slow_start {
            true => Some(self.sent.count_rate_before(sent_at)),
            false => self.sent.rate_before(sent_at),
        };
        let throttled_at = measured
            .filter(|sent| *sent > 0.0)
            .unwrap_or(self.rate)
            .clamp(lowest, self.rate);
        self.throttled_at = Some(throttled_at);
        self.rate = (throttled_at * DECREASE).max(FLOOR);
        self.slow_start = false;
        self.last_decrease = Some(now);
        true
    }

    /// What this budget has learned, once it has seen a 429.
    pub fn learned(&self) -> Option<Learned> {
        let throttled_at = self.throttled_at.filter(|_| !self.slow_start)?;
        Some(Learned {
            rate: self.rate,
            throttled_at,
        })
    }

    /// Another replica's call to the tenant was answered 429 and it decreased the shared budget
    /// to `peer`'s: this one follows, never upwards, and counts the event as its own so its own
    /// 429s from the same overload do not decrease it again.
    pub fn peer_throttled(&mut self, peer: Learned, now: Instant) {
        let peer = self.clamped(peer);
        // Replicas throttled in the same event each measure it their own way, and hear each
        // other in any order: within one event the highest measure wins, whatever the order, so
        // every replica ends on the same plateau instead of on whichever it heard last. The
        // highest, because a measure too high costs one more 429 and decrease, one too low is
        // probed back only slowly.
        let same_event = self.last_decrease.is_some_and(|t| now <= t + SETTLE);
        self.throttled_at = Some(match self.throttled_at {
            Some(own) if same_event => own.max(peer.throttled_at),
            _ => peer.throttled_at,
        });
        // Never upwards — except from slow start, where the budget is no knowledge of the
        // tenant yet: a replica that joined late would otherwise keep its starting budget as
        // the tenant's and, throttled later, tell it to every other replica.
        self.rate = match self.slow_start {
            true => peer.rate,
            false => self.rate.min(peer.rate),
        };
        self.slow_start = false;
        self.last_decrease = Some(now);
    }

    /// A replica that has not seen a 429 yet takes what a peer has learned instead of finding
    /// the tenant's ceiling again by overshooting it.
    pub fn adopt(&mut self, peer: Learned) {
        if self.slow_start {
            let peer = self.clamped(peer);
            self.rate = peer.rate;
            self.throttled_at = Some(peer.throttled_at);
            self.slow_start = false;
        }
    }

    /// A peer's figures within this budget's own bounds (they come over the network).
    fn clamped(&self, peer: Learned) -> Learned {
        let bound = |r: f64| {
            if r.is_finite() {
                r.clamp(FLOOR, self.ceiling)
            } else {
                self.rate
            }
        };
        Learned {
            rate: bound(peer.rate),
            throttled_at: bound(peer.throttled_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// A budget past slow start, as after its first 429.
    fn avoiding(rate: f64, now: Instant) -> Aimd {
        Aimd {
            slow_start: false,
            ..Aimd::new(rate, 1000.0, 5.0, now)
        }
    }

    /// Feeds `aimd` one waited success every `1/share` for `secs` seconds.
    fn run(aimd: &mut Aimd, now: &mut Instant, secs: f64) {
        let end = *now + Duration::from_secs_f64(secs);
        while *now < end {
            *now += Duration::from_secs_f64(1.0 / aimd.share());
            aimd.sent(*now);
            aimd.succeeded(*now);
        }
    }

    #[test]
    fn slow_start_grows_eightfold_each_second_up_to_the_ceiling() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(5.0, 60.0, 5.0, now);
        // Growth starts once a few calls show the budget in use, then is ×8 each second.
        run(&mut aimd, &mut now, 1.0);
        let after_one = aimd.rate();
        assert!((10.0..=22.0).contains(&after_one), "{after_one}");
        run(&mut aimd, &mut now, 0.5);
        assert!(
            (2.4..=3.2).contains(&(aimd.rate() / after_one)),
            "{}",
            aimd.rate()
        );
        run(&mut aimd, &mut now, 5.0);
        assert_eq!(aimd.rate(), 60.0, "never above the configured ceiling");
    }

    #[test]
    fn leaving_slow_start_falls_back_to_the_rate_it_sent_at() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(5.0, 1000.0, 5.0, now);
        run(&mut aimd, &mut now, 2.0);
        let sent = aimd.sent.count_rate_before(now);
        assert!(aimd.rate() > 1.5 * sent, "{} vs {sent}", aimd.rate());
        assert!(aimd.throttled(now, now));
        assert_eq!(aimd.rate(), sent * DECREASE);
    }

    #[test]
    fn a_429_speaks_for_the_rate_sent_not_the_budget_unreached() {
        let mut now = Instant::now();
        let mut aimd = avoiding(50.0, now);
        // Short of CPU, the replica sends 49.5/s of its 50/s budget.
        let gap = Duration::from_micros(20_202);
        for _ in 0..60 {
            now += gap;
            aimd.sent(now);
        }
        now += gap;
        assert!(aimd.throttled(now, now));
        let sent = 1.0 / gap.as_secs_f64();
        assert!(
            (aimd.rate() - sent * DECREASE).abs() < 1e-6,
            "{}",
            aimd.rate()
        );
        // A measure far under the budget (a hold in the last second) takes it no lower than
        // the plateau.
        let mut aimd = avoiding(50.0, now);
        aimd.sent(now - SECOND / 2);
        aimd.sent(now);
        now += SECOND / 2;
        assert!(aimd.throttled(now, now));
        assert_eq!(aimd.rate(), 50.0 * PLATEAU * DECREASE);
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
        assert_eq!(
            aimd.rate(),
            5.0 * DECREASE,
            "nothing sent to measure: the budget itself"
        );
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
        assert!(aimd.throttled(sent, later));
        assert_eq!(aimd.rate(), 45.0);
        // Calls already in flight when the first 429 came back are the same event, and so are
        // calls sent before the decrease can show in the tenant's window.
        assert!(!aimd.throttled(sent, later + Duration::from_millis(1)));
        let soon = later + Duration::from_millis(2);
        assert!(!aimd.throttled(soon, soon));
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
        assert!((49.1..49.3).contains(&aimd.rate()), "{}", aimd.rate());
        run(&mut aimd, &mut now, 4.0);
        assert!(
            aimd.rate() < 50.0,
            "slow beyond the plateau: {}",
            aimd.rate()
        );
    }

    /// Three replicas against one shared limit, each seeing the 429s of its own calls and told
    /// nothing by the others (the degraded mode): the aggregate settles near the limit and no
    /// replica starves. Probing is slow, so sharing out evenly takes minutes, not seconds.
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
        for tick in 0..30_000 {
            now += step;
            let total: f64 = replicas.iter().map(Aimd::rate).sum();
            // The limit applies once the tenant's window has filled.
            let over = tick >= 100 && total > LIMIT;
            for r in &mut replicas {
                // Each call over the limit is a 429 for whoever sent it; all calls wait for slots.
                r.sent(now);
                if over {
                    r.throttled(now - step, now);
                } else {
                    r.succeeded(now);
                }
            }
            if tick >= 15_000 {
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

    /// Three replicas that tell each other: each sends a third of the shared budget, so the
    /// budget's use is judged on the share and it grows as one worker's would.
    #[test]
    fn a_replica_grows_the_shared_budget_on_its_share() {
        let mut now = Instant::now();
        let mut aimd = avoiding(30.0, now);
        aimd.set_replicas(3);
        assert_eq!(aimd.share(), 10.0);
        run(&mut aimd, &mut now, 2.0);
        assert!(aimd.rate() > 30.0, "its share in use: {}", aimd.rate());
        aimd.set_replicas(0);
        assert_eq!(aimd.share(), aimd.rate(), "never fewer than itself");
    }

    #[test]
    fn a_peer_decrease_is_followed_once_and_never_upwards() {
        let now = Instant::now();
        let mut aimd = avoiding(50.0, now);
        let peer = Learned {
            rate: 45.0,
            throttled_at: 50.0,
        };
        aimd.peer_throttled(peer, now);
        assert_eq!(aimd.learned(), Some(peer));
        // Its own 429s from the same overload are that event.
        assert!(!aimd.throttled(now, now + Duration::from_millis(5)));
        aimd.peer_throttled(
            Learned {
                rate: 900.0,
                throttled_at: 1000.0,
            },
            now,
        );
        assert_eq!(aimd.rate(), 45.0, "a congestion signal never raises it");
        aimd.peer_throttled(
            Learned {
                rate: f64::NAN,
                throttled_at: f64::INFINITY,
            },
            now,
        );
        assert_eq!(aimd.rate(), 45.0);
        aimd.peer_throttled(
            Learned {
                rate: -1.0,
                throttled_at: 0.0,
            },
            now,
        );
        assert_eq!(aimd.rate(), FLOOR, "bounded below");
    }

    #[test]
    fn a_starting_budget_takes_a_peer_decrease_as_the_tenants_budget() {
        let now = Instant::now();
        let mut fresh = Aimd::new(5.0, 1000.0, 5.0, now);
        let peer = Learned {
            rate: 45.0,
            throttled_at: 50.0,
        };
        fresh.peer_throttled(peer, now);
        assert_eq!(
            fresh.learned(),
            Some(peer),
            "not its own 5/s, which is no knowledge"
        );
    }

    #[test]
    fn only_a_starting_budget_adopts_what_a_peer_learned() {
        let now = Instant::now();
        let mut fresh = Aimd::new(5.0, 1000.0, 5.0, now);
        assert_eq!(fresh.learned(), None);
        let peer = Learned {
            rate: 48.0,
            throttled_at: 50.0,
        };
        fresh.adopt(peer);
        assert_eq!(fresh.learned(), Some(peer));
        fresh.adopt(Learned {
            rate: 10.0,
            throttled_at: 11.0,
        });
        assert_eq!(fresh.rate(), 48.0, "its own learning is not overwritten");
    }
}
