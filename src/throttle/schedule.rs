//! Holds and spacing, separate from waiting so they can be tested with a hand-made clock.

use std::time::Duration;

use tokio::time::Instant;

/// Slots are not reserved ahead: a budget that changes applies to the very next call.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    held_until: Option<Instant>,
    last_sent: Option<Instant>,
}

impl Schedule {
    /// `Ok` if a call may go now (and records it), else the instant to ask again.
    pub fn try_admit(&mut self, now: Instant, interval: Option<Duration>) -> Result<(), Instant> {
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
    pub fn next_due(&self, now: Instant, interval: Option<Duration>) -> Option<Instant> {
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

    /// Extends the hold; a shorter Retry-After never shortens one already in force. `false`
    /// when the hold in force already lasts as long or longer.
    pub fn hold(&mut self, until: Instant) -> bool {
        let extends = self.held_until.is_none_or(|held| until > held);
        if extends {
            self.held_until = Some(until);
        }
        extends
    }

    pub fn held_until(&self, now: Instant) -> Option<Instant> {
        self.held_until.filter(|until| *until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn unlimited_goes_at_once() {
        let now = Instant::now();
        let mut s = Schedule::default();
        for _ in 0..100 {
            assert_eq!(s.try_admit(now, None), Ok(()));
        }
    }

    #[test]
    fn rate_spaces_calls_evenly() {
        let now = Instant::now();
        let mut s = Schedule::default();
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
        let mut s = Schedule::default();
        assert!(s.hold(now + 2 * SECOND));
        assert!(!s.hold(now + SECOND), "a shorter hold changes nothing");
        assert_eq!(s.try_admit(now, None), Err(now + 2 * SECOND));
        assert!(
            s.held_until(now + 2 * SECOND - Duration::from_millis(1))
                .is_some()
        );
        assert_eq!(s.held_until(now + 2 * SECOND), None);
        assert_eq!(s.try_admit(now + 2 * SECOND, None), Ok(()));
    }
}
