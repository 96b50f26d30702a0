//! A worker's HTTP endpoints (`/metrics`, `/healthz`, `/readyz`), the same whether it runs in this
//! process ([`crate::Worker`]) or as one of its own ([`crate::process::WorkerProcess`]).

use std::{net::SocketAddr, time::Duration};

use crate::{eventually, sum_samples};

pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("the worker's HTTP answers");
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The sum of the `/metrics` samples named like `sample` that carry its labels (and maybe
/// more): `unassign_jobs_total{outcome="succeeded"}` adds up every tenant's series.
pub(crate) async fn metric(addr: SocketAddr, sample: &str) -> f64 {
    sum_samples(&get(addr, "/metrics").await.1, sample)
}

pub(crate) async fn wait_ready(addr: SocketAddr) {
    eventually("/readyz 200", Duration::from_secs(20), || async {
        (get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
}
