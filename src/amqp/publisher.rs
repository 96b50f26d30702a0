//! Publishing with publisher confirms. Each publish resolves only when the broker has taken
//! responsibility for the message; callers await several concurrently.

use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

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
}

/// A confirm-mode channel. Cheap to clone (lapin channels are handles).
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &lapin::Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
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
        let options = BasicPublishOptions {
            mandatory,
            ..Default::default()
        };
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::NotRequested => Err(PublishError::NotConfirmed),
            Confirmation::Ack(Some(returned)) => {
                Err(PublishError::Unroutable(returned.reply_text.to_string()))
            }
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}
