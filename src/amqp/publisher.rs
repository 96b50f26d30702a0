//! Publishing with publisher confirms. Each publish resolves only when the broker has taken
//! responsibility for the message; callers await several concurrently.
//!
//! The broker may close the publish channel while the connection lives on (a publish it
//! refuses: an exchange that is gone, say). That is the one channel's end, not the session's:
//! the next publish finds the channel closed and opens a fresh one in its place.
//!
//! A nack retires the channel too. The broker keeps per-channel state for each quorum queue it
//! publishes to, and RabbitMQ 3.10 can leave that state stuck after the queue's leader moves: a
//! channel that published while no leader was known then has every later publish nacked, for
//! as long as it lives, though the queue has long had a new leader. A fresh channel starts
//! clean; the cost when the nack was deserved (a queue at its length limit) is one channel open
//! per refused publish.

use std::{future::Future, sync::Arc, time::Duration};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::sync::Mutex;

/// Longest wait for a publisher confirm. The broker confirms in milliseconds, or closes the
/// channel; a confirm that never comes (a wedged channel, a queue stuck without its quorum) must
/// not hold the delivery for ever: the caller retries, and in the end hands the delivery back.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the channel is not in confirm mode")]
    NotConfirmed,
    #[error("no queue is bound for it (returned: {0})")]
    Unroutable(String),
    #[error("no confirm within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout,
}

/// A confirm-mode channel. Cheap to clone: clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    /// Locked only to read or replace the channel, never across a publish: the lock makes a
    /// reopen single-flight, so concurrent publishers that all find the channel closed (or
    /// nacked) open one channel between them.
    current: Arc<Mutex<Current>>,
    /// The worker's and the intake's publishers replace their channel; the commands' do not,
    /// since a refused publish ends the command anyway.
    reopen: Option<Reopen>,
}

/// Where a closed or nacked channel is replaced, and who hears of it.
#[derive(Clone)]
struct Reopen {
    connection: Arc<Connection>,
    reopened: Arc<dyn Fn() + Send + Sync>,
}

/// The channel publishes go out on. A replaced channel is closed by lapin once the last publish
/// still waiting for its confirm there lets go of it.
struct Current {
    channel: Channel,
    /// Counts replacements, so that a nack retires the channel it came from and never its
    /// successor (a channel id can be reused once the old channel is closed).
    generation: u64,
    /// The broker nacked a publish on this channel: the next publish opens a fresh one.
    refused: bool,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let current = Current {
            channel: confirm_channel(connection).await?,
            generation: 0,
            refused: false,
        };
        Ok(Self {
            current: Arc::new(Mutex::new(current)),
            reopen: None,
        })
    }

    /// A publisher that replaces its channel when the broker has closed it or nacked a publish
    /// on it, calling `reopened` each time (the worker counts it in
    /// `unassign_amqp_channel_errors_total{reason="publish"}`, the intake in
    /// `unassign_intake_amqp_channel_reopens_total`).
    pub async fn reopening(
        connection: &Arc<Connection>,
        reopened: impl Fn() + Send + Sync + 'static,
    ) -> Result<Self, lapin::Error> {
        let reopen = Reopen {
            connection: connection.clone(),
            reopened: Arc::new(reopened),
        };
        Ok(Self {
            reopen: Some(reopen),
            ..Self::open(connection).await?
        })
    }

    /// Closes the channel in use; done explicitly, since a close on drop would race the
    /// connection's close.
    pub async fn close(&self) {
        let channel = self.current.lock().await.channel.clone();
        let _ = channel.close(200, "done".into()).await;
    }

    /// The channel to publish on, and its generation: the current one, or a fresh one if the
    /// broker closed it while the connection lives on or nacked a publish on it (on a dead
    /// connection, the old one fails the publish).
    async fn channel(&self) -> Result<(Channel, u64), lapin::Error> {
        let mut current = self.current.lock().await;
        if let Some(reopen) = &self.reopen
            && reopen.connection.status().connected()
        {
            let closed = !current.channel.status().connected();
            if closed || current.refused {
                let why = if closed {
                    "closed"
                } else {
                    "nacked a publish on"
                };
                tracing::warn!(
                    channel = current.channel.id(),
                    "the broker {why} the publish channel; publishing on a fresh one"
                );
                (reopen.reopened)();
                current.channel = confirm_channel(&reopen.connection).await?;
                current.generation += 1;
                current.refused = false;
            }
        }
        Ok((current.channel.clone(), current.generation))
    }

    /// Retires the channel of `generation` after a nack, unless it was replaced meanwhile.
    async fn refused(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.generation == generation {
            current.refused = true;
        }
    }

    /// Publishes and waits for the confirm. With `mandatory`, a message no queue takes is an
    /// error rather than silently dropped.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        // The channel (maybe reopened), the send and the confirm, bounded as one: a reopen on
        // a connection that dies meanwhile must not hang the publish any more than a confirm.
        let mut used = None;
        let result = confirmed(async {
            let (channel, generation) = self.channel().await?;
            used = Some(generation);
            let options = BasicPublishOptions {
                mandatory,
                ..Default::default()
            };
            let exchange = exchange.into();
            let confirm = channel
                .basic_publish(exchange, routing_key.into(), options, body, properties)
                .await?;
            confirm.await
        })
        .await;
        if let (Err(PublishError::Nacked), Some(generation)) = (&result, used) {
            self.refused(generation).await;
        }
        result
    }
}

/// What the broker said about a publish, from asking for a channel to the confirm, waited for
/// at most [`CONFIRM_TIMEOUT`].
async fn confirmed(
    confirm: impl Future<Output = Result<Confirmation, lapin::Error>>,
) -> Result<(), PublishError> {
    let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| PublishError::ConfirmTimeout)??;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
        Confirmation::Ack(Some(returned)) => {
            Err(PublishError::Unroutable(returned.reply_text.to_string()))
        }
        Confirmation::Nack(_) => Err(PublishError::Nacked),
    }
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_confirm_that_never_comes_is_an_error() {
        let never = std::future::pending::<Result<Confirmation, lapin::Error>>();
        let waited = tokio::time::timeout(Duration::from_secs(3600), confirmed(never)).await;
        assert!(
            matches!(waited, Ok(Err(PublishError::ConfirmTimeout))),
            "{waited:?}"
        );
    }
}
