//! The broker objects of CONTRACT section 3, declared idempotently, and the delay queues.
//!
//! Durable retry waits: RabbitMQ expires messages only at a queue's head, so every delay gets a
//! queue of its own (`<queue>.delay.<n>s`, one TTL each) that dead-letters back to the request
//! exchange. The planner (`job::Policy`) picks the longest tier that fits a wait; the rest is
//! waited on the next delivery, so precision is that of the last, in-process wait. No plugin.

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::config::AmqpSettings;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An existing object was declared with other arguments; the broker's text names the object
    /// and the argument. A configuration problem: exit 2.
    #[error("topology conflict on {object}: {detail}")]
    Conflict { object: String, detail: String },
    #[error("declaring {object}: {source}")]
    Broker {
        object: String,
        source: lapin::Error,
    },
}

/// Declares exchanges, queues and bindings. Safe to repeat; a conflicting existing object is a
/// [`TopologyError::Conflict`] (and closes `channel`, as AMQP does).
pub async fn declare(channel: &Channel, s: &AmqpSettings) -> Result<(), TopologyError> {
    exchange(channel, &s.exchange, ExchangeKind::Topic).await?;
    exchange(channel, &s.dead_letter_exchange, ExchangeKind::Fanout).await?;
    exchange(channel, &s.events_exchange, ExchangeKind::Topic).await?;
    let requests = quorum(
        s,
        [
            ("x-dead-letter-exchange", text(&s.dead_letter_exchange)),
            ("x-dead-letter-strategy", text("at-least-once")),
            ("x-overflow", text("reject-publish")),
            (
                "x-delivery-limit",
                AMQPValue::LongLongInt(s.delivery_limit.into()),
            ),
        ],
    );
    queue(channel, &s.queue, requests).await?;
    bind(channel, &s.queue, &s.exchange, &s.routing_key).await?;
    queue(channel, &s.dead_letter_queue, quorum(s, [])).await?;
    bind(channel, &s.dead_letter_queue, &s.dead_letter_exchange, "").await?;
    queue(channel, &s.outcomes_queue, quorum(s, [])).await?;
    bind(channel, &s.outcomes_queue, &s.events_exchange, "#").await?;
    for &secs in &s.delay_tiers_secs {
        let ttl_ms = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let args = quorum(
            s,
            [
                ("x-message-ttl", AMQPValue::LongLongInt(ttl_ms)),
                ("x-dead-letter-exchange", text(&s.exchange)),
                ("x-dead-letter-routing-key", text(&s.routing_key)),
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ],
        );
        queue(channel, &s.tier_queue(secs), args).await?;
    }
    Ok(())
}

/// A quorum queue's arguments. Its replica count is the broker's default (every cluster node on
/// RabbitMQ 3.x) unless `amqp.quorum_initial_group_size` sets it.
fn quorum<const N: usize>(s: &AmqpSettings, args: [(&str, AMQPValue); N]) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert("x-queue-type".into(), text("quorum"));
    if s.quorum_initial_group_size > 0 {
        table.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(s.quorum_initial_group_size.into()),
        );
    }
    for (name, value) in args {
        table.insert(ShortString::from(name), value);
    }
    table
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> Result<(), TopologyError> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let result = channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await;
    result.map_err(|e| classify(format!("exchange {name}"), e))
}

async fn queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), TopologyError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let result = channel.queue_declare(name.into(), options, args).await;
    result
        .map(drop)
        .map_err(|e| classify(format!("queue {name}"), e))
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), TopologyError> {
    let result = channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    result.map_err(|e| classify(format!("binding {queue} ← {exchange}"), e))
}

fn classify(object: String, source: lapin::Error) -> TopologyError {
    match source.kind() {
        lapin::ErrorKind::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) =>
        {
            TopologyError::Conflict {
                object,
                detail: e.get_message().to_string(),
            }
        }
        _ => TopologyError::Broker { object, source },
    }
}
