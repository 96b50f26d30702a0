//! When this replica's recent calls went out: the rate it really sent at, which is what a 429
//! speaks for — not the budget, which a replica held back, starved of jobs or short of CPU
//! does not reach.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// Send times older than this are forgotten: the rate is measured over the last second.
pub(super) const SPAN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
pub(super) struct History {
    sent: VecDeque<Instant>,
    /// The first call recorded: a history younger than [`SPAN`] counts over its own age.
    first: Option<Instant>,
}

impl History {
    /// A call went out at `at` (calls are recorded in time order).
    pub fn record(&mut self, at: Instant) {
        self.first.get_or_insert(at);
        self.sent.push_back(at);
        while self.sent.front().is_some_and(|t| at - *t > SPAN) {
            self.sent.pop_front();
        }
    }

    /// Calls sent in the `window` before `now` (at most [`SPAN`]).
    pub fn count(&self, now: Instant, window: Duration) -> usize {
        // In time order: a binary search, not a walk, on the per-call path.
        self.sent.len()
            - self
                .sent
                .partition_point(|t| now.saturating_duration_since(*t) > window)
    }

    /// The calls sent in the [`SPAN`] before `before` per second: what a sliding window of
    /// that length held when the call sent at `before` arrived. `None` before any call.
    pub fn count_rate_before(&self, before: Instant) -> Option<f64> {
        let age = before.saturating_duration_since(self.first?).min(SPAN);
        (!age.is_zero()).then(|| self.before(before).len() as f64 / age.as_secs_f64())
    }

    /// The rate the calls before `before` went out at over the last [`SPAN`]: calls over the
    /// time they spanned, so that a steady stream measures exactly whatever the window's phase
    /// (a count over a fixed second is off by up to one call). `None` with fewer than two.
    pub fn rate_before(&self, before: Instant) -> Option<f64> {
        let calls = self.before(before);
        let (first, last) = (*calls.clone().next()?, *calls.clone().last()?);
        let span = (last - first).as_secs_f64();
        (calls.len() >= 2 && span > 0.0).then(|| (calls.len() - 1) as f64 / span)
    }

    fn before(&self, before: Instant) -> std::collections::vec_deque::Iter<'_, Instant> {
        let end = self.sent.partition_point(|t| *t < before);
        let start = self
            .sent
            .partition_point(|t| before.saturating_duration_since(*t) > SPAN);
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
            h.record(start + gap * i);
        }
        let end = start + gap * 10;
        assert_eq!(h.count(end, SPAN), 3);
        assert_eq!(h.count_rate_before(end), Some(3.0));
        let mut young = History::default();
        young.record(start);
        let soon = start + gap / 2;
        let rate = young.count_rate_before(soon).unwrap();
        assert!((rate - 1.0 / 0.15).abs() < 1e-9, "over its own age: {rate}");
        let rate = h.rate_before(end).unwrap();
        assert!((rate - 1.0 / 0.3).abs() < 1e-9, "{rate}");
        assert_eq!(h.rate_before(start), None, "nothing before it");
    }
}
