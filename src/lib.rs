//! `unassign-worker`: takes departing employees off their Windows Autopilot devices.
//! HR systems enqueue requests on RabbitMQ; the worker calls Microsoft Graph's
//! `unassignUserFromDevice`, publishes an outcome event per request and dead-letters what
//! truly failed. Start reading at [`executor`], which follows one job from delivery to ack, and [`job`],
//! where every decision about it is made.

pub mod amqp;
pub mod auth;
pub mod cli;
pub mod config;
pub mod contract;
pub mod credential;
pub mod executor;
pub mod graph;
pub mod http;
pub mod intake;
pub mod job;
pub mod lookup;
pub mod metrics;
pub mod observe;
pub mod ops;
pub mod ports;
pub mod replicas;
pub mod retry;
pub mod session;
pub mod settle;
pub mod shutdown;
/// graph-sim, the crate of its own under `crates/graph-sim`, as the `graph-sim` command serves it.
#[cfg(feature = "graph-sim")]
pub use graph_sim as sim;
pub mod telemetry;
pub mod tenant;
pub mod throttle;
pub mod worker;
