//! RabbitMQ: connecting, declaring the topology and publishing with confirms. The connection
//! supervisor that uses these lives in [`crate::worker`].

pub mod delay;
pub mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

pub use publisher::{PublishError, Publisher};
pub use topology::{TopologyError, declare};

use crate::config::AmqpSettings;

/// Opens a connection named after this worker so operators can tell it apart in the broker UI.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(&settings.connect_url(), properties).await
}
