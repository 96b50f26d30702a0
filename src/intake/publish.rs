//! The intake's side of the broker: one connection with a confirm channel, kept up by a
//! supervisor that reconnects by itself, and the publishing of a post's rows with confirms.
//! A post is answered 202 only when every one of its messages was confirmed.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::{Connection, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::metrics::IntakeMetrics;
use crate::{
    amqp::{self, PublishError, Publisher, TopologyError},
    config::AmqpSettings,
    ops::batch::{self, PublishFailed, Row},
};

const CONNECTION_NAME: &str = "unassign-worker/intake";

/// The publisher in use, numbered so that a failed post can say which connection failed it
/// without tearing down the next one.
#[derive(Clone, Default)]
struct Current {
    generation: u64,
    publisher: Option<Publisher>,
}

/// Why a post's messages were not all confirmed; the client is told 503 and retries.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("not connected to the broker")]
    Disconnected,
    #[error("{0}")]
    Refused(#[from] PublishFailed),
    #[error("the broker did not confirm within {0:?}")]
    Timeout(Duration),
}

/// Shared by every post: the current publisher, and a way to report it broken.
pub struct Broker {
    amqp: AmqpSettings,
    current: watch::Receiver<Current>,
    /// The highest generation a post found broken; the supervisor replaces that connection.
    broken: watch::Sender<u64>,
    timeout: Duration,
}

/// Keeps the connection up; [`Supervisor::run`] returns on shutdown or a conflicting topology.
pub struct Supervisor {
    amqp: AmqpSettings,
    current: watch::Sender<Current>,
    broken: watch::Receiver<u64>,
    metrics: Arc<IntakeMetrics>,
}

pub fn link(
    amqp: &AmqpSettings,
    timeout: Duration,
    metrics: Arc<IntakeMetrics>,
) -> (Broker, Supervisor) {
    let (current_tx, current_rx) = watch::channel(Current::default());
    let (broken_tx, broken_rx) = watch::channel(0);
    let broker = Broker {
        amqp: amqp.clone(),
        current: current_rx,
        broken: broken_tx,
        timeout,
    };
    let supervisor = Supervisor {
        amqp: amqp.clone(),
        current: current_tx,
        broken: broken_rx,
        metrics,
    };
    (broker, supervisor)
}

impl Broker {
    pub fn redacted_url(&self) -> String {
        self.amqp.redacted_url()
    }

    /// How long a post may wait for its confirms.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn connected(&self) -> bool {
        self.current.borrow().publisher.is_some()
    }

    /// Publishes `rows` to the request exchange, all at once, and waits for every confirm;
    /// `on_confirm` sees each confirmed row (so a retry need not publish it again).
    pub async fn publish(
        &self,
        rows: &[Row],
        on_confirm: impl FnMut(&Row, usize),
    ) -> Result<(), Unavailable> {
        let Current {
            generation,
            publisher,
        } = self.current.borrow().clone();
        let publisher = publisher.ok_or(Unavailable::Disconnected)?;
        let published = tokio::time::timeout(
            self.timeout,
            batch::publish_all(&publisher, &self.amqp, rows, on_confirm),
        )
        .await;
        let failure = match published {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(refused)) => {
                // A nack or an unroutable message is the broker's answer on a working
                // connection; anything else means the connection cannot be trusted.
                let connection_trouble = !matches!(
                    refused.source,
                    PublishError::Nacked | PublishError::Unroutable(_)
                );
                (connection_trouble, Unavailable::Refused(refused))
            }
            Err(_) => (true, Unavailable::Timeout(self.timeout)),
        };
        if failure.0 {
            self.broken.send_modify(|g| *g = (*g).max(generation));
        }
        Err(failure.1)
    }
}

impl Supervisor {
    /// Connects, declares the topology (unless disabled), opens the confirm channel and keeps
    /// it until the connection fails, a post reports it broken, or `stop` is cancelled.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), TopologyError> {
        let max_delay = self.amqp.reconnect_max_delay.max(Duration::from_secs(1));
        let mut delay = Duration::from_millis(200);
        let mut first_node = 0;
        let mut generation = 0;
        let mut connected_before = false;
        while !stop.is_cancelled() {
            let (connection, node, publisher) = match self.connect(first_node).await {
                Ok(connected) => connected,
                Err(Fatal::Topology(e)) => return Err(e),
                Err(Fatal::Retry(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "broker unavailable");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(max_delay);
                    continue;
                }
            };
            if connected_before {
                self.metrics.reconnected();
            }
            connected_before = true;
            delay = Duration::from_millis(200);
            generation += 1;
            self.current.send_replace(Current {
                generation,
                publisher: Some(publisher.clone()),
            });
            self.metrics.set_connected(true);
            tracing::info!(node = %self.amqp.url.labels()[node], "connected to the broker");
            let mut events = connection.events_listener();
            let why = tokio::select! {
                _ = stop.cancelled() => None,
                lost = async {
                    loop {
                        match events.next().await {
                            Some(Event::Error(e)) => return e.to_string(),
                            Some(_) => {}
                            None => return "connection events ended".to_owned(),
                        }
                    }
                } => Some(lost),
                _ = self.broken.wait_for(|g| *g >= generation) => {
                    Some("a publish failed on this connection".to_owned())
                }
            };
            self.current.send_replace(Current {
                generation,
                publisher: None,
            });
            self.metrics.set_connected(false);
            // Closed here, not on drop, where it would race the connection's close; a dead
            // connection does not answer, hence the timeout.
            let close = async {
                publisher.close().await;
                let _ = connection.close(200, "closing".into()).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
            match why {
                None => break,
                Some(why) => {
                    tracing::warn!(error = %why, "broker connection lost; reconnecting");
                    first_node = node + 1;
                }
            }
        }
        Ok(())
    }

    async fn connect(
        &self,
        first_node: usize,
    ) -> Result<(Arc<Connection>, usize, Publisher), Fatal> {
        let (connection, node) = amqp::connect(&self.amqp, CONNECTION_NAME, first_node)
            .await
            .map_err(Fatal::Retry)?;
        let connection = Arc::new(connection);
        if self.amqp.declare_topology {
            let channel = connection
                .create_channel()
                .await
                .context("opening a channel")
                .map_err(Fatal::Retry)?;
            match amqp::declare(&channel, &self.amqp).await {
                Ok(()) => {
                    let _ = channel.close(200, "declared".into()).await;
                }
                Err(e @ TopologyError::Conflict { .. }) => return Err(Fatal::Topology(e)),
                Err(e) => return Err(Fatal::Retry(e.into())),
            }
        }
        // A nack is the broker's answer on a working connection, so it keeps the connection,
        // but not the channel (amqp::publisher: a channel can go on nacking a quorum queue
        // whose leader moved).
        let metrics = self.metrics.clone();
        let publisher = Publisher::reopening(&connection, move || metrics.channel_reopened())
            .await
            .context("opening a confirm channel")
            .map_err(Fatal::Retry)?;
        Ok((connection, node, publisher))
    }
}

enum Fatal {
    Topology(TopologyError),
    Retry(anyhow::Error),
}
