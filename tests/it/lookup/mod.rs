//! Requests by serial number and by user (CONTRACT sections 4 and 5) against the real broker
//! and graph-sim: the filter Graph receives, exact matching, paging, the scan fallback,
//! per-device results, partial failures that neither a retry nor a replay redoes, and reads
//! budgeted and throttled apart from writes.
//!
//! This file holds what the files below share: device inventories for graph-sim, publishing a
//! request, and reading its event, dead letter and per-device results back.

mod reads;
mod resume;
mod serials;
mod users;

use crate::common;

use std::{collections::BTreeMap, time::Duration};

use common::{Env, Received, eventually, sim_options};
use lapin::BasicProperties;
use serde_json::{Value, json};
use unassign_worker::sim::{Device, Scripted, Sim, SimOptions};

const WAIT: Duration = Duration::from_secs(30);
const ANN: &str = "ann@contoso.com";

/// A device id whose order is its number: the worker unassigns a user's devices in id order.
fn id(n: u32) -> String {
    format!("aaaaaaaa-bbbb-4ccc-8ddd-{n:012}")
}

fn sim_with(devices: Vec<Device>) -> SimOptions {
    SimOptions {
        inventory: Some(devices),
        ..sim_options()
    }
}

async fn publish(env: &Env, body: Value) {
    env.broker
        .publish(body.to_string().as_bytes(), BasicProperties::default())
        .await;
}

/// The event of `request_id`, once it arrived.
async fn event_of(env: &Env, request_id: &str) -> Value {
    eventually(&format!("the event of {request_id}"), WAIT, || async {
        env.events
            .all()
            .iter()
            .map(Received::json)
            .find(|e| e["data"]["request_id"] == request_id)
    })
    .await
}

async fn dead_letter_of(env: &Env, request_id: &str) -> Received {
    eventually(
        &format!("the dead letter of {request_id}"),
        WAIT,
        || async {
            env.dead
                .all()
                .into_iter()
                .find(|d| d.json()["request_id"] == request_id)
        },
    )
    .await
}

fn calls(sim: &Sim) -> BTreeMap<String, u64> {
    sim.stats().calls_by_device
}

fn device_results(event: &Value) -> Vec<(String, String)> {
    event["data"]["devices"]
        .as_array()
        .expect("data.devices is a list")
        .iter()
        .map(|d| {
            let outcome = d["outcome"].as_str().unwrap().to_owned();
            (d["device_id"].as_str().unwrap().to_owned(), outcome)
        })
        .collect()
}

fn ok(ids: &[u32]) -> Vec<(String, String)> {
    ids.iter()
        .map(|&n| (id(n), "succeeded".to_owned()))
        .collect()
}

/// A user whose devices keep showing them after an unassign (Intune applies it asynchronously),
/// so a second pass would find the finished devices again.
fn lagging_user(n: u32) -> SimOptions {
    let devices = (1..=n)
        .map(|k| Device::new(&id(k), &format!("SN{k}"), ANN))
        .collect();
    sim_with(devices)
}
