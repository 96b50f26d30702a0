//! The integration tests: one binary, so the crate and the shared harness are compiled and linked
//! once, and the tests of every module run in parallel. Each module holds the tests of one
//! behaviour against the real RabbitMQ (`AMQP_URL`, uniquely named objects per test) and graph-sim
//! on port 0; `common` is the harness they share with the benches.

mod common;

mod auth;
mod cli;
mod cluster;
mod delivery;
mod docs;
mod durable;
mod happy_path;
mod hostile;
mod intake;
mod layout;
mod lifecycle;
mod lookup;
mod observability;
mod ops;
mod replicas;
mod retries;
mod soak;
mod tenants;
