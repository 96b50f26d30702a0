//! RabbitMQ: connecting, declaring the topology and publishing with confirms. The connection
//! supervisor that uses these lives in [`crate::worker`].

pub mod delay;
pub mod publisher;
pub mod topology;

use std::time::Duration;

use anyhow::Context as _;
use lapin::{Connection, ConnectionProperties};

pub use publisher::{PublishError, Publisher};
pub use topology::{TopologyError, declare};

use crate::config::AmqpSettings;

/// A node that neither answers nor refuses (a dead host, a black-holed port) is given up on
/// after this, so the next node is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the first node that answers, trying them in order from node `first` and
/// wrapping round. Returns the connection and its node's index in `amqp.url`. The connection is
/// named after this worker so operators can tell it apart in the broker.
pub async fn connect(
    settings: &AmqpSettings,
    name: &str,
    first: usize,
) -> anyhow::Result<(Connection, usize)> {
    let labels = settings.url.labels();
    let mut failures = Vec::new();
    for node in try_order(labels.len(), first) {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let url = settings.connect_url(node);
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&url, properties)).await {
            Ok(Ok(connection)) => return Ok((connection, node)),
            Ok(Err(e)) => failures.push(format!("{}: {e}", labels[node])),
            Err(_) => failures.push(format!(
                "{}: no answer in {CONNECT_TIMEOUT:?}",
                labels[node]
            )),
        }
    }
    Err(anyhow::anyhow!(failures.join("; "))).context("no broker node answered")
}

/// Node indices from `first`, wrapping round: each of `n` nodes once.
pub fn try_order(n: usize, first: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (first + k) % n)
}

#[cfg(test)]
mod tests {
    use super::try_order;

    #[test]
    fn tries_every_node_once_from_the_given_one() {
        assert_eq!(try_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(try_order(3, 2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(try_order(3, 4).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(try_order(1, 1).collect::<Vec<_>>(), [0]);
    }
}
