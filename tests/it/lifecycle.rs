//! One job's whole life in memory: the executor with fakes of its three ports (Graph, the
//! broker's settlement, the clock) under paused time, so each test runs in milliseconds. Each
//! reads as one of the delivery guarantees of CONTRACT section 6; what only a real broker can
//! show (confirms, redelivery, topology) stays in the other modules.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::json;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use unassign_worker::{
    config::{Credentials, TenantName, TenantProfile},
    contract::{Carried, Limits, RetryState, StateKeys, TenantId, TraceContext},
    credential::{ClientSecret, Credential},
    executor,
    http::Health,
    job::{Call, HandBack, Policy, Settlement},
    metrics::Metrics,
    observe::Observer,
    ports::{Clock, Graph, Message, NotSettled, Settle},
    retry::{self, Answer, Reply, Response},
    session::{CallSlots, Context, Session},
    tenant::{Tenant, Tenants},
    throttle::{Budget, GateConfig},
};

const A: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
const B: &str = "8b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
const BASE: &str = "https://graph.example/beta/";

/// Graph, answering from a script; every call is recorded with its (virtual) time.
#[derive(Default)]
struct FakeGraph {
    script: Mutex<VecDeque<Reply>>,
    calls: Mutex<Vec<(Instant, Call)>>,
}

impl FakeGraph {
    fn answering(replies: impl IntoIterator<Item = Reply>) -> Self {
        Self {
            script: Mutex::new(replies.into_iter().collect()),
            calls: Mutex::default(),
        }
    }

    fn calls(&self) -> Vec<(Instant, Call)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Graph for FakeGraph {
    type Token = ();

    async fn token(&self, _: &Tenant) -> Result<(), String> {
        Ok(())
    }

    fn invalidate(&self, _: &Tenant, _: &()) {}

    async fn call(&self, _: &(), call: &Call) -> Reply {
        self.calls
            .lock()
            .unwrap()
            .push((Instant::now(), call.clone()));
        let next = self.script.lock().unwrap().pop_front();
        next.unwrap_or_else(|| status(500, None))
    }
}

/// The broker's side: what was published, acked or requeued, in order.
#[derive(Default, Clone)]
struct FakeSettle {
    log: Arc<Mutex<Vec<String>>>,
    published: Arc<Mutex<Vec<Settlement>>>,
    /// Every publish is refused (a queue at its length limit, say).
    refuse: bool,
}

impl FakeSettle {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn settlement(&self) -> Settlement {
        self.published
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("published")
    }
}

impl Settle for FakeSettle {
    async fn publish(&self, s: &Settlement, _: Option<&TraceContext>) -> Result<(), NotSettled> {
        let what = match s {
            Settlement::Finish(_) => "publish outcome",
            Settlement::HandBack(_) => "publish hand-back",
        };
        self.log.lock().unwrap().push(what.to_owned());
        if self.refuse {
            return Err(NotSettled("nack".to_owned()));
        }
        self.published.lock().unwrap().push(s.clone());
        Ok(())
    }

    async fn ack(&self) -> bool {
        self.log.lock().unwrap().push("ack".to_owned());
        true
    }

    async fn requeue(&self) {
        self.log.lock().unwrap().push("requeue".to_owned());
    }

    fn channel_gone(&self) -> bool {
        false
    }
}

/// Wall time that moves with tokio's paused clock; no jitter.
struct TestClock {
    start: OffsetDateTime,
    t0: Instant,
}

impl Clock for TestClock {
    fn now(&self) -> OffsetDateTime {
        self.start + self.t0.elapsed()
    }

    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }

    fn jitter(&self) -> f64 {
        0.5
    }
}

fn status(code: u16, retry_after: Option<&str>) -> Reply {
    Reply {
        client_request_id: format!("c-{code}"),
        answer: Answer::Answered(Response {
            status: code,
            retry_after: retry_after.map(str::to_owned),
            ..Response::default()
        }),
    }
}

fn page(ids: &[&str], next: Option<&str>) -> Reply {
    let value: Vec<_> = ids
        .iter()
        .map(|id| json!({"id": id, "userPrincipalName": "leaver@contoso.example"}))
        .collect();
    let mut body = json!({ "value": value });
    if let Some(next) = next {
        body["@odata.nextLink"] = next.into();
    }
    Reply {
        answer: Answer::Answered(Response {
            status: 200,
            body: body.to_string().into_bytes(),
            ..Response::default()
        }),
        ..status(200, None)
    }
}

fn profile(name: TenantName, tenant_id: &str) -> TenantProfile {
    let gate = |budget| GateConfig {
        max_per_second: 0.0,
        adaptive: true,
        budget,
    };
    TenantProfile {
        name,
        credentials: Credentials {
            // Nothing listens there: a probe after a pause finds no token.
            authority_host: "http://127.0.0.1:9/".parse().unwrap(),
            tenant_id: TenantId::parse(tenant_id).unwrap(),
            client_id: "app".to_owned(),
            credential: Credential::Secret(ClientSecret::Value("s".to_owned().into())),
            scope: format!("{BASE}.default"),
        },
        gate: gate(Budget::Writes),
        read_gate: gate(Budget::Reads),
    }
}

struct Stage {
    ctx: Context<FakeGraph, TestClock>,
    metrics: Arc<Metrics>,
    keys: Arc<StateKeys>,
}

fn build(graph: FakeGraph, profiles: Vec<TenantProfile>) -> Stage {
    let metrics = Arc::new(Metrics::new());
    let observe = Arc::new(Observer {
        metrics: metrics.clone(),
        health: Arc::new(Health::default()),
    });
    let keys = Arc::new(StateKeys::derived(b"lifecycle"));
    let tenants = Tenants::new(profiles, &reqwest::Client::new(), &metrics, observe.clone());
    let ctx = Context {
        graph,
        clock: TestClock {
            start: OffsetDateTime::now_utc(),
            t0: Instant::now(),
        },
        tenants: Arc::new(tenants),
        graph_slots: CallSlots::new(4),
        observe,
        policy: Policy {
            retry: retry::Policy {
                max_attempts: 5,
                base_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(300),
                max_elapsed: Duration::from_secs(86_400),
            },
            park_after: Duration::from_secs(5),
            tiers: vec![4, 8, 16, 32, 64],
            graph_base: BASE.parse().unwrap(),
        },
        state_keys: keys.clone(),
        state_limits: Limits {
            max_attempts: 5,
            longest_wait: Duration::from_secs(3600),
        },
    };
    Stage { ctx, metrics, keys }
}

fn one_tenant(graph: FakeGraph) -> Stage {
    build(
        graph,
        vec![profile(
            TenantName::default_profile(),
            "11111111-1111-1111-1111-111111111111",
        )],
    )
}

fn message(body: serde_json::Value) -> Message {
    Message {
        body: body.to_string().into_bytes(),
        message_id: Some("m-1".to_owned()),
        ..Message::default()
    }
}

fn device_request() -> Message {
    message(json!({"request_id": "r-1", "device_id": A}))
}

async fn run(stage: &Stage, session: &Session, message: Message) -> FakeSettle {
    let settle = FakeSettle::default();
    executor::handle(&stage.ctx, session, message, settle.clone()).await;
    settle
}

fn outcome(settle: &FakeSettle) -> Box<unassign_worker::contract::Outcome> {
    match settle.settlement() {
        Settlement::Finish(outcome) => outcome,
        other => panic!("expected an outcome, got {other:?}"),
    }
}

fn handed_back(settle: &FakeSettle) -> HandBack {
    match settle.settlement() {
        Settlement::HandBack(back) => back,
        other => panic!("expected a hand-back, got {other:?}"),
    }
}

/// Item 6: a 429 with `Retry-After: 2.128` at attempt 3 is waited out, to the millisecond at
/// least, and the fourth call succeeds; then the outcome is published before the ack (item 1).
#[tokio::test(start_paused = true)]
async fn a_fractional_retry_after_at_attempt_three_is_waited_out_then_the_call_succeeds() {
    let graph = FakeGraph::answering([
        status(503, None),
        status(503, None),
        status(429, Some("2.128")),
        status(204, None),
    ]);
    let stage = one_tenant(graph);
    let settle = run(&stage, &Session::default(), device_request()).await;
    let outcome = outcome(&settle);
    assert_eq!((outcome.attempts, outcome.error), (4, None));
    let calls = stage.ctx.graph.calls();
    let waited = calls[3].0 - calls[2].0;
    assert!(waited >= Duration::from_millis(2128), "{waited:?}");
    assert_eq!(
        settle.log(),
        ["publish outcome", "ack"],
        "published, then acked"
    );
    let metrics = stage.metrics.render();
    assert!(metrics.contains("unassign_retries_total{reason=\"throttled\",tenant=\"default\"} 1"));
    assert!(metrics.contains("unassign_jobs_total{outcome=\"succeeded\",tenant=\"default\"} 1"));
}

/// Item 4: SIGTERM during the wait hands the job back with its attempts and the remaining
/// hold in its signed state, and never calls Graph again.
#[tokio::test(start_paused = true)]
async fn sigterm_during_the_wait_hands_back_the_remaining_hold_in_the_signed_state() {
    let stage = one_tenant(FakeGraph::answering([status(429, Some("4"))]));
    let session = Session::new(CancellationToken::new());
    let started = stage.ctx.clock.now();
    let job = run(&stage, &session, device_request());
    let sigterm = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        session.stop.cancel();
    };
    let (settle, ()) = tokio::join!(job, sigterm);
    let back = handed_back(&settle);
    assert_eq!(back.tier, None, "3 s left: straight back to the queue");
    let retry_at = back.carried.retry.retry_at.expect("the wait is owed");
    let owed = retry_at - started;
    assert!(owed >= time::Duration::seconds(4), "{owed}");
    assert_eq!(back.carried.retry.attempts, 1);
    // What the broker receives verifies and reads back as the same state.
    let body = device_request().body;
    let signed = stage.keys.sign(&back.carried, &body, Some("m-1"));
    let limits = stage.ctx.state_limits;
    let (read, rejected) = stage
        .keys
        .read(&signed, &body, Some("m-1"), started, limits);
    assert_eq!((read.retry, rejected), (back.carried.retry, None));
    assert_eq!(stage.ctx.graph.calls().len(), 1);
    assert_eq!(settle.log(), ["publish hand-back", "ack"]);
}

/// Item 1: an outcome whose publish is never confirmed is never acked: after holding the
/// delivery for the longest hold, it is given back to the broker.
#[tokio::test(start_paused = true)]
async fn a_failed_confirm_never_acks() {
    let stage = one_tenant(FakeGraph::answering([status(204, None)]));
    let settle = FakeSettle {
        refuse: true,
        ..FakeSettle::default()
    };
    executor::handle(
        &stage.ctx,
        &Session::default(),
        device_request(),
        settle.clone(),
    )
    .await;
    let log = settle.log();
    assert!(!log.contains(&"ack".to_owned()), "{log:?}");
    assert_eq!(log.last().map(String::as_str), Some("requeue"));
    assert!(
        log.len() > 2,
        "retried before giving the delivery back: {log:?}"
    );
    assert_eq!(
        stage.ctx.graph.calls().len(),
        1,
        "Graph is not called again"
    );
}

/// Item 7: a state that does not verify — forged, or signed for another body — is ignored and
/// the request starts afresh; no state at all is a fresh start too.
#[tokio::test(start_paused = true)]
async fn a_forged_or_absent_state_starts_afresh() {
    let forged = Carried {
        retry: RetryState {
            attempts: 4,
            ..RetryState::fresh(OffsetDateTime::now_utc())
        },
        progress: Default::default(),
    };
    let mut request = device_request();
    request.headers =
        StateKeys::derived(b"not the worker's").sign(&forged, &request.body, Some("m-1"));
    let stage = one_tenant(FakeGraph::answering([status(204, None), status(204, None)]));
    let settle = run(&stage, &Session::default(), request).await;
    assert_eq!(
        outcome(&settle).attempts,
        1,
        "the forged attempts were ignored"
    );
    assert!(
        stage
            .metrics
            .render()
            .contains("unassign_state_rejected_total{reason=\"bad_mac\"} 1")
    );
    let settle = run(&stage, &Session::default(), device_request()).await;
    assert_eq!(outcome(&settle).attempts, 1);
    let metrics = stage.metrics.render();
    assert!(
        metrics.contains("unassign_state_rejected_total{reason=\"unsigned\"} 0"),
        "no state is no forgery"
    );
}

/// A user's devices are listed page by page, each page with a retry budget of its own, and
/// each device then unassigned in id order; reads are not attempts.
#[tokio::test(start_paused = true)]
async fn lookups_follow_every_page_each_with_its_own_retry_budget() {
    let next = format!("{BASE}deviceManagement/windowsAutopilotDeviceIdentities?$skiptoken=2");
    let mut script = Vec::new();
    for page_reply in [page(&[B], Some(&next)), page(&[A], None)] {
        script.extend((0..4).map(|_| status(503, None)));
        script.push(page_reply);
    }
    script.extend([status(204, None), status(204, None)]);
    let stage = one_tenant(FakeGraph::answering(script));
    let request = json!({"request_id": "u-1", "user_principal_name": "leaver@contoso.example"});
    let settle = run(&stage, &Session::default(), message(request)).await;
    let outcome = outcome(&settle);
    assert_eq!((outcome.attempts, &outcome.error), (2, &None));
    let devices: Vec<_> = outcome
        .devices
        .iter()
        .flatten()
        .map(|d| d.device_id.clone())
        .collect();
    assert_eq!(devices, [A, B]);
    let calls = stage.ctx.graph.calls();
    assert!(matches!(&calls[9].1, Call::List(url) if url.as_str() == next));
}

/// Item 3: credential trouble pauses the tenant, never dead-letters: its job goes straight back
/// to the queue when it was the only tenant (the session pauses), and is parked until the
/// tenant's next probe while another tenant still works.
#[tokio::test(start_paused = true)]
async fn a_paused_tenant_hands_its_jobs_back() {
    let stage = one_tenant(FakeGraph::answering([status(403, None)]));
    let session = Session::default();
    let settle = run(&stage, &session, device_request()).await;
    let back = handed_back(&settle);
    assert_eq!((back.tier, back.carried.retry.attempts), (None, 0));
    assert_eq!(session.pause_reason(), Some(retry::PauseReason::Forbidden));
    assert!(
        stage
            .metrics
            .render()
            .contains("unassign_tenant_paused{tenant=\"default\"} 1")
    );
    stage.ctx.tenants.stop_probing();

    let contoso = "22222222-2222-2222-2222-222222222222";
    let profiles = vec![
        profile(
            TenantName::default_profile(),
            "11111111-1111-1111-1111-111111111111",
        ),
        profile(TenantName::try_from("contoso".to_owned()).unwrap(), contoso),
    ];
    let stage = build(FakeGraph::answering([status(403, None)]), profiles);
    let session = Session::default();
    let request = json!({"request_id": "r-2", "device_id": A, "tenant_id": contoso});
    let back = handed_back(&run(&stage, &session, message(request)).await);
    assert!(back.tier.is_some(), "parked until the probe: {back:?}");
    assert_eq!(session.pause_reason(), None, "the other tenant works on");
    stage.ctx.tenants.stop_probing();
}
