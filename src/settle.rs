//! The broker's side of a job: the one place a `lapin` delivery is seen. [`Delivered::new`]
//! splits it into the owned [`Message`] the job reads and the [`Settle`] port that publishes
//! its settlement with confirms and acks it.

use std::sync::Arc;

use lapin::{
    Acker, BasicProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

use crate::{
    amqp::{PublishError, Publisher},
    config::AmqpSettings,
    contract::{self, Outcome, StateKeys, TraceContext, carried_headers, carried_properties},
    job::{HandBack, Settlement},
    ports::{Message, NotSettled, Settle},
};
use tokio_util::sync::CancellationToken;

/// What every delivery's settlement shares.
pub struct Broker {
    pub amqp: AmqpSettings,
    /// `unassign-worker/<instance>`, the events' `source`.
    pub source: String,
    /// Sign the state a job carries in headers.
    pub state_keys: Arc<StateKeys>,
}

/// One delivery, to be settled.
pub struct Delivered {
    broker: Arc<Broker>,
    publisher: Publisher,
    acker: Acker,
    properties: BasicProperties,
    body: Vec<u8>,
    /// The outcome event's id, the same on every try.
    event_id: String,
    /// Cancelled once the session finds the connection or channel this delivery came on dead.
    link_lost: CancellationToken,
}

impl Delivered {
    pub fn new(
        broker: Arc<Broker>,
        publisher: Publisher,
        delivery: Delivery,
        link_lost: CancellationToken,
    ) -> (Message, Self) {
        let Delivery {
            data,
            properties,
            acker,
            ..
        } = delivery;
        let message = Message {
            body: data.clone(),
            headers: properties.headers().clone().unwrap_or_default(),
            message_id: properties.message_id().as_ref().map(|id| id.to_string()),
        };
        let delivered = Self {
            broker,
            publisher,
            acker,
            properties,
            body: data,
            event_id: uuid::Uuid::new_v4().to_string(),
            link_lost,
        };
        (message, delivered)
    }

    fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The event (and its copy to `reply-to`) and, on failure, the dead letter — concurrently.
    async fn publish_outcome(
        &self,
        outcome: &Outcome,
        trace: Option<&TraceContext>,
    ) -> Result<(), PublishError> {
        let (broker, publisher) = (&self.broker, &self.publisher);
        let traceparent = trace.map(TraceContext::header);
        let event = outcome.to_event(
            &broker.source,
            self.event_id.clone(),
            traceparent.as_deref(),
        );
        let body = serde_json::to_vec(&event).expect("events always serialise");
        let mut event_headers = FieldTable::default();
        if let Some(tp) = &traceparent {
            event_headers.insert(
                contract::headers::TRACEPARENT.into(),
                AMQPValue::LongString(tp.as_str().into()),
            );
        }
        let timestamp = outcome.completed_at.unix_timestamp();
        let properties = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_delivery_mode(2)
            .with_message_id(self.event_id.as_str().into())
            .with_correlation_id(outcome.request_id.as_str().into())
            .with_timestamp(timestamp.try_into().unwrap_or_default())
            .with_headers(event_headers);
        // A request nothing can correlate gets no event, only the dead letter.
        let has_event = !outcome.request_id.is_empty();
        let event = async {
            if !has_event {
                return Ok(());
            }
            let (exchange, rk) = (&broker.amqp.events_exchange, outcome.event_type());
            publisher
                .publish(exchange, rk, &body, properties.clone(), true)
                .await
        };
        let reply_to = async {
            let queue = self.properties.reply_to().as_ref().filter(|_| has_event);
            match queue.filter(|queue| reply_queue_allowed(&broker.amqp, queue.as_str())) {
                // A reply queue that is gone must not hold the request hostage: not mandatory.
                Some(queue) => {
                    let properties = properties.clone();
                    publisher
                        .publish("", queue.as_str(), &body, properties, false)
                        .await
                }
                None => Ok(()),
            }
        };
        let dead_letter = async {
            match &outcome.error {
                Some(failure) => {
                    let original = self.properties.headers().as_ref();
                    let mut headers = contract::dead_letter_headers(
                        original,
                        failure,
                        outcome.attempts,
                        outcome.completed_at,
                    );
                    if outcome.devices.is_some() {
                        // A replay must not redo the devices already unassigned.
                        let progress = outcome.progress();
                        let state = broker.state_keys.sign_dead_letter(
                            &progress.done,
                            &self.body,
                            self.message_id(),
                        );
                        merge(&mut headers, state);
                        if let Some(list) = progress.done_list() {
                            headers.insert(
                                contract::headers::DEVICES_DONE.into(),
                                AMQPValue::LongString(list.into()),
                            );
                        }
                    }
                    let properties = carried_properties(&self.properties).with_headers(headers);
                    let exchange = &broker.amqp.dead_letter_exchange;
                    let rk = &broker.amqp.routing_key;
                    publisher
                        .publish(exchange, rk, &self.body, properties, true)
                        .await
                }
                None => Ok(()),
            }
        };
        tokio::try_join!(event, reply_to, dead_letter).map(drop)
    }

    /// Puts the request back with its state — in the delay queue the planner chose, else at
    /// the tail of its queue — so attempts and budgets survive restarts, and the broker's
    /// delivery count (the crash-loop guard) is not spent on orderly hand-backs.
    async fn hand_back(&self, back: &HandBack) -> Result<(), PublishError> {
        let mut headers = carried_headers(self.properties.headers().as_ref());
        let signed = self
            .broker
            .state_keys
            .sign(&back.carried, &self.body, self.message_id());
        merge(&mut headers, signed);
        let properties = carried_properties(&self.properties).with_headers(headers);
        // Straight to the queue through the default exchange: other bindings of the request
        // exchange (an audit queue, say) must not see a hand-back as a new request.
        let amqp = &self.broker.amqp;
        let queue = match back.tier {
            Some(tier) => amqp.tier_queue(tier.as_secs()),
            None => amqp.queue.clone(),
        };
        self.publisher
            .publish("", &queue, &self.body, properties, true)
            .await
    }
}

impl Settle for Delivered {
    async fn publish(
        &self,
        settlement: &Settlement,
        trace: Option<&TraceContext>,
    ) -> Result<(), NotSettled> {
        let published = async {
            match settlement {
                Settlement::Finish(outcome) => self.publish_outcome(outcome, trace).await,
                Settlement::HandBack(back) => self.hand_back(back).await,
            }
        };
        tokio::select! {
            published = published => published.map_err(|e| NotSettled(e.to_string())),
            // Whatever the publish still waits for on a dead link (a confirm, a channel being
            // reopened) will not settle this delivery: the broker requeues it by itself.
            () = self.link_lost.cancelled() => Err(NotSettled("the broker link is gone".into())),
        }
    }

    async fn ack(&self) -> bool {
        // On a link found dead, lapin may never answer an ack it could not send.
        tokio::select! {
            ack = self.acker.ack(BasicAckOptions::default()) => acked(ack),
            () = self.link_lost.cancelled() => false,
        }
    }

    async fn requeue(&self) {
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        tokio::select! {
            _ = self.acker.nack(requeue) => {}
            () = self.link_lost.cancelled() => {}
        }
    }

    fn channel_gone(&self) -> bool {
        self.acker.poisoned() || self.link_lost.is_cancelled()
    }
}

/// Whether an ack reached the broker. lapin answers `Ok(false)` for one it could not even send
/// (the delivery's channel is gone): the broker redelivers, so nothing is finished yet.
fn acked(ack: Result<bool, lapin::Error>) -> bool {
    match ack {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(
                "ack not sent: the delivery's channel is gone; the broker will redeliver"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "ack failed; the broker will redeliver");
            false
        }
    }
}

fn merge(headers: &mut FieldTable, more: FieldTable) {
    for (name, value) in more.inner() {
        headers.insert(name.clone(), value.clone());
    }
}

/// A `reply-to` names where the producer wants a copy of its event — never one of the worker's
/// own queues (a copy there would be taken for a request, an outcome or a dead letter) nor a
/// broker-reserved `amq.` name.
fn reply_queue_allowed(amqp: &AmqpSettings, queue: &str) -> bool {
    let allowed = !queue.starts_with("amq.") && !amqp.is_own_queue(queue);
    if !allowed {
        tracing::warn!(
            reply_to = queue,
            "reply-to names a reserved or the worker's own queue; no copy sent there"
        );
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::acked;

    #[test]
    fn an_ack_lapin_could_not_send_is_not_a_settlement() {
        assert!(acked(Ok(true)));
        assert!(!acked(Ok(false)), "the channel was gone: not acked");
        let gone = lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closed,
            "the delivery's channel is closed",
        );
        assert!(!acked(Err(gone.into())));
    }
}
