//! RabbitMQ: connecting, declaring the topology and publishing with confirms. The connection
//! supervisor that uses these lives in [`crate::worker`].

pub mod publisher;
pub mod topology;

use std::time::Duration;

use anyhow::Context as _;
use lapin::{Connection, ConnectionProperties, uri::AMQPUri};
use url::{Host, Url};

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
        let uri = match broker_uri(&settings.connect_url(node)) {
            Ok(uri) => uri,
            Err(e) => {
                failures.push(format!("{}: {e}", labels[node]));
                continue;
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, properties)).await
        {
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

/// A broker URL as lapin takes it. lapin's parser reads the host with `Url::domain`, which is
/// `None` for an IPv6 address, and falls back to `localhost`: `amqp://[fd00::5]` would silently
/// connect to this machine. (In an `amqp:` URL an IPv4 address is an opaque host name to the
/// `url` crate, so it comes through.) The host is set here instead, without its brackets, as a
/// socket address is looked up.
fn broker_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    if let Some(Host::Ipv6(ip)) = Url::parse(url).map_err(|e| e.to_string())?.host() {
        uri.authority.host = ip.to_string();
    }
    Ok(uri)
}

/// Node indices from `first`, wrapping round: each of `n` nodes once.
pub fn try_order(n: usize, first: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (first + k) % n)
}

#[cfg(test)]
mod tests {
    use super::{broker_uri, try_order};

    #[test]
    fn the_host_may_be_an_ip_address() {
        let host = |url| broker_uri(url).unwrap().authority.host;
        assert_eq!(host("amqp://u:p@[::1]:5672/%2f"), "::1");
        assert_eq!(host("amqp://u:p@10.1.2.3:5701/%2f"), "10.1.2.3");
        assert_eq!(host("amqps://u:p@broker.example/%2f"), "broker.example");
        let uri = broker_uri("amqp://u:p@[fd00::5]:5701/v?heartbeat=7").unwrap();
        assert_eq!(uri.authority.port, 5701);
        assert_eq!(uri.vhost, "v");
        assert_eq!(uri.query.heartbeat, Some(7));
    }

    #[test]
    fn tries_every_node_once_from_the_given_one() {
        assert_eq!(try_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(try_order(3, 2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(try_order(3, 4).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(try_order(1, 1).collect::<Vec<_>>(), [0]);
    }
}
