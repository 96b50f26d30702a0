//! A token bucket per client (per credential): a runaway HR job or a leaked token cannot flood
//! the queue. Clients are bounded by the configured credentials, so the map is too.

use std::{collections::HashMap, sync::Mutex, time::Instant};

use super::auth::Client;

pub struct RateLimit {
    per_second: f64,
    buckets: Mutex<HashMap<Client, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// `per_second` posts, bursts up to one second's worth (at least one); 0 = unlimited.
    pub fn new(per_second: f64) -> Self {
        Self {
            per_second,
            buckets: Mutex::default(),
        }
    }

    /// Takes one post from `client`'s bucket: `Err(seconds to wait)` when it is empty.
    pub fn take(&self, client: Client, now: Instant) -> Result<(), u64> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let burst = self.per_second.max(1.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let limit = RateLimit::new(2.0);
        let (a, b) = (Client::test(1), Client::test(2));
        let t0 = Instant::now();
        assert!(limit.take(a, t0).is_ok());
        assert!(limit.take(a, t0).is_ok());
        assert_eq!(limit.take(a, t0), Err(1));
        assert!(limit.take(b, t0).is_ok(), "each client has its own bucket");
        assert!(limit.take(a, t0 + Duration::from_millis(500)).is_ok());
        assert!(RateLimit::new(0.0).take(a, t0).is_ok());
    }
}
