//! What the worker's own publishes — hand-backs and dead letters — carry over from the request
//! (CONTRACT section 6, item 7). A producer's AMQP properties and headers are data, never
//! orders: copied wholesale, `CC`/`BCC` would route the worker's publish into other queues,
//! `user_id` would make the broker close the worker's channel, and `expiration` would let a dead
//! letter silently expire. So every publish is built from an allow-list.
//!
//! Kept, because consumers of events and dead letters and a later delivery need them:
//! `content-type`, `content-encoding`, `message-id`, `correlation-id`, `reply-to`, `timestamp`,
//! `type`, `app-id`, and the producer's application headers. Dropped: `expiration`, `user-id`,
//! `priority`, `cluster-id`, `delivery-mode` (the worker always publishes persistent), the
//! `CC` and `BCC` headers (RabbitMQ's sender-selected distribution, in any case), and every
//! header named `x-…` — RabbitMQ's and its plugins' namespace (`x-death`, `x-delivery-count`,
//! `x-delay`, `x-deduplication-header`, `x-received-from`, …) and the worker's own
//! `x-unassign-…`, which only the worker writes, afresh, on each publish.

use lapin::{
    BasicProperties,
    types::{FieldTable, ShortString},
};

/// Persistent: every message the worker publishes survives a broker restart.
const PERSISTENT: u8 = 2;

type Getter = fn(&BasicProperties) -> &Option<ShortString>;
type Setter = fn(BasicProperties, ShortString) -> BasicProperties;

/// The allow-list of the request's string properties, as (read, write) pairs.
const KEPT: [(Getter, Setter); 7] = [
    (
        BasicProperties::content_type,
        BasicProperties::with_content_type,
    ),
    (
        BasicProperties::content_encoding,
        BasicProperties::with_content_encoding,
    ),
    (
        BasicProperties::message_id,
        BasicProperties::with_message_id,
    ),
    (
        BasicProperties::correlation_id,
        BasicProperties::with_correlation_id,
    ),
    (BasicProperties::reply_to, BasicProperties::with_reply_to),
    (BasicProperties::kind, BasicProperties::with_type),
    (BasicProperties::app_id, BasicProperties::with_app_id),
];

/// The request's properties the worker's publish of it keeps; headers are set by the caller.
pub fn carried_properties(incoming: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default().with_delivery_mode(PERSISTENT);
    for (get, set) in KEPT {
        if let Some(value) = get(incoming) {
            out = set(out, value.clone());
        }
    }
    if let Some(at) = *incoming.timestamp() {
        out = out.with_timestamp(at);
    }
    out
}

/// The producer's application headers: everything but routing and broker directives and the
/// worker's own namespace.
pub fn carried_headers(incoming: Option<&FieldTable>) -> FieldTable {
    let mut map = incoming.map(|t| t.inner().clone()).unwrap_or_default();
    map.retain(|name, _| !is_directive(name.as_str()));
    FieldTable::from(map)
}

/// `CC`, `BCC` and `x-…` headers, whatever their case.
pub fn is_directive(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == "cc" || lower == "bcc" || lower.starts_with("x-")
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldArray, LongString};
    use proptest::prelude::*;

    use super::*;

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn directives_and_broker_properties_are_dropped() {
        let mut headers = FieldTable::default();
        let queues =
            AMQPValue::FieldArray(FieldArray::from(vec![text("autopilot.unassign.requests")]));
        for name in [
            "CC",
            "BCC",
            "cc",
            "Bcc",
            "x-death",
            "X-Delay",
            "x-unassign-retry-at",
        ] {
            headers.insert(name.into(), queues.clone());
        }
        headers.insert("traceparent".into(), text("00-1-2-01"));
        headers.insert("department".into(), text("hr"));
        let incoming = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_reply_to("replies".into())
            .with_timestamp(1_700_000_000)
            .with_expiration("2000".into())
            .with_user_id("someone-else".into())
            .with_priority(9)
            .with_delivery_mode(1)
            .with_cluster_id("c".into())
            .with_headers(headers);

        let out = carried_properties(&incoming);
        assert_eq!(out.expiration(), &None);
        assert_eq!(out.user_id(), &None);
        assert_eq!(out.priority(), &None);
        assert_eq!(out.cluster_id(), &None);
        assert_eq!(out.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(out.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(
            out.correlation_id().as_ref().map(|s| s.as_str()),
            Some("c-1")
        );
        assert_eq!(out.reply_to().as_ref().map(|s| s.as_str()), Some("replies"));
        assert_eq!(out.timestamp(), &Some(1_700_000_000));
        assert_eq!(out.headers(), &None, "headers are the caller's to set");

        let kept = carried_headers(incoming.headers().as_ref());
        let mut names: Vec<&str> = kept.inner().keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["department", "traceparent"]);
    }

    proptest! {
        #[test]
        fn no_directive_survives(names in proptest::collection::vec("[a-zA-Z-]{0,12}", 0..16)) {
            let mut table = FieldTable::default();
            for name in &names {
                table.insert(name.as_str().into(), text("v"));
            }
            let kept = carried_headers(Some(&table));
            for name in kept.inner().keys() {
                prop_assert!(!is_directive(name.as_str()), "{name}");
            }
            for name in &names {
                prop_assert_eq!(kept.inner().contains_key(name.as_str()), !is_directive(name));
            }
        }
    }
}
