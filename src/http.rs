//! The small HTTP server: `/metrics`, `/healthz`, `/readyz` (CONTRACT section 7).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A loop that has not turned for this long makes `/healthz` fail.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// What `/readyz` and `/healthz` report, kept by the observer ([`crate::observe`]) from what the
/// supervisor and the tenants report.
#[derive(Default)]
pub struct Health {
    connected: AtomicBool,
    consuming: AtomicBool,
    paused: Mutex<Option<String>>,
    /// Tenants whose jobs wait for their credentials, by profile name.
    paused_tenants: Mutex<BTreeMap<String, String>>,
    last_tick_ms: AtomicU64,
}

impl Health {
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    /// `Some(reason)` while consumption is paused for credential trouble.
    pub fn set_paused(&self, reason: Option<String>) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// `Some(reason)` while one tenant's jobs wait for its credentials. The worker stays ready
    /// while another tenant works; `/readyz` names the paused ones.
    pub fn set_tenant_paused(&self, tenant: &str, reason: Option<&str>) {
        let mut paused = self
            .paused_tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match reason {
            Some(reason) => paused.insert(tenant.to_owned(), reason.to_owned()),
            None => paused.remove(tenant),
        };
    }

    /// Each time the supervisor's loop turns, including while it waits (`LinkEvent::Alive`).
    pub fn tick(&self) {
        self.last_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn alive(&self) -> bool {
        now_ms().saturating_sub(self.last_tick_ms.load(Ordering::Relaxed))
            < STALL_LIMIT.as_millis() as u64
    }

    /// The body, `Err` when not ready; credentials first, as they need a human. Paused tenants
    /// are listed either way.
    pub(crate) fn readiness(&self) -> Result<serde_json::Value, serde_json::Value> {
        let paused_tenants = self
            .paused_tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(reason) = self
            .paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(json!({
                "ready": false,
                "reason": "credentials",
                "detail": reason,
                "paused_tenants": paused_tenants,
            }));
        }
        if !self.connected.load(Ordering::Relaxed) {
            return Err(json!({"ready": false, "reason": "broker_disconnected"}));
        }
        if !self.consuming.load(Ordering::Relaxed) {
            return Err(json!({"ready": false, "reason": "not_consuming"}));
        }
        Ok(match paused_tenants.is_empty() {
            true => json!({"ready": true}),
            false => json!({"ready": true, "paused_tenants": paused_tenants}),
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.alive() {
        (StatusCode::OK, Json(json!({"alive": true})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"alive": false, "reason": "supervisor loop stalled"})),
        )
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.health.readiness() {
        Ok(body) => (StatusCode::OK, Json(body)),
        Err(body) => (StatusCode::SERVICE_UNAVAILABLE, Json(body)),
    }
}
