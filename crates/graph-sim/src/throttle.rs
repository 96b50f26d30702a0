//! Graph-style throttling (a sliding window that keeps counting throttled calls) and the
//! `Retry-After` header in each of its forms.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::RetryAfterMode;

/// Arrival times of the most recent calls of one tenant.
///
/// Only the last `limit` arrivals matter: a call is throttled exactly when the `limit`-th most
/// recent arrival is still inside the window, so older ones are dropped and memory stays bounded.
#[derive(Debug, Default)]
pub(super) struct Window(VecDeque<Instant>);

impl Window {
    /// Records a call arriving at `now` (throttled or not, like Graph) and, when it is over the
    /// limit, returns how long until the window would admit a call again.
    pub fn hit(&mut self, now: Instant, limit: usize, window: Duration) -> Option<Duration> {
        let len = self.0.len();
        let throttled = limit <= len && now.saturating_duration_since(self.0[len - limit]) < window;
        self.0.push_back(now);
        while self.0.len() > limit {
            self.0.pop_front();
        }
        throttled.then(|| window - now.saturating_duration_since(self.0[0]))
    }
}

/// A call this long after a client of the tenant was told to wait still counts as in flight.
const LATE_GRACE: Duration = Duration::from_millis(100);
/// Waits remembered per tenant (the latest); older ones have ended long before in any run.
const TOLD_KEPT: usize = 256;

/// The waits the simulator told a tenant's clients (Retry-After given, until when), to count the
/// calls that arrive more than [`LATE_GRACE`] after *any* client was told to wait and before that
/// wait ended: replicas that share their holds send none.
#[derive(Debug, Default)]
pub(super) struct Told(VecDeque<(SystemTime, SystemTime)>);

impl Told {
    pub fn tell(&mut self, at: SystemTime, until: SystemTime) {
        self.0.retain(|(_, end)| *end > at);
        if self.0.len() == TOLD_KEPT {
            self.0.pop_front();
        }
        self.0.push_back((at, until));
    }

    pub fn is_late(&self, now: SystemTime) -> bool {
        self.0
            .iter()
            .any(|&(told, until)| now >= told + LATE_GRACE && now < until)
    }
}

/// Writes a wait as a `Retry-After` value, always rounding up so a client that waits exactly the
/// advertised time is never early.
pub(super) fn format(mode: RetryAfterMode, wait: Duration, now: SystemTime) -> Option<String> {
    match mode {
        RetryAfterMode::Fractional => {
            let ms = wait.as_nanos().div_ceil(1_000_000);
            Some(format!("{}.{:03}", ms / 1000, ms % 1000))
        }
        RetryAfterMode::Integer => Some(wait.as_nanos().div_ceil(1_000_000_000).to_string()),
        RetryAfterMode::HttpDate => Some(httpdate::fmt_http_date(ceil_to_second(now + wait))),
        RetryAfterMode::Absent => None,
    }
}

/// The instant a `Retry-After` value denotes: delta-seconds (integer or fractional) or an HTTP-date.
pub(super) fn deadline(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs = value.parse::<f64>().ok().filter(|s| s.is_finite())?;
        return Duration::try_from_secs_f64(secs).ok().map(|d| now + d);
    }
    httpdate::parse_http_date(value).ok()
}

fn ceil_to_second(t: SystemTime) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_throttled_calls_and_reports_when_it_frees() {
        let t0 = Instant::now();
        let w = Duration::from_secs(20);
        let mut window = Window::default();
        assert_eq!(window.hit(t0, 2, w), None);
        assert_eq!(window.hit(t0 + Duration::from_secs(1), 2, w), None);
        // Third call: the oldest of the last two (t0+1 after recording) leaves at t0+21.
        let at = t0 + Duration::from_secs(5);
        assert_eq!(window.hit(at, 2, w), Some(Duration::from_secs(16)));
        // The throttled call counted: a call right after it waits until t0+25, not t0+21.
        let at = t0 + Duration::from_secs(6);
        assert_eq!(window.hit(at, 2, w), Some(Duration::from_secs(19)));
        assert_eq!(window.hit(t0 + Duration::from_secs(25), 2, w), None);
    }

    #[test]
    fn a_call_is_late_only_well_after_any_wait_was_told_and_before_it_ended() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let ms = Duration::from_millis;
        let mut told = Told::default();
        told.tell(t0, t0 + ms(500));
        assert!(
            !told.is_late(t0 + ms(50)),
            "in flight when the wait was told"
        );
        assert!(told.is_late(t0 + ms(100)));
        assert!(!told.is_late(t0 + ms(500)), "the wait is over");
        told.tell(t0 + ms(400), t0 + ms(450));
        assert!(
            told.is_late(t0 + ms(420)),
            "the earlier, longer wait still runs"
        );
        for i in 0..1000 {
            told.tell(t0 + ms(i), t0 + ms(2_000));
        }
        assert!(told.0.len() <= TOLD_KEPT);
    }

    #[test]
    fn formats_round_up() {
        let now = UNIX_EPOCH + Duration::from_millis(1_000_000_000_500);
        let wait = Duration::from_micros(2_127_100);
        assert_eq!(
            format(RetryAfterMode::Fractional, wait, now).as_deref(),
            Some("2.128")
        );
        assert_eq!(
            format(RetryAfterMode::Integer, wait, now).as_deref(),
            Some("3")
        );
        let date = format(RetryAfterMode::HttpDate, wait, now).unwrap();
        assert_eq!(date, "Sun, 09 Sep 2001 01:46:43 GMT");
        assert_eq!(format(RetryAfterMode::Absent, wait, now), None);
    }

    #[test]
    fn parses_every_form() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(deadline("3", now), Some(now + Duration::from_secs(3)));
        assert_eq!(
            deadline("2.5", now),
            Some(now + Duration::from_millis(2500))
        );
        assert_eq!(
            deadline("Sun, 09 Sep 2001 01:46:43 GMT", now),
            Some(UNIX_EPOCH + Duration::from_secs(1_000_000_003))
        );
        assert_eq!(deadline("soon", now), None);
        assert_eq!(deadline("-1", now), None);
    }
}
