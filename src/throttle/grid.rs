//! Turns on one grid for the replicas sharing a budget.
//!
//! Replicas that each space their own calls at their share send at the budget together, but each
//! in a phase of its own: now and then their calls bunch, and Graph's one-second window counts
//! more calls than the budget. Six replicas at 20/s were answered 429 at 19.4/s, and each 429
//! cost a tenth of the budget. On the grid they take turns instead. Replicas that know the same
//! congestion event agree on the budget at every moment since ([`Curve`]), so on the calls it
//! allowed since: call `k` is due when that count reaches `k`, and it is the turn of the replica
//! ranked `k % n` of `n`. The tenant sees one evenly spaced stream, as from one worker.

use std::time::Duration;

use tokio::time::Instant;

use super::curve::{Curve, since};

/// One replica's turns.
#[derive(Debug, Clone, Copy)]
pub(super) struct Grid {
    /// The congestion event the curve counts from.
    origin: Instant,
    curve: Curve,
    replicas: u64,
    rank: u64,
}

impl Grid {
    pub fn new(origin: Instant, curve: Curve, replicas: u32, rank: u32) -> Self {
        let replicas = replicas.max(1);
        Self {
            origin,
            curve,
            replicas: replicas.into(),
            rank: u64::from(rank % replicas),
        }
    }

    /// The time between two turns (any replica's) at `t`.
    pub fn spacing(&self, t: Instant) -> Duration {
        let rate = self.curve.rate_at(since(self.origin, t));
        Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX)
    }

    /// This replica's first turn at or after `t` (`t` itself for one a hair before it).
    pub fn next_turn(&self, t: Instant) -> Instant {
        // A turn a hair before `t` by rounding is still at `t`.
        let first = (self.curve.phase_at(since(self.origin, t)) - 1e-6)
            .ceil()
            .max(0.0);
        // Saturating: a count past 2^64 calls is centuries away at any budget.
        let first = first as u64;
        let (n, rank) = (self.replicas, self.rank);
        let turn = first.saturating_add((rank + n - first % n) % n);
        let at = Duration::try_from_secs_f64(self.curve.time_at(turn as f64));
        // Past what an `Instant` holds only for a budget no bounds allow.
        at.ok()
            .and_then(|at| self.origin.checked_add(at))
            .map_or(t, |at| at.max(t))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::throttle::curve::Growth;

    const MS: Duration = Duration::from_millis(1);

    fn curve(from: f64, recover: f64) -> Curve {
        Curve::new(Growth {
            from,
            plateau: 19.7,
            recover,
            probe: 0.02,
            ceiling: 100.0,
        })
    }

    /// Every turn of `n` replicas on `curve` from `origin` in the first `secs` seconds.
    fn turns(origin: Instant, curve: Curve, n: u32, secs: u64) -> Vec<Instant> {
        let mut all = Vec::new();
        for rank in 0..n {
            let grid = Grid::new(origin, curve, n, rank);
            let mut t = origin;
            loop {
                t = grid.next_turn(t);
                if t >= origin + Duration::from_secs(secs) {
                    break;
                }
                all.push(t);
                // The schedule asks again half a turn after the last.
                t += grid.spacing(t) / 2;
            }
        }
        all.sort();
        all
    }

    #[test]
    fn replicas_interleave_evenly_at_the_shared_budget() {
        let start = Instant::now();
        let flat = Curve::new(Growth {
            from: 20.0,
            plateau: 20.0,
            recover: 0.0,
            probe: 0.0,
            ceiling: 20.0,
        });
        let all = turns(start, flat, 3, 10);
        assert_eq!(all.len(), 200);
        for pair in all.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap.abs_diff(50 * MS) < Duration::from_micros(1), "{gap:?}");
        }
    }

    #[test]
    fn the_third_replica_takes_the_third_turn() {
        let start = Instant::now();
        let grid = Grid::new(start, curve(18.0, 2.0), 6, 2);
        let first = grid.next_turn(start);
        assert!((first - start).as_secs_f64() > 2.0 / 18.3);
        assert!((first - start).as_secs_f64() < 2.0 / 18.0);
        assert_eq!(
            grid.next_turn(first),
            first,
            "a turn is due at its own time"
        );
    }

    proptest! {
        /// However many replicas and however the budget grows, the replicas' turns together are
        /// one stream: no turn taken twice, none closer to the next than the budget allows.
        #[test]
        fn turns_never_bunch(n in 1u32..12, from in 1.0f64..19.0, recover in 0.0f64..5.0) {
            let start = Instant::now();
            let c = curve(from, recover);
            let all = turns(start, c, n, 5);
            for pair in all.windows(2) {
                let gap = (pair[1] - pair[0]).as_secs_f64();
                let rate = c.rate_at((pair[1] - start).as_secs_f64());
                prop_assert!(gap * rate > 0.999, "{gap} at {rate}");
            }
        }
    }
}
