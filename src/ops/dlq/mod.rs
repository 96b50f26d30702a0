//! The dead-letter queue, for operators (`dlq list`, `dlq replay`). Both read the queue through
//! a [`Window`]: a consumer that never acks what it only looks at, so whatever happens —
//! an error, a crash, a closed terminal — the broker hands every message back. Replay acks a
//! dead letter only after its republished copy is confirmed: a crash in between duplicates,
//! never loses (CONTRACT section 1).

use std::{future::ready, ops::ControlFlow, time::Duration};

use futures_util::{Stream, StreamExt, TryStreamExt, stream};
use lapin::{
    Channel, Connection, Consumer,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::FieldTable,
};

use crate::{
    amqp::{PublishError, Publisher},
    config::AmqpSettings,
};

mod letter;

pub use letter::{DELIVERY_LIMIT, DeadLetter, Filter, UNKNOWN, known_kinds, replay_headers};

/// The most messages one window holds unacked: AMQP's prefetch count is 16 bits.
pub const MAX_WINDOW: u32 = u16::MAX as u32;
/// A window that expected more messages stops after this long without one (another consumer
/// took them meanwhile).
const IDLE: Duration = Duration::from_secs(2);
/// Republishes awaiting their confirm at once during a replay.
const REPLAY_PIPELINE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// A configuration problem (exit 2): the named queue is not there.
    #[error(
        "the dead-letter queue {0} does not exist: check `amqp.dead_letter_queue`, or start the worker once to declare it"
    )]
    NoQueue(String),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("republishing request {request_id}: {source}")]
    Publish {
        request_id: String,
        source: PublishError,
    },
    /// The test seam stopped the replay between a confirmed republish and its ack.
    #[error("replay interrupted between republish and ack")]
    Interrupted,
}

/// What an operator sees of one dead letter: the JSON shape of `dlq list --json`.
/// A snapshot of the dead-letter queue read through a consumer that does not ack: at most the
/// messages ready when it opened (or `limit`), each held until the channel closes.
struct Window {
    channel: Channel,
    consumer: Option<Consumer>,
    /// Ready messages when the window opened.
    total: u32,
    /// How many it reads: `total`, `limit` and [`MAX_WINDOW`], whichever is least.
    target: u32,
    read: u32,
}

impl Window {
    async fn open(
        connection: &Connection,
        queue: &str,
        limit: Option<u32>,
    ) -> Result<Self, DlqError> {
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let total = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .map_err(|e| match e.kind() {
                lapin::ErrorKind::ProtocolError(e)
                    if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) =>
                {
                    DlqError::NoQueue(queue.to_owned())
                }
                _ => DlqError::Broker(e),
            })?
            .message_count();
        let target = total.min(limit.unwrap_or(u32::MAX)).min(MAX_WINDOW);
        let mut window = Self {
            channel,
            consumer: None,
            total,
            target,
            read: 0,
        };
        if target > 0 {
            // The prefetch is the window: the broker sends no more than we mean to hold.
            let prefetch = u16::try_from(target).unwrap_or(u16::MAX);
            let channel = &window.channel;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    queue.into(),
                    "unassign-worker/dlq".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            window.consumer = Some(consumer);
        }
        Ok(window)
    }

    /// The next dead letter, or `None` once the window is read (or the queue went quiet).
    async fn next(&mut self) -> Result<Option<Delivery>, DlqError> {
        let Some(consumer) = self.consumer.as_mut().filter(|_| self.read < self.target) else {
            return Ok(None);
        };
        match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(delivery)) => {
                self.read += 1;
                Ok(Some(delivery?))
            }
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// The window as a stream, for pipelined processing.
    fn deliveries(self) -> impl Stream<Item = Result<Delivery, DlqError>> {
        stream::try_unfold(self, |mut window| async move {
            Ok(window.next().await?.map(|delivery| (delivery, window)))
        })
    }
}

/// Closing the channel hands every unacked message back to the queue.
async fn close(channel: &Channel) {
    let _ = channel.close(200, "done".into()).await;
}

/// What `dlq list` shows.
#[derive(Debug, Clone)]
pub struct Listing {
    pub letters: Vec<DeadLetter>,
    /// Ready messages in the queue when it was read.
    pub total: u32,
}

/// Reads up to `limit` dead letters and hands them all back: the queue ends as it began.
pub async fn browse(
    connection: &Connection,
    amqp: &AmqpSettings,
    limit: Option<u32>,
) -> Result<Listing, DlqError> {
    let mut window = Window::open(connection, &amqp.dead_letter_queue, limit).await?;
    let mut letters = Vec::new();
    let read = async {
        while let Some(delivery) = window.next().await? {
            letters.push(DeadLetter::describe(&delivery.data, &delivery.properties));
        }
        Ok(())
    }
    .await;
    close(&window.channel).await;
    read.map(|()| Listing {
        letters,
        total: window.total,
    })
}

/// The ready dead letters, counted without reading any.
pub async fn ready_count(connection: &Connection, amqp: &AmqpSettings) -> Result<u32, DlqError> {
    let window = Window::open(connection, &amqp.dead_letter_queue, Some(0)).await?;
    close(&window.channel).await;
    Ok(window.total)
}

/// Called after a republish is confirmed and before the dead letter is acked; `Break` stops
/// the replay there, as a crash would. The seam the duplicate-never-lose test uses.
pub type BeforeAck = Box<dyn Fn(&DeadLetter) -> ControlFlow<()> + Send + Sync>;

#[derive(Default)]
pub struct ReplayOptions {
    pub filter: Filter,
    /// Move at most this many.
    pub limit: Option<u32>,
    /// Report what would move; move nothing.
    pub dry_run: bool,
    pub before_ack: Option<BeforeAck>,
}

/// How a replay went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Ready dead letters when the replay began.
    pub total: u32,
    /// Read and matched against the filter: `total`, unless it exceeds [`MAX_WINDOW`] or
    /// `limit` was reached first.
    pub examined: u32,
    /// Moved (or, in a dry run, matched).
    pub moved: u32,
}

/// Moves the dead letters `options` selects back to the request exchange, calling `on_moved`
/// for each (with its new replay count) once it is republished (confirmed) and acked, in
/// queue order. Republishes are pipelined; the rest of the window is handed back untouched
/// when the channel closes.
pub async fn replay(
    connection: &Connection,
    amqp: &AmqpSettings,
    options: &ReplayOptions,
    mut on_moved: impl FnMut(&DeadLetter),
) -> Result<ReplaySummary, DlqError> {
    let window = Window::open(connection, &amqp.dead_letter_queue, None).await?;
    let (channel, total) = (window.channel.clone(), window.total);
    let publisher = Publisher::open(connection).await?;
    let limit = options.limit.map_or(usize::MAX, |n| n as usize);
    let (mut examined, mut moved) = (0, 0);
    let result = window
        .deliveries()
        .try_filter_map(|delivery| {
            examined += 1;
            let letter = DeadLetter::describe(&delivery.data, &delivery.properties);
            ready(Ok(options
                .filter
                .matches(&letter)
                .then_some((delivery, letter))))
        })
        .take(limit)
        .map_ok(|(delivery, letter)| move_one(&publisher, amqp, options, delivery, letter))
        .try_buffered(REPLAY_PIPELINE)
        .try_for_each(|letter| {
            moved += 1;
            on_moved(&letter);
            ready(Ok(()))
        })
        .await;
    close(&channel).await;
    publisher.close().await;
    result.map(|()| ReplaySummary {
        total,
        examined,
        moved,
    })
}

/// Publish (confirmed) first, then ack: the order that can duplicate but never lose.
async fn move_one(
    publisher: &Publisher,
    amqp: &AmqpSettings,
    options: &ReplayOptions,
    delivery: Delivery,
    letter: DeadLetter,
) -> Result<DeadLetter, DlqError> {
    let replayed = DeadLetter {
        replay_count: letter.replay_count.saturating_add(1),
        ..letter.clone()
    };
    if options.dry_run {
        return Ok(replayed);
    }
    let original = delivery.properties.headers().clone().unwrap_or_default();
    let properties = delivery
        .properties
        .clone()
        .with_headers(replay_headers(&original));
    publisher
        .publish(
            &amqp.exchange,
            &amqp.routing_key,
            &delivery.data,
            properties,
            true,
        )
        .await
        .map_err(|source| DlqError::Publish {
            request_id: letter.request_id.clone().unwrap_or_default(),
            source,
        })?;
    if let Some(before_ack) = &options.before_ack
        && before_ack(&letter).is_break()
    {
        return Err(DlqError::Interrupted);
    }
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(replayed)
}
