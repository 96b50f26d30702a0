//! Durable retry waits. RabbitMQ expires messages only at a queue's head, so every delay gets a
//! queue of its own (`<queue>.delay.<n>s`, one TTL each) that dead-letters back to the request
//! exchange. A wait picks the longest tier that fits (the planner decides: `job::Policy`); the
//! rest is waited on the next delivery,
//! so precision is that of the last, in-process wait. No plugin needed.

use crate::config::AmqpSettings;

/// The name of the delay queue of `secs`.
pub fn tier_queue(settings: &AmqpSettings, secs: u64) -> String {
    format!("{}.delay.{secs}s", settings.queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_tier_after_the_queue() {
        let mut s = crate::config::Settings::load(None).unwrap().amqp;
        s.queue = "q".to_owned();
        assert_eq!(tier_queue(&s, 16), "q.delay.16s");
    }
}
