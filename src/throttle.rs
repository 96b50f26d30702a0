//! The tenant's gate: every Graph call to a tenant passes through it. It holds all calls back
//! while a `Retry-After` is pending (CONTRACT section 6, item 6) and spaces calls to the
//! configured proactive rate, so a burst of jobs does not trip Graph's throttling at all.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::metrics::Metrics;

/// The bookkeeping, separate from waiting so it can be tested with a hand-made clock.
#[derive(Debug)]
struct Schedule {
    held_until: Option<Instant>,
    next_slot: Instant,
    interval: Option<Duration>,
}

/// What [`Schedule::reserve`] tells a caller.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Go,
    /// A slot is reserved at this instant; check the hold again when it comes.
    SlotAt(Instant),
    /// The tenant is held back until then; no slot reserved.
    HeldUntil(Instant),
}

impl Schedule {
    fn reserve(&mut self, now: Instant) -> Admission {
        if let Some(until) = self.held_until.filter(|until| *until > now) {
            return Admission::HeldUntil(until);
        }
        let Some(interval) = self.interval else {
            return Admission::Go;
        };
        let slot = self.next_slot.max(now);
        self.next_slot = slot + interval;
        if slot <= now {
            Admission::Go
        } else {
            Admission::SlotAt(slot)
        }
    }

    /// Extends the hold; a shorter Retry-After never shortens one already in force.
    fn hold(&mut self, until: Instant) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    fn held_at(&self, now: Instant) -> bool {
        self.held_until.is_some_and(|until| until > now)
    }
}

/// One tenant's gate; clone the `Arc` to share it between jobs.
pub struct Gate {
    schedule: Mutex<Schedule>,
    metrics: Arc<Metrics>,
}

impl Gate {
    /// `max_per_second` of 0 means no proactive limit (Retry-After holds still apply).
    pub fn new(max_per_second: f64, metrics: Arc<Metrics>) -> Arc<Self> {
        let interval =
            (max_per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / max_per_second));
        metrics.set_rate_limit(max_per_second);
        Arc::new(Self {
            schedule: Mutex::new(Schedule {
                held_until: None,
                next_slot: Instant::now(),
                interval,
            }),
            metrics,
        })
    }

    /// Waits until a call may be sent now. Cancel-safe: dropping it at most wastes a slot.
    pub async fn admit(&self) {
        loop {
            let admission = self.lock().reserve(Instant::now());
            match admission {
                Admission::Go => return,
                Admission::HeldUntil(until) => tokio::time::sleep_until(until).await,
                Admission::SlotAt(slot) => {
                    tokio::time::sleep_until(slot).await;
                    // A Retry-After that arrived while we waited for our slot wins over it.
                    if !self.lock().held_at(Instant::now()) {
                        return;
                    }
                }
            }
        }
    }

    /// Holds every call to this tenant back for `duration` (Graph's Retry-After).
    pub fn hold(self: &Arc<Self>, duration: Duration) {
        let until = Instant::now() + duration;
        self.lock().hold(until);
        self.metrics.set_throttled(true);
        let gate = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            if !gate.lock().held_at(Instant::now()) {
                gate.metrics.set_throttled(false);
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        // The schedule is plain data updated atomically under the lock, so a poisoned lock
        // still holds a consistent value.
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(per_second: Option<u64>, now: Instant) -> Schedule {
        Schedule {
            held_until: None,
            next_slot: now,
            interval: per_second.map(|n| Duration::from_secs(1) / n as u32),
        }
    }

    #[test]
    fn unlimited_goes_at_once() {
        let now = Instant::now();
        let mut s = schedule(None, now);
        for _ in 0..100 {
            assert_eq!(s.reserve(now), Admission::Go);
        }
    }

    #[test]
    fn rate_spaces_calls_evenly() {
        let now = Instant::now();
        let mut s = schedule(Some(4), now);
        assert_eq!(s.reserve(now), Admission::Go);
        assert_eq!(
            s.reserve(now),
            Admission::SlotAt(now + Duration::from_millis(250))
        );
        assert_eq!(
            s.reserve(now),
            Admission::SlotAt(now + Duration::from_millis(500))
        );
        // After an idle second there is no burst credit: the next call goes, the one after waits.
        let later = now + Duration::from_secs(2);
        assert_eq!(s.reserve(later), Admission::Go);
        assert_eq!(
            s.reserve(later),
            Admission::SlotAt(later + Duration::from_millis(250))
        );
    }

    #[test]
    fn hold_blocks_everyone_and_only_grows() {
        let now = Instant::now();
        let mut s = schedule(None, now);
        s.hold(now + Duration::from_secs(2));
        s.hold(now + Duration::from_secs(1));
        assert_eq!(
            s.reserve(now),
            Admission::HeldUntil(now + Duration::from_secs(2))
        );
        assert!(s.held_at(now + Duration::from_millis(1999)));
        assert!(!s.held_at(now + Duration::from_secs(2)));
        assert_eq!(s.reserve(now + Duration::from_secs(2)), Admission::Go);
    }

    #[tokio::test(start_paused = true)]
    async fn admit_waits_out_a_hold_that_arrives_during_a_slot_wait() {
        let gate = Gate::new(1.0, Arc::new(Metrics::new()));
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
}
