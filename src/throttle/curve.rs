//! The budget after a 429, as a function of the time since: every replica that knows the same
//! congestion event computes the same budget at the same moment, and the same running count of
//! the calls it allows (its *phase*), without telling each other anything more.
//!
//! From the budget right after the decrease it recovers fast to just under the rate that was
//! throttled (the plateau), then probes beyond it slowly, up to the ceiling: at most three
//! straight pieces, each integrated exactly.

use tokio::time::Instant;

/// The curve's time: seconds from `at` to `now`, 0 if `now` is earlier.
pub(super) fn since(at: Instant, now: Instant) -> f64 {
    now.saturating_duration_since(at).as_secs_f64()
}

/// One straight piece: from `start` seconds after the event, the rate `rate` growing by `slope`
/// per second, the phase `phase` calls at its start.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Piece {
    start: f64,
    rate: f64,
    slope: f64,
    phase: f64,
}

impl Piece {
    fn rate_after(&self, tau: f64) -> f64 {
        self.rate + self.slope * tau
    }

    fn phase_after(&self, tau: f64) -> f64 {
        self.phase + self.rate * tau + self.slope * tau * tau / 2.0
    }

    /// The time into the piece at which the phase reaches `phase`.
    fn time_to(&self, phase: f64) -> f64 {
        let d = (phase - self.phase).max(0.0);
        // The root of rate·τ + slope·τ²/2 = d, in the form that does not cancel for a small slope.
        2.0 * d / (self.rate + (self.rate * self.rate + 2.0 * self.slope * d).sqrt())
    }
}

/// How a budget grows after a congestion event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Curve {
    pieces: [Piece; 3],
}

/// The shape of the growth: the rates in calls per second, the slopes in calls per second per
/// second. Every rate positive and finite (the budget's bounds see to it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Growth {
    /// The budget right after the decrease.
    pub from: f64,
    /// Where fast recovery ends…
    pub plateau: f64,
    /// …at this pace…
    pub recover: f64,
    /// …then probing at this one…
    pub probe: f64,
    /// …up to this.
    pub ceiling: f64,
}

impl Curve {
    pub fn new(g: Growth) -> Self {
        let from = g.from.min(g.ceiling);
        let plateau = g.plateau.clamp(from, g.ceiling);
        let mut pieces = [Piece {
            start: 0.0,
            rate: from,
            slope: 0.0,
            phase: 0.0,
        }; 3];
        // Each piece ends where the next begins; a piece with nothing to climb lasts no time.
        let mut push = |i: usize, to: f64, slope: f64| {
            let piece = pieces[i];
            let length = if to > piece.rate && slope > 0.0 {
                (to - piece.rate) / slope
            } else {
                0.0
            };
            pieces[i].slope = if length > 0.0 { slope } else { 0.0 };
            if i + 1 < pieces.len() {
                pieces[i + 1] = Piece {
                    start: piece.start + length,
                    rate: pieces[i].rate_after(length).min(to).max(piece.rate),
                    slope: 0.0,
                    phase: pieces[i].phase_after(length),
                };
            }
        };
        push(0, plateau, g.recover);
        push(1, g.ceiling, g.probe);
        Self { pieces }
    }

    fn piece_at(&self, tau: f64) -> &Piece {
        self.pieces
            .iter()
            .rev()
            .find(|p| p.start <= tau)
            .unwrap_or(&self.pieces[0])
    }

    /// The budget `tau` seconds after the event.
    pub fn rate_at(&self, tau: f64) -> f64 {
        let piece = self.piece_at(tau.max(0.0));
        piece.rate_after(tau.max(0.0) - piece.start)
    }

    /// The calls the budget allowed in the `tau` seconds after the event.
    pub fn phase_at(&self, tau: f64) -> f64 {
        let piece = self.piece_at(tau.max(0.0));
        piece.phase_after(tau.max(0.0) - piece.start)
    }

    /// When, in seconds after the event, the phase reaches `phase`.
    pub fn time_at(&self, phase: f64) -> f64 {
        let piece = self
            .pieces
            .iter()
            .rev()
            .find(|p| p.phase <= phase)
            .unwrap_or(&self.pieces[0]);
        piece.start + piece.time_to(phase)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn fifty() -> Curve {
        Curve::new(Growth {
            from: 45.0,
            plateau: 49.25,
            recover: 5.0,
            probe: 0.025,
            ceiling: 60.0,
        })
    }

    #[test]
    fn recovers_to_the_plateau_then_probes_to_the_ceiling() {
        let c = fifty();
        assert_eq!(c.rate_at(0.0), 45.0);
        assert!((c.rate_at(0.5) - 47.5).abs() < 1e-9);
        assert!((c.rate_at(0.85) - 49.25).abs() < 1e-9);
        assert!((c.rate_at(10.85) - 49.5).abs() < 1e-9);
        assert_eq!(c.rate_at(1e6), 60.0);
        // The calls of the first second: 45 to 49.25 over 0.85 s, then 49.25 for the rest.
        let first = 0.85 * (45.0 + 49.25) / 2.0 + 0.15 * 49.25 + 0.025 * 0.15 * 0.15 / 2.0;
        assert!((c.phase_at(1.0) - first).abs() < 1e-9);
    }

    #[test]
    fn a_budget_past_the_plateau_or_at_the_ceiling_stays_put_or_probes() {
        let flat = Curve::new(Growth {
            from: 70.0,
            plateau: 49.0,
            recover: 5.0,
            probe: 0.025,
            ceiling: 60.0,
        });
        assert_eq!(flat.rate_at(0.0), 60.0);
        assert_eq!(flat.rate_at(100.0), 60.0);
        assert!((flat.time_at(600.0) - 10.0).abs() < 1e-9);
    }

    proptest! {
        /// The phase only grows, and `time_at` finds where it reaches a value, whatever the shape.
        #[test]
        fn time_at_inverts_the_phase(
            from in 0.2f64..1e4,
            plateau in 0.2f64..1e4,
            recover in 0.0f64..1e3,
            probe in 0.0f64..10.0,
            ceiling in 0.2f64..1e4,
            tau in 0.0f64..1e5,
        ) {
            let c = Curve::new(Growth { from, plateau, recover, probe, ceiling });
            let phase = c.phase_at(tau);
            prop_assert!(phase.is_finite() && phase >= 0.0);
            prop_assert!(c.phase_at(tau + 0.001) >= phase);
            let back = c.time_at(phase);
            prop_assert!((back - tau).abs() <= 1e-6 * tau.max(1.0), "{back} vs {tau}");
            let rate = c.rate_at(tau);
            prop_assert!(rate >= from.min(ceiling) - 1e-9 && rate <= ceiling.max(from.min(ceiling)) + 1e-9);
        }
    }
}
