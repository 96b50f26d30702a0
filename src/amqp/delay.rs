//! Durable retry waits. RabbitMQ expires messages only at a queue's head, so every delay gets a
//! queue of its own (`<queue>.delay.<n>s`, one TTL each) that dead-letters back to the request
//! exchange. A wait picks the longest tier that fits; the rest is waited on the next delivery,
//! so precision is that of the last, in-process wait. No plugin needed.

use std::time::Duration;

use crate::config::AmqpSettings;

/// The longest tier that fits in `wait`: its queue and its delay.
pub fn tier_for(settings: &AmqpSettings, wait: Duration) -> Option<(String, Duration)> {
    let secs = settings
        .delay_tiers_secs
        .iter()
        .rev()
        .find(|&&t| Duration::from_secs(t) <= wait)?;
    Some((settings.tier_queue(*secs), Duration::from_secs(*secs)))
}

/// The shortest tier of at least `wait`, else the longest: a wait that rounds up to a whole tier
/// is parked in one piece.
pub fn tier_at_least(settings: &AmqpSettings, wait: Duration) -> Duration {
    let tiers = &settings.delay_tiers_secs;
    let secs = tiers
        .iter()
        .find(|&&t| Duration::from_secs(t) >= wait)
        .or(tiers.last())
        .copied()
        .unwrap_or_default();
    Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AmqpSettings {
        let mut s = crate::config::Settings::load(None).unwrap().amqp;
        s.queue = "q".to_owned();
        s.delay_tiers_secs = vec![4, 8, 16].try_into().unwrap();
        s
    }

    #[test]
    fn picks_the_longest_tier_that_fits() {
        let s = settings();
        let tier = |ms| tier_for(&s, Duration::from_millis(ms)).map(|(q, _)| q);
        assert_eq!(tier(3_999), None);
        assert_eq!(tier(4_000).as_deref(), Some("q.delay.4s"));
        assert_eq!(tier(15_999).as_deref(), Some("q.delay.8s"));
        assert_eq!(
            tier(3_600_000).as_deref(),
            Some("q.delay.16s"),
            "long waits chain"
        );
    }

    #[test]
    fn rounds_up_to_a_whole_tier() {
        let s = settings();
        let at_least = |ms| tier_at_least(&s, Duration::from_millis(ms)).as_secs();
        assert_eq!(at_least(0), 4);
        assert_eq!(at_least(4_000), 4);
        assert_eq!(at_least(4_001), 8);
        assert_eq!(
            at_least(60_000),
            16,
            "the longest, when none is long enough"
        );
    }
}
