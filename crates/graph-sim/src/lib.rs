//! `graph-sim`: a stand-in for the Microsoft identity platform token endpoint and the Graph
//! Autopilot endpoints the worker calls, faithful to their throttling, token and error behaviour,
//! with knobs (latency, injected errors, outages, throttling, scripted answers) for tests and demos.
//!
//! A crate of its own, independent of the worker: it plays Entra ID and Graph from their
//! documented behaviour, so it must not borrow the worker's reading of them. The worker's
//! `graph-sim` command (a default cargo feature) serves it; the production image leaves it out.

mod aad;
mod assertion;
mod devices;
mod routes;
mod state;
mod throttle;
mod token;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use devices::Device;
use state::Shared;

pub use assertion::{FEDERATED_AUDIENCE, FEDERATED_ISSUER, JWT_BEARER};

/// CLI options of `unassign-worker graph-sim`; also used by tests (via `Default` or `parse_from`).
#[derive(Parser, Debug, Clone)]
pub struct SimOptions {
    /// Address to serve Graph (under /beta), the token endpoint and /_sim/* on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Accepted tenant (GUID) of the app below; any tenant GUID is accepted when absent.
    #[arg(long)]
    pub tenant_id: Option<String>,
    /// A further tenant with an app registration of its own, repeatable:
    /// TENANT_ID,CLIENT_ID,SECRET (throttled like the others unless changed at run time).
    #[arg(long = "tenant", value_parser = parse_tenant)]
    pub tenants: Vec<(String, TenantApp)>,
    /// The app registration's client id (the worker's AZURE_CLIENT_ID).
    #[arg(long, default_value = "00000000-0000-0000-0000-00000000c11e")]
    pub client_id: String,
    /// The app's client secret (the worker's AZURE_CLIENT_SECRET); a demo value, never a real one.
    #[arg(long, default_value = "sim-secret")]
    pub client_secret: String,
    /// Lifetime of the access tokens it issues (`expires_in`).
    #[arg(long, default_value_t = 3599)]
    pub token_ttl_secs: u64,
    /// Added before every Graph answer, as a real round trip would take.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Random error injection, repeatable: STATUS=RATIO, e.g. --error-rate 503=0.05
    #[arg(long = "error-rate", value_parser = parse_error_rate)]
    pub error_rates: Vec<(u16, f64)>,
    /// Throttle: at most this many action calls per tenant per window (0 = off); excess answered 429.
    #[arg(long, default_value_t = 0)]
    pub throttle_limit: u32,
    /// The window --throttle-limit and --read-throttle-limit count in (Intune's is 20 s).
    #[arg(long, default_value_t = 20_000)]
    pub throttle_window_ms: u64,
    /// How Retry-After is sent on 429 / injected 503.
    #[arg(long, value_enum, default_value = "fractional")]
    pub retry_after: RetryAfterMode,
    /// Outage windows relative to start, repeatable: START..END in seconds, e.g. 10..40; all action calls answer 503 then.
    #[arg(long = "outage", value_parser = parse_outage)]
    pub outages: Vec<(f64, f64)>,
    /// Send Retry-After (in --retry-after form) on outage 503s.
    #[arg(long)]
    pub outage_retry_after: bool,
    /// Device inventory: a CSV file (`.csv`, header row `id,serialNumber,userPrincipalName,…`), a
    /// JSON array or JSON Lines of {"id","serialNumber","userPrincipalName",…}. When loaded,
    /// unknown ids answer 404 and the list endpoint serves these devices.
    #[arg(long)]
    pub devices: Option<PathBuf>,
    /// The inventory given in-process (tests); used instead of `devices` when set.
    #[arg(skip)]
    pub inventory: Option<Vec<Device>>,
    /// Devices per page of the list endpoint (`@odata.nextLink` leads to the next).
    #[arg(long, default_value_t = 100)]
    pub page_size: usize,
    /// Refuse `$filter=userPrincipalName eq '…'` with Graph's 400, as Graph may.
    #[arg(long)]
    pub refuse_upn_filter: bool,
    /// Throttle reads (list calls): at most this many per tenant per --throttle-window-ms (0 = off).
    #[arg(long, default_value_t = 0)]
    pub read_throttle_limit: u32,
    /// Answer every Graph call with 403 (app lacks permission).
    #[arg(long)]
    pub forbid: bool,
    /// PEM certificate registered on the app registration (repeatable): its key may sign client
    /// assertions.
    #[arg(long = "client-certificate")]
    pub client_certificates: Vec<PathBuf>,
    /// Subject of the app's federated identity credential (issuer FEDERATED_ISSUER, audience
    /// api://AzureADTokenExchange).
    #[arg(
        long,
        default_value = "system:serviceaccount:unassign-worker:unassign-worker"
    )]
    pub federated_subject: String,
}

impl Default for SimOptions {
    /// The CLI defaults, but on an ephemeral port so tests never collide.
    fn default() -> Self {
        let mut opts = Self::parse_from(["graph-sim"]);
        opts.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        opts
    }
}

/// How a `Retry-After` header is written (Graph sends fractional seconds; HTTP allows a date; Intune
/// sometimes sends none).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterMode {
    /// Seconds with three decimals, e.g. `2.128`.
    Fractional,
    /// Whole seconds, rounded up.
    Integer,
    /// RFC 9110 IMF-fixdate of the (whole-second, rounded up) instant.
    HttpDate,
    /// No header at all.
    Absent,
}

/// The knobs that can change while the simulator runs (initialised from [`SimOptions`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Behaviour {
    pub client_secret: String,
    pub latency_ms: u64,
    pub error_rates: Vec<(u16, f64)>,
    pub throttle_limit: u32,
    pub throttle_window_ms: u64,
    pub retry_after: RetryAfterMode,
    /// Manual outage switch: every action call answers 503.
    pub outage: bool,
    pub outage_retry_after: bool,
    pub forbid: bool,
    /// The token endpoint answers 503.
    pub token_outage: bool,
    /// `$filter=userPrincipalName eq '…'` answers 400 (Graph's error body).
    #[serde(default)]
    pub refuse_upn_filter: bool,
    /// Read (list) calls per tenant per `throttle_window_ms`; 0 = off. Counted apart from writes.
    #[serde(default)]
    pub read_throttle_limit: u32,
    /// Devices whose unassign call answers this status instead of doing it (id as sent).
    #[serde(default)]
    pub failing_devices: BTreeMap<String, u16>,
    /// Origin (`scheme://host:port`) written into `@odata.nextLink` instead of the request's own.
    #[serde(default)]
    pub next_link_origin: Option<String>,
    /// Unassign answers 204 but the list keeps showing the user, as Intune, which applies the
    /// change asynchronously, may for a while.
    #[serde(default)]
    pub lagging_unassign: bool,
    /// PEM certificates registered on the app (`--client-certificate`, read at start).
    pub client_certificates: Vec<String>,
    pub federated_subject: String,
    /// Tenants (lower-case GUID) with an app registration of their own; every other tenant
    /// uses the app above.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantApp>,
}

/// One tenant's app registration and throttling, apart from the default app's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TenantApp {
    pub client_id: String,
    pub client_secret: String,
    /// Replaces `throttle_limit` for this tenant (`Some(0)`: never throttled).
    #[serde(default)]
    pub throttle_limit: Option<u32>,
}

impl From<&SimOptions> for Behaviour {
    fn from(o: &SimOptions) -> Self {
        Self {
            client_secret: o.client_secret.clone(),
            latency_ms: o.latency_ms,
            error_rates: o.error_rates.clone(),
            throttle_limit: o.throttle_limit,
            throttle_window_ms: o.throttle_window_ms,
            retry_after: o.retry_after,
            outage: false,
            outage_retry_after: o.outage_retry_after,
            forbid: o.forbid,
            token_outage: false,
            refuse_upn_filter: o.refuse_upn_filter,
            read_throttle_limit: o.read_throttle_limit,
            failing_devices: BTreeMap::new(),
            next_link_origin: None,
            lagging_unassign: false,
            client_certificates: Vec::new(),
            federated_subject: o.federated_subject.clone(),
            tenants: o.tenants.iter().cloned().collect(),
        }
    }
}

/// One canned answer for the next action call (after authentication, before every other rule).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scripted {
    pub status: u16,
    /// Raw Retry-After header value to send, if any.
    pub retry_after: Option<String>,
    /// Hold the response this long before answering (to simulate a slow Graph).
    #[serde(default)]
    pub delay_ms: u64,
}

/// What the simulator has seen, for tests to assert on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub action_calls: u64,
    /// When the first action call arrived, in ms since the simulator started: where a bench's
    /// clock starts when it measures the draining, not the clients' start-up.
    #[serde(default)]
    pub first_action_offset_ms: Option<u64>,
    /// Action calls per device id (as sent).
    pub calls_by_device: BTreeMap<String, u64>,
    /// Action responses by status.
    pub responses_by_status: BTreeMap<u16, u64>,
    pub token_requests: u64,
    pub token_failures: u64,
    /// Tokens issued by the credential that earned them: `secret`, `certificate`, `federated`.
    pub tokens_by_credential: BTreeMap<String, u64>,
    /// Tokens issued per tenant (lower-case), as named in the token endpoint's path.
    pub tokens_by_tenant: BTreeMap<String, u64>,
    /// Action calls per tenant (lower-case) of the bearer token they carried.
    pub calls_by_tenant: BTreeMap<String, u64>,
    /// Reads: calls of the device list, whatever their answer.
    pub list_calls: u64,
    /// List responses by status.
    pub list_responses_by_status: BTreeMap<u16, u64>,
    /// The `$filter` of each list call as received (decoded), at most 100 kept.
    pub filters: Vec<String>,
    /// When each list call arrived, in ms since the simulator started (at most 1,000 kept).
    pub list_call_offsets_ms: Vec<u64>,
    /// List calls that arrived before a Retry-After deadline this simulator had given the tenant.
    pub early_reads: u64,
    /// Action calls that arrived before a Retry-After deadline this simulator had given to that tenant.
    pub early_calls: u64,
    /// Action calls that arrived more than 0.1 s after any client of that tenant was told to
    /// wait and before that wait ended (replicas sharing holds send none).
    pub late_calls: u64,
    /// Requests to paths/methods the simulator does not serve, "METHOD path?query", at most 100 kept.
    pub unexpected_requests: Vec<String>,
    /// Most Graph calls (actions and reads) in flight at once.
    pub max_in_flight: u64,
}

/// A running simulator.
pub struct Sim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Sim {
    /// Binds `opts.listen` and serves in a spawned task.
    pub async fn start(opts: SimOptions) -> anyhow::Result<Sim> {
        let shared = Arc::new(Shared::new(&opts)?);
        let listener = TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("graph-sim: cannot listen on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let app = routes::router(shared.clone());
        let stop = shutdown.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        });
        Ok(Sim {
            addr,
            shared,
            shutdown,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Authority for the token endpoint `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/beta", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// When the simulator started: the origin of the offsets in [`Stats`].
    pub fn started(&self) -> std::time::Instant {
        self.shared.cfg.started
    }

    pub fn reset_stats(&self) {
        self.shared.reset_stats();
    }

    /// Changes behaviour at run time.
    pub fn update(&self, f: impl FnOnce(&mut Behaviour)) {
        self.shared.update(f);
    }

    /// Queues scripted answers for the next action calls, consumed in order.
    pub fn push_script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.shared.push_script(answers);
    }

    /// Queues scripted answers for the next list (read) calls, consumed in order.
    pub fn push_read_script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.shared.push_read_script(answers);
    }

    /// The device inventory as it stands (an unassigned device has an empty `userPrincipalName`).
    pub fn devices(&self) -> Vec<Device> {
        self.shared.devices()
    }

    /// Invalidates every issued access token (the next Graph call with one gets 401).
    pub fn revoke_tokens(&self) {
        self.shared.revoke_tokens();
    }

    /// A service-account token from the simulated cluster's OIDC issuer, as Kubernetes projects
    /// it for workload identity; it expires `valid_for_secs` from now (negative: already expired).
    pub fn federated_token(&self, subject: &str, valid_for_secs: i64) -> String {
        self.shared.cfg.app.issuer.token(subject, valid_for_secs)
    }

    /// The latest access tokens issued (up to 100), for tests that must not find them in logs.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.issued_tokens()
    }

    /// The latest client assertions received (up to 100), for the same tests.
    pub fn received_assertions(&self) -> Vec<String> {
        self.shared.received_assertions()
    }

    /// Stops accepting, lets in-flight requests finish (up to 5 s), then stops.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// Entry point of the `graph-sim` subcommand: serves until `shutdown` is cancelled.
pub async fn run(opts: SimOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sim = Sim::start(opts).await?;
    let url = sim.authority();
    println!(
        "graph-sim listening on {url} (authority {url}, graph base {})",
        sim.base_url()
    );
    shutdown.cancelled().await;
    sim.shutdown().await;
    Ok(())
}

fn parse_error_rate(s: &str) -> Result<(u16, f64), String> {
    let (status, ratio) = s
        .split_once('=')
        .ok_or("expected STATUS=RATIO, e.g. 503=0.05")?;
    let status: u16 = status
        .trim()
        .parse()
        .map_err(|_| format!("status {status:?} is not a number"))?;
    if !(400..=599).contains(&status) {
        return Err(format!("status {status} is not an error status (400-599)"));
    }
    let ratio: f64 = ratio
        .trim()
        .parse()
        .map_err(|_| format!("ratio {ratio:?} is not a number"))?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(format!("ratio {ratio} is not between 0 and 1"));
    }
    Ok((status, ratio))
}

fn parse_tenant(s: &str) -> Result<(String, TenantApp), String> {
    let mut parts = s.splitn(3, ',');
    let (Some(tenant), Some(client_id), Some(secret)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("expected TENANT_ID,CLIENT_ID,SECRET".to_owned());
    };
    if !devices::is_guid(tenant) {
        return Err(format!("tenant {tenant:?} is not a GUID"));
    }
    let app = TenantApp {
        client_id: client_id.to_owned(),
        client_secret: secret.to_owned(),
        throttle_limit: None,
    };
    Ok((tenant.to_ascii_lowercase(), app))
}

fn parse_outage(s: &str) -> Result<(f64, f64), String> {
    let (start, end) = s
        .split_once("..")
        .ok_or("expected START..END in seconds, e.g. 10..40")?;
    let secs = |v: &str| {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or(format!("{v:?} is not a number of seconds"))
    };
    let (start, end) = (secs(start)?, secs(end)?);
    if start >= end {
        return Err(format!("outage start {start} is not before its end {end}"));
    }
    Ok((start, end))
}
