//! Holds and spacing, separate from waiting so they can be tested with a hand-made clock.

use std::time::Duration;

use tokio::time::Instant;

/// Slots are not reserved ahead: a budget that changes applies to the very next call.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    /// The hold as Graph told it (here or to another replica): what this replica reports and
    /// passes on, so that replicas relaying it to each other never lengthen it.
    held_until: Option<Instant>,
    /// While replicas share the budget, this replica's turn after the hold (its stagger past
    /// the end), where its cadence restarts; `None` alone, when the cadence keeps its grid.
    turn: Option<Duration>,
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

    /// When a call may go, if not now: this replica's turn after the hold, or the next turn at
    /// the budget.
    pub fn next_due(&self, now: Instant, interval: Option<Duration>) -> Option<Instant> {
        Some(self.due(now, interval)).filter(|due| *due > now)
    }

    fn due(&self, now: Instant, interval: Option<Duration>) -> Instant {
        let next = match (interval, self.last_sent) {
            (Some(interval), Some(last)) => Some(last + interval),
            _ => None,
        };
        let resume = self
            .held_until
            .map(|held| held + self.turn.unwrap_or_default());
        match (resume, next) {
            // The first call after a hold goes at this replica's turn. Replicas sharing the
            // budget start their cadence afresh there, so that resuming one turn apart they
            // interleave rather than bunch on the grids they had before it. Alone, the grid
            // stands: a hold shorter than the turn it fell in lets no call through sooner, or a
            // replica told to wait often (by 429s it does not share) would overrun its budget by
            // a call a hold — in the model, three such replicas sent 4 % of their calls into
            // 429s and drained at 88 % of the limit instead of 97 %.
            (Some(resume), next) if self.last_sent.is_none_or(|last| last < resume) => match next {
                Some(next) if self.turn.is_none() => next.max(resume),
                _ => resume,
            },
            (_, Some(next)) => next,
            _ => now,
        }
    }

    /// Extends the hold to `until`; a shorter Retry-After never shortens one already in force.
    /// `turn`: where this replica resumes after it when replicas share the budget (its stagger,
    /// the cadence restarting there), `None` alone. `false` when the hold in force already lasts
    /// as long or longer.
    pub fn hold(&mut self, until: Instant, turn: Option<Duration>) -> bool {
        let extends = self.held_until.is_none_or(|held| until > held);
        if extends {
            self.held_until = Some(until);
            self.turn = turn;
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
        assert!(s.hold(now + 2 * SECOND, None));
        assert!(
            !s.hold(now + SECOND, None),
            "a shorter hold changes nothing"
        );
        assert_eq!(s.try_admit(now, None), Err(now + 2 * SECOND));
        assert!(
            s.held_until(now + 2 * SECOND - Duration::from_millis(1))
                .is_some()
        );
        assert_eq!(s.held_until(now + 2 * SECOND), None);
        assert_eq!(s.try_admit(now + 2 * SECOND, None), Ok(()));
    }

    #[test]
    fn alone_a_hold_shorter_than_the_turn_lets_no_call_through_sooner() {
        let now = Instant::now();
        let mut s = Schedule::default();
        let tenth = Some(SECOND / 10);
        assert_eq!(s.try_admit(now, tenth), Ok(()));
        let until = now + SECOND / 50;
        assert!(s.hold(until, None));
        assert_eq!(s.try_admit(until, tenth), Err(now + SECOND / 10));
        let longer = now + SECOND / 5;
        assert!(s.hold(longer, None));
        assert_eq!(s.try_admit(now + SECOND / 10, tenth), Err(longer));
        assert_eq!(s.try_admit(longer, tenth), Ok(()));
    }

    #[test]
    fn after_a_hold_the_cadence_restarts_at_the_replicas_turn() {
        let now = Instant::now();
        let mut s = Schedule::default();
        let tenth = Some(SECOND / 10);
        assert_eq!(s.try_admit(now, tenth), Ok(()));
        let until = now + SECOND / 20;
        let turn = Duration::from_millis(30);
        assert!(s.hold(until, Some(turn)));
        assert_eq!(s.held_until(now), Some(until), "the hold as told");
        assert_eq!(s.try_admit(until, tenth), Err(until + turn));
        // Called a little late, the call takes the turn's place on the grid, not the old one's.
        let late = until + turn + Duration::from_millis(5);
        assert_eq!(s.try_admit(late, tenth), Ok(()));
        assert_eq!(s.try_admit(late, tenth), Err(until + turn + SECOND / 10));
    }
}
