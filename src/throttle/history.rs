//! When this replica's recent calls went out: the rate the tenant was really sent at, which is
//! what a 429 speaks for — not the budget, which a replica held back, starved of jobs or short
//! of CPU does not reach. Each call stands for as many calls to the tenant as there were
//! replicas sharing the budget when it went out, so a replica that ran alone a moment ago and
//! shares now does not count its solo calls once per replica.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// Send times older than this are forgotten: the rate is measured over the last second.
pub(super) const SPAN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
pub(super) struct History {
    /// When each call went out, and the replicas sharing the budget then.
    sent: VecDeque<(Instant, f64)>,
}

impl History {
    /// A call went out at `at` while `replicas` shared the budget (calls are recorded in time
    /// order).
    pub fn record(&mut self, at: Instant, replicas: f64) {
        self.sent.push_back((at, replicas));
        while self.sent.front().is_some_and(|(t, _)| at - *t > SPAN) {
            self.sent.pop_front();
        }
    }

    /// Calls sent in the `window` before `now` (at most [`SPAN`]).
    pub fn count(&self, now: Instant, window: Duration) -> usize {
        // In time order: a binary search, not a walk, on the per-call path.
        self.sent.len()
            - self
                .sent
                .partition_point(|(t, _)| now.saturating_duration_since(*t) > window)
    }

    /// The tenant's calls in the [`SPAN`] before `before` per second: what a sliding window of
    /// that length held when the call sent at `before` arrived — over the whole span even when
    /// this replica started sending within it, as the window counts.
    pub fn count_rate_before(&self, before: Instant) -> f64 {
        let calls: f64 = self.before(before).map(|(_, replicas)| replicas).sum();
        calls / SPAN.as_secs_f64()
    }

    /// The rate the tenant was sent at before `before`, over the last [`SPAN`]: this replica's
    /// calls over the time they spanned — so that a steady stream measures exactly whatever the
    /// window's phase (a count over a fixed second is off by up to one call) — times the
    /// replicas of the later ones. `None` with fewer than two.
    pub fn rate_before(&self, before: Instant) -> Option<f64> {
        let calls = self.before(before);
        let (first, (last, replicas)) = (calls.clone().next()?.0, *calls.clone().last()?);
        let span = (last - first).as_secs_f64();
        (calls.len() >= 2 && span > 0.0).then(|| (calls.len() - 1) as f64 / span * replicas)
    }

    fn before(&self, before: Instant) -> std::collections::vec_deque::Iter<'_, (Instant, f64)> {
        let end = self.sent.partition_point(|(t, _)| *t < before);
        let start = self
            .sent
            .partition_point(|(t, _)| before.saturating_duration_since(*t) > SPAN);
        self.sent.range(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_steady_stream_whatever_the_phase() {
        let start = Instant::now();
        let mut h = History::default();
        let gap = Duration::from_millis(300);
        for i in 0..10 {
            h.record(start + gap * i, 1.0);
        }
        let end = start + gap * 10;
        assert_eq!(h.count(end, SPAN), 3);
        assert_eq!(h.count_rate_before(end), 3.0);
        let mut shared = History::default();
        shared.record(start, 1.0);
        shared.record(start + gap, 3.0);
        assert_eq!(
            shared.count_rate_before(start + 2 * gap),
            4.0,
            "a call alone counts once, one of three thrice"
        );
        let rate = h.rate_before(end).unwrap();
        assert!((rate - 1.0 / 0.3).abs() < 1e-9, "{rate}");
        assert_eq!(h.rate_before(start), None, "nothing before it");
    }
}
