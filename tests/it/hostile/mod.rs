//! Poison and hostile input against a live worker: floods of garbage and injection attempts,
//! an oversized body, and a message that crashes its worker every time it is delivered. Each
//! must end in the dead-letter queue without reaching Graph and without harming the worker. And
//! a hostile producer: its AMQP properties and headers are data, never orders.
//!
//! This file holds what the files below share: the deadline and the reading of a header.

mod bodies;
mod crash;
mod producer;

use crate::common;

use std::time::Duration;

use common::{Env, device, eventually};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use unassign_worker::contract::header_str;

const WAIT: Duration = Duration::from_secs(20);

fn header_string(headers: &FieldTable, name: &str) -> String {
    header_str(headers, name)
        .map(|s| s.into_owned())
        .unwrap_or_default()
}
