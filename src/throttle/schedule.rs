//! Holds and spacing, separate from waiting so they can be tested with a hand-made clock.

use std::time::Duration;

use tokio::time::Instant;

use super::grid::Grid;

/// How calls are spaced.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pace {
    /// No budget: each call goes when it comes.
    Free,
    /// One call per interval: a budget this replica spends alone.
    Every(Duration),
    /// This replica's turns on the grid it shares with the other replicas.
    Turns(Grid),
}

/// Slots are not reserved ahead: a budget that changes applies to the very next call.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    /// The hold as Graph told it (here or to another replica): what this replica reports and
    /// passes on, so that replicas relaying it to each other never lengthen it.
    held_until: Option<Instant>,
    last_sent: Option<Instant>,
}

impl Schedule {
    /// `Ok` if a call may go now (and records it), else the instant to ask again.
    pub fn try_admit(&mut self, now: Instant, pace: Pace) -> Result<(), Instant> {
        let due = self.due(now, pace);
        if due > now {
            return Err(due);
        }
        self.last_sent = Some(match pace {
            // A call a little late keeps the cadence (so the average stays on budget); after an
            // idle spell the cadence restarts now, with no burst of saved-up calls.
            Pace::Every(interval) if now - due < interval => due,
            // A turn is the grid's, however late the call that takes it.
            Pace::Turns(_) => due,
            _ => now,
        });
        Ok(())
    }

    /// When a call may go, if not now.
    pub fn next_due(&self, now: Instant, pace: Pace) -> Option<Instant> {
        Some(self.due(now, pace)).filter(|due| *due > now)
    }

    fn due(&self, now: Instant, pace: Pace) -> Instant {
        let latest = |times: &[Option<Instant>]| times.iter().flatten().max().copied();
        match pace {
            Pace::Free => latest(&[self.held_until]).unwrap_or(now),
            // Not before the hold ends, nor before the next turn at the budget. A hold shorter
            // than the turn it fell in lets no call through sooner, or a replica told to wait
            // often (by 429s it does not share) would overrun its budget by a call a hold: in
            // the model, three such replicas sent 4 % of their calls into 429s and drained at
            // 88 % of the limit instead of 97 %.
            Pace::Every(interval) => {
                let next = self.last_sent.map(|last| last + interval);
                latest(&[next, self.held_until]).unwrap_or(now)
            }
            // This replica's first turn after its last call and after the hold — but not one
            // long past: after an idle spell there is no burst of the turns it missed. After a
            // hold, replicas resume one after another, in the grid's order.
            Pace::Turns(grid) => {
                let spacing = grid.spacing(now);
                let recent = Some(now.checked_sub(spacing).unwrap_or(now));
                // Half a turn on: the next turn, however the rounding of the last fell.
                let after_last = self.last_sent.map(|last| last + spacing / 2);
                grid.next_turn(latest(&[after_last, self.held_until, recent]).unwrap_or(now))
            }
        }
    }

    /// Extends the hold to `until`; a shorter Retry-After never shortens one already in force.
    /// `false` when the hold in force already lasts as long or longer.
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

    use crate::throttle::curve::{Curve, Growth};

    const SECOND: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn unlimited_goes_at_once() {
        let now = Instant::now();
        let mut s = Schedule::default();
        for _ in 0..100 {
            assert_eq!(s.try_admit(now, Pace::Free), Ok(()));
        }
    }

    #[test]
    fn rate_spaces_calls_evenly() {
        let now = Instant::now();
        let mut s = Schedule::default();
        let quarter = Pace::Every(SECOND / 4);
        assert_eq!(s.try_admit(now, quarter), Ok(()));
        assert_eq!(s.try_admit(now, quarter), Err(now + SECOND / 4));
        // Slightly late keeps the cadence…
        let late = now + SECOND / 4 + Duration::from_millis(10);
        assert_eq!(s.try_admit(late, quarter), Ok(()));
        assert_eq!(s.try_admit(late, quarter), Err(now + SECOND / 2));
        // …a budget change applies to the next call at once…
        assert_eq!(s.try_admit(late, Pace::Every(SECOND / 100)), Ok(()));
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
        assert_eq!(s.try_admit(now, Pace::Free), Err(now + 2 * SECOND));
        assert!(
            s.held_until(now + 2 * SECOND - Duration::from_millis(1))
                .is_some()
        );
        assert_eq!(s.held_until(now + 2 * SECOND), None);
        assert_eq!(s.try_admit(now + 2 * SECOND, Pace::Free), Ok(()));
    }

    #[test]
    fn alone_a_hold_shorter_than_the_turn_lets_no_call_through_sooner() {
        let now = Instant::now();
        let mut s = Schedule::default();
        let tenth = Pace::Every(SECOND / 10);
        assert_eq!(s.try_admit(now, tenth), Ok(()));
        let until = now + SECOND / 50;
        assert!(s.hold(until));
        assert_eq!(s.try_admit(until, tenth), Err(now + SECOND / 10));
        let longer = now + SECOND / 5;
        assert!(s.hold(longer));
        assert_eq!(s.try_admit(now + SECOND / 10, tenth), Err(longer));
        assert_eq!(s.try_admit(longer, tenth), Ok(()));
    }

    /// Replica 1 of 3 on a steady 10/s grid from `start`: its turns are 0.1 s, 0.4 s, 0.7 s…
    /// past it.
    fn second_of_three(start: Instant) -> Pace {
        let curve = Curve::new(Growth {
            from: 10.0,
            plateau: 10.0,
            recover: 0.0,
            probe: 0.0,
            ceiling: 10.0,
        });
        Pace::Turns(Grid::new(start, curve, 3, 1))
    }

    #[test]
    fn on_the_grid_a_replica_takes_its_own_turns_only() {
        let start = Instant::now();
        let mut s = Schedule::default();
        let turns = second_of_three(start);
        assert_eq!(s.try_admit(start, turns), Err(start + MS * 100));
        // Called a little late, the call takes its turn's place, so the next turn is unmoved.
        assert_eq!(s.try_admit(start + MS * 103, turns), Ok(()));
        assert_eq!(s.try_admit(start + MS * 103, turns), Err(start + MS * 400));
        // After an idle spell: the turn just passed (within a slot), once, then the grid's.
        assert_eq!(s.try_admit(start + MS * 2_850, turns), Ok(()));
        assert_eq!(
            s.try_admit(start + MS * 2_850, turns),
            Err(start + MS * 3_100)
        );
        // A turn passed longer ago than a slot is not taken: the next one is.
        assert_eq!(
            s.try_admit(start + MS * 3_250, turns),
            Err(start + MS * 3_400)
        );
    }

    #[test]
    fn after_a_hold_a_replica_resumes_at_its_first_turn_past_it() {
        let start = Instant::now();
        let mut s = Schedule::default();
        let turns = second_of_three(start);
        let until = start + MS * 1_250;
        assert!(s.hold(until));
        assert_eq!(s.held_until(start), Some(until), "the hold as told");
        assert_eq!(
            s.try_admit(start + MS * 1_250, turns),
            Err(start + MS * 1_300)
        );
        assert_eq!(s.try_admit(start + MS * 1_300, turns), Ok(()));
    }
}
