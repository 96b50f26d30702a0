//! One job: a delivery from the requests queue to its settlement. This is the one place that
//! orders the steps — parse, wait on the tenant's gate, call Graph, decide, and then publish the
//! outcome (and dead letter) with confirms *before* acking (CONTRACT section 6). Requests by
//! serial number or user first look the devices up ([`targets`]).

mod targets;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use lapin::{
    BasicProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use time::OffsetDateTime;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};
use url::Url;

use crate::{
    amqp::{PublishError, Publisher, delay},
    auth::AccessToken,
    config::{AmqpSettings, TenantName},
    contract::{
        self, Carried, DeviceId, ErrorKind, Failure, Invalid, Limits, Outcome, Progress, Request,
        RetryState, StateKeys, Target, TraceContext, carried_headers, carried_properties,
    },
    graph::{GraphClient, Reply},
    lookup::Lookup,
    metrics::{Metrics, RetryReason},
    retry::{self, Attempt, Decision, PauseReason, Policy},
    tenant::{Tenant, Tenants},
    throttle::{Gate, Ticket},
};

/// Longest a delivery is held while its outcome cannot be published; well below RabbitMQ's
/// 30-minute consumer timeout.
const MAX_PUBLISH_HOLD: Duration = Duration::from_secs(600);
/// Added to a paused tenant's tier-long wait, so the time it takes to hand the job back does
/// not make it fit only the next shorter tier.
const PARK_SLACK: Duration = Duration::from_millis(250);

/// What every job shares for the life of the worker.
pub struct Context {
    pub amqp: AmqpSettings,
    pub graph: GraphClient,
    /// The tenant profiles; a request naming a tenant none of them has is invalid.
    pub tenants: Arc<Tenants>,
    pub graph_slots: CallSlots,
    pub metrics: Arc<Metrics>,
    pub policy: Policy,
    /// Waits longer than this go through the delay queues (`retry.park_after_secs`).
    pub park_after: Duration,
    /// `unassign-worker/<instance>`, the events' `source`.
    pub source: String,
    /// Sign the state a job carries in headers, and tell it from a forgery.
    pub state_keys: StateKeys,
    /// What a carried state is clamped to.
    pub state_limits: Limits,
}

/// Bounds Graph calls in flight (`worker.concurrency`).
pub struct CallSlots {
    semaphore: Semaphore,
    size: u32,
}

impl CallSlots {
    pub fn new(size: usize) -> Self {
        Self {
            semaphore: Semaphore::new(size),
            size: u32::try_from(size).unwrap_or(u32::MAX),
        }
    }

    async fn acquire(&self) -> SemaphorePermit<'_> {
        self.semaphore
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    /// Waits until no call is in flight. Jobs that stop must not leave while an answer is still
    /// on its way: a 429 in it would extend the tenant's hold that they carry away.
    async fn settled(&self) {
        let _all = self.semaphore.acquire_many(self.size).await;
    }
}

impl Context {
    /// Whether a wait of `wait` goes through a delay queue rather than holding the delivery.
    fn parks(&self, wait: Duration) -> bool {
        wait > self.park_after && delay::tier_for(&self.amqp, wait).is_some()
    }

    /// What a paused tenant's job owes when handed back: at least until the tenant's next
    /// probe, and long enough to be parked in a delay queue — rounded up to a whole tier, so the
    /// job neither comes back to spin nor holds its delivery waiting out a remainder.
    fn paused_wait(&self, until_probe: Duration) -> Duration {
        let parked = self.park_after + Duration::from_millis(1);
        delay::tier_at_least(&self.amqp, until_probe.max(parked)) + PARK_SLACK
    }
}

/// What a job needs from the consume session that delivered it.
pub struct Session {
    pub publisher: Publisher,
    /// Cancelled on shutdown, pause or connection loss: stop waiting and hand the job back.
    pub stop: CancellationToken,
    pause: Mutex<Option<PauseReason>>,
}

impl Session {
    pub fn new(publisher: Publisher, stop: CancellationToken) -> Self {
        Self {
            publisher,
            stop,
            pause: Mutex::new(None),
        }
    }

    /// Asks the worker to pause consumption; every job in this session then hands itself back.
    pub fn pause(&self, reason: PauseReason) {
        self.pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
        self.stop.cancel();
    }

    pub fn pause_reason(&self) -> Option<PauseReason> {
        *self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a job ends before settlement.
enum Step {
    /// A final outcome: publish the event (and dead letter), then ack.
    Done(Box<Outcome>),
    /// Not finished: back to the queue — or a delay queue — with its state (and, for a serial
    /// or user request, its progress), then ack.
    HandBack(RetryState, Option<Progress>),
}

/// Handles one delivery to the end. Never panics on input; every path settles the delivery or
/// leaves it unacked for the broker to redeliver.
pub async fn handle(ctx: &Context, session: &Session, delivery: Delivery) {
    ctx.metrics.inflight_inc();
    let _inflight = scopeguard(|| ctx.metrics.inflight_dec());
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let message_id = message_id(&delivery);
    let Carried {
        retry: state,
        progress,
    } = carried_state(ctx, &headers, &delivery.data, message_id);
    // The job is a span of its own in the producer's trace, if it sent a valid one.
    let trace = contract::header_str(&headers, contract::headers::TRACEPARENT)
        .and_then(|tp| TraceContext::parse(&tp))
        .map(|parent| parent.child());
    let span = tracing::info_span!(
        "job",
        request_id = Empty,
        device_id = Empty,
        tenant = Empty,
        attempt = state.attempts,
        graph_request_id = Empty,
        trace_id = trace.as_ref().map(|t| t.trace_id.as_str()),
        span_id = trace.as_ref().map(|t| t.span_id.as_str()),
    );
    // Metrics name the profile the request selected, never a tenant id it sent.
    let mut profile = TenantName::unknown();
    let step = match contract::parse_request(&delivery.data, message_id) {
        Ok(request) => {
            span.record("request_id", request.request_id.as_str());
            if let Some(id) = request.device_id() {
                span.record("device_id", id.as_str());
            }
            match ctx.tenants.select(request.tenant_id.as_deref()) {
                Some(tenant) => {
                    span.record("tenant", tenant.name.as_str());
                    profile = tenant.name.clone();
                    let job = Job::new(&request, state, progress, tenant);
                    process(ctx, session, job).instrument(span.clone()).await
                }
                None => unknown_tenant(&request, state),
            }
        }
        Err(invalid) => Step::Done(Box::new(invalid_outcome(invalid, state))),
    };
    settle(ctx, session, &delivery, step, trace.as_ref(), &profile)
        .instrument(span)
        .await;
}

/// The state the delivery carries, if it verifies (CONTRACT section 6, item 7): anything else —
/// forged, from another body, from a retired key — is ignored, and the request starts afresh.
fn carried_state(
    ctx: &Context,
    headers: &FieldTable,
    body: &[u8],
    message_id: Option<&str>,
) -> Carried {
    let now = OffsetDateTime::now_utc();
    // An oversized body is refused unparsed; its state does not matter and is not hashed.
    if body.len() > contract::MAX_BODY_BYTES {
        return Carried::fresh(now);
    }
    let (carried, rejected) = ctx
        .state_keys
        .read(headers, body, message_id, now, ctx.state_limits);
    if let Some(why) = rejected {
        tracing::warn!(
            reason = why.as_str(),
            "state headers that do not verify were ignored; the request starts afresh"
        );
        ctx.metrics.state_rejected(why);
    }
    carried
}

/// A request whose `tenant_id` no profile has: invalid, before any call.
fn unknown_tenant(request: &Request, state: RetryState) -> Step {
    let invalid = Invalid {
        request_id: Some(request.request_id.clone()),
        device_id: request.device_id().cloned(),
        requested_by: request.requested_by.clone(),
        reason: request.reason.clone(),
        message: "tenant_id names no configured tenant".to_owned(),
    };
    Step::Done(Box::new(invalid_outcome(invalid, state)))
}

/// The Graph part of a job: call, decide, wait, call again.
async fn process(ctx: &Context, session: &Session, mut job: Job<'_>) -> Step {
    let request = job.request;
    let lookup = match &request.target {
        Target::Device(id) => {
            return match call_until_decided(ctx, session, &mut job, Call::Unassign(id)).await {
                Ended::Succeeded(reply) => job.finish(None, Some(&reply)),
                Ended::Failed(failure, reply) => job.finish(Some(failure), reply.as_ref()),
                Ended::HandBack(step) => step,
            };
        }
        Target::Serial(serial) => Lookup::Serial(serial),
        Target::User(upn) => Lookup::User(upn),
    };
    targets::unassign_looked_up(ctx, session, job, lookup).await
}

/// A request in progress, its durable state, and the tenant profile it selected.
struct Job<'a> {
    request: &'a Request,
    tenant: &'a Arc<Tenant>,
    state: RetryState,
    /// Devices done and calls on the one in progress (serial and user requests).
    progress: Progress,
    /// `state.attempts` when the device in progress was started: its own retry budget.
    base: u32,
    /// Reads (list calls) made for the page in progress: its own retry budget.
    reads: u32,
}

impl<'a> Job<'a> {
    fn new(
        request: &'a Request,
        state: RetryState,
        progress: Progress,
        tenant: &'a Arc<Tenant>,
    ) -> Self {
        let spent = progress.device_calls.unwrap_or(state.attempts);
        Self {
            request,
            tenant,
            base: state.attempts.saturating_sub(spent),
            state,
            progress,
            reads: 0,
        }
    }

    /// Calls made so far on what `call` is about.
    fn calls(&self, call: Call<'_>) -> u32 {
        match call {
            Call::Unassign(_) => self.state.attempts.saturating_sub(self.base),
            Call::List(_) => self.reads,
        }
    }

    fn outcome(&self, error: Option<Failure>, reply: Option<&Reply>) -> Outcome {
        Outcome {
            request_id: self.request.request_id.clone(),
            device_id: self.request.device_id().cloned(),
            requested_by: self.request.requested_by.clone(),
            reason: self.request.reason.clone(),
            attempts: self.state.attempts,
            error,
            graph_request_id: reply.and_then(|r| r.response()?.request_id.clone()),
            client_request_id: reply.map(|r| r.client_request_id.clone()),
            received_at: self.state.first_received_at,
            completed_at: OffsetDateTime::now_utc(),
            devices: None,
            message: None,
        }
    }

    /// Not finished: back to the queue with its state and the wait it still owes — at least
    /// what is left of the tenant's Retry-After hold, which lives in this process only, so that
    /// no worker that picks the job up calls before it ends. A paused tenant's job, while the
    /// session goes on for the other tenants, is parked until the tenant's next probe (the
    /// tenant is read before the session: see [`Tenants::pause`]).
    fn hand_back(&self, ctx: &Context, session: &Session, wait: Option<Duration>) -> Step {
        let mut wait = wait.max(self.tenant.gate.held_for());
        if let Some(until_probe) = self.tenant.paused_for()
            && !session.stop.is_cancelled()
        {
            wait = wait.max(Some(ctx.paused_wait(until_probe)));
        }
        let retry_at = wait.map(|w| at_most_after(OffsetDateTime::now_utc(), w));
        let progress = self.request.device_id().is_none().then(|| Progress {
            device_calls: Some(self.state.attempts.saturating_sub(self.base)),
            ..self.progress.clone()
        });
        Step::HandBack(
            RetryState {
                retry_at,
                ..self.state
            },
            progress,
        )
    }

    fn finish(&self, error: Option<Failure>, reply: Option<&Reply>) -> Step {
        Step::Done(Box::new(self.outcome(error, reply)))
    }

    fn elapsed(&self) -> Duration {
        (OffsetDateTime::now_utc() - self.state.first_received_at)
            .try_into()
            .unwrap_or_default()
    }

    /// Time left before `not_after`; zero once it has passed.
    fn until_deadline(&self) -> Option<Duration> {
        let not_after = self.request.not_after?;
        Some(
            (not_after - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// Gives up for good after `calls`, saying why and what Graph said last.
    fn give_up(&self, kind: ErrorKind, calls: u32, last: Option<&Reply>) -> Failure {
        let why = match kind {
            ErrorKind::DeadlineExceeded => "not_after passed",
            ErrorKind::RetriesExhausted => "retry budget spent",
            _ => "failed",
        };
        let message = match last {
            Some(reply) => format!(
                "{why} after {calls} call(s) in {:.0?}; last: {}",
                self.elapsed(),
                reply.describe()
            ),
            None => format!("{why} before any call was made"),
        };
        Failure {
            message,
            ..failure_from(kind, last)
        }
    }
}

/// A Graph call a job makes: the action (a write) or a page of the device list (a read).
#[derive(Debug, Clone, Copy)]
enum Call<'a> {
    Unassign(&'a DeviceId),
    List(&'a Url),
}

impl Call<'_> {
    /// Writes and reads are budgeted apart.
    fn gate(self, tenant: &Tenant) -> &Arc<Gate> {
        match self {
            Call::Unassign(_) => &tenant.gate,
            Call::List(_) => &tenant.read_gate,
        }
    }
}

/// How a call, with its retries, ended.
enum Ended {
    Succeeded(Reply),
    /// For good: the failure, and Graph's last answer if there was one.
    Failed(Failure, Option<Reply>),
    /// Paused, parked or stopped: the job goes back to the queue.
    HandBack(Step),
}

/// Graph's status and error code, if an answer was had.
fn failure_from(kind: ErrorKind, reply: Option<&Reply>) -> Failure {
    let response = reply.and_then(Reply::response);
    Failure {
        kind,
        http_status: response.map(|r| r.status),
        graph_code: response.and_then(|r| r.error.as_ref()?.code.clone()),
        message: reply.map(Reply::describe).unwrap_or_default(),
    }
}

/// Makes `call` until Graph's answer is final, waiting out retries (or handing the job back
/// for long ones), refreshing the token once on a 401, pausing on credential trouble.
async fn call_until_decided(
    ctx: &Context,
    session: &Session,
    job: &mut Job<'_>,
    call: Call<'_>,
) -> Ended {
    let mut last: Option<Reply> = None;
    let mut token_refreshed = false;
    if let Some(wait) = job.state.retry_at.and_then(until)
        && let Some(step) = wait_or_hand_back(ctx, session, job, wait).await
    {
        return Ended::HandBack(step);
    }
    let gate = call.gate(job.tenant);
    loop {
        if job.until_deadline() == Some(Duration::ZERO) {
            let failure = job.give_up(ErrorKind::DeadlineExceeded, job.calls(call), last.as_ref());
            return Ended::Failed(failure, last);
        }
        let (reply, token, ticket) = match send(ctx, session, job, call).await {
            Called::Sent(reply, token, ticket) => (reply, token, ticket),
            Called::HandBack(step) => return Ended::HandBack(step),
        };
        let decision = retry::decide(
            &reply.answer(),
            Attempt {
                calls: job.calls(call),
                elapsed: job.elapsed(),
                until_deadline: job.until_deadline(),
                token_refreshed,
            },
            &ctx.policy,
            SystemTime::now(),
            rand::random(),
        );
        token_refreshed = false;
        match decision {
            Decision::Succeed => {
                gate.succeeded();
                if let Call::Unassign(device) = call {
                    tracing::info!(attempts = job.state.attempts, device_id = %device, "unassigned");
                }
                return Ended::Succeeded(reply);
            }
            Decision::Fail(kind @ (ErrorKind::RetriesExhausted | ErrorKind::DeadlineExceeded)) => {
                let failure = job.give_up(kind, job.calls(call), Some(&reply));
                return Ended::Failed(failure, Some(reply));
            }
            Decision::Fail(kind) => {
                return Ended::Failed(failure_from(kind, Some(&reply)), Some(reply));
            }
            Decision::RefreshToken => {
                tracing::info!("graph answered 401; fetching a fresh token");
                job.tenant.tokens.invalidate(&token);
                token_refreshed = true;
            }
            Decision::Pause(reason) => {
                ctx.tenants.pause(job.tenant, reason, session);
                return Ended::HandBack(job.hand_back(ctx, session, None));
            }
            Decision::Retry {
                delay,
                reason,
                hold_tenant,
            } => {
                ctx.metrics.retry(&job.tenant.name, reason);
                if reason == RetryReason::Throttled {
                    gate.throttled(ticket);
                }
                if let Some(hold) = hold_tenant {
                    job.tenant.hold(hold);
                }
                tracing::warn!(
                    reason = reason.as_str(),
                    delay_ms = delay.as_millis() as u64,
                    answer = %reply.describe(),
                    "retrying"
                );
                if let Some(step) = wait_or_hand_back(ctx, session, job, delay).await {
                    return Ended::HandBack(step);
                }
            }
        }
        last = Some(reply);
    }
}

/// How an attempt to call Graph ended.
enum Called {
    Sent(Reply, AccessToken, Ticket),
    /// Not sent: the session stopped, the tenant is paused or no token could be had (which
    /// pauses it), or the tenant is held back for longer than is worth waiting with the
    /// delivery in hand.
    HandBack(Step),
}

/// One Graph call, after a token, the tenant's gate (for writes or reads) and the concurrency
/// slot.
async fn send(ctx: &Context, session: &Session, job: &mut Job<'_>, call: Call<'_>) -> Called {
    let tenant = job.tenant;
    let Some(paused) = tenant.running_signal() else {
        return Called::HandBack(job.hand_back(ctx, session, None));
    };
    let gate = call.gate(tenant);
    if let Some(held) = gate.held_for().filter(|held| ctx.parks(*held)) {
        return Called::HandBack(job.hand_back(ctx, session, Some(held)));
    }
    // The token first, holding neither a slot nor the tenant's turn: a token endpoint that hangs
    // (up to `graph.timeout_secs`) must not keep the other tenants' calls from their slots.
    let token = match unless_stopped(ctx, session, job, &paused, tenant.tokens.token()).await {
        Ok(Ok(token)) => token,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "no access token");
            ctx.tenants.pause(tenant, PauseReason::NoToken, session);
            return Called::HandBack(job.hand_back(ctx, session, None));
        }
        Err(step) => return Called::HandBack(step),
    };
    let admitted = gate.admit_with(|| ctx.graph_slots.acquire());
    let (_permit, ticket) = match unless_stopped(ctx, session, job, &paused, admitted).await {
        Ok(admitted) => admitted,
        Err(step) => return Called::HandBack(step),
    };
    // Once sent, a call is seen through: aborting it would leave Graph's side unknown.
    let span = tracing::Span::current();
    let reply = match call {
        Call::Unassign(device) => ctx.graph.unassign(&tenant.name, &token, device).await,
        Call::List(url) => ctx.graph.list(&tenant.name, &token, url.clone()).await,
    };
    if retry::spends_attempt(&reply.answer()) {
        match call {
            Call::Unassign(_) => {
                job.state.attempts += 1;
                span.record("attempt", job.state.attempts);
            }
            Call::List(_) => job.reads += 1,
        }
    }
    let response = reply.response();
    if let Some(id) = response.and_then(|r| r.request_id.as_deref()) {
        span.record("graph_request_id", id);
    }
    tracing::debug!(
        client_request_id = %reply.client_request_id,
        activity_id = response.and_then(|r| r.error.as_ref()?.activity_id.as_deref()),
        answer = %reply.describe(),
        "graph call"
    );
    Called::Sent(reply, token, ticket)
}

/// Awaits `f` — a token, the tenant's turn — unless the session stops or the tenant pauses
/// first: then the job is handed back, once the calls in flight have answered if the session
/// stopped (an answer on its way may extend the tenant's hold the job carries away).
async fn unless_stopped<T>(
    ctx: &Context,
    session: &Session,
    job: &Job<'_>,
    paused: &CancellationToken,
    f: impl Future<Output = T>,
) -> Result<T, Step> {
    tokio::select! {
        biased;
        _ = session.stop.cancelled() => {
            ctx.graph_slots.settled().await;
            Err(job.hand_back(ctx, session, None))
        }
        _ = paused.cancelled() => Err(job.hand_back(ctx, session, None)),
        out = f => Ok(out),
    }
}

/// Waits `delay` holding the delivery — unless it is long enough to go through the delay
/// queues, or the session stops: then the job is handed back with the wait still owed.
/// `None` means "call again".
async fn wait_or_hand_back(
    ctx: &Context,
    session: &Session,
    job: &mut Job<'_>,
    delay: Duration,
) -> Option<Step> {
    if ctx.parks(delay) {
        return Some(job.hand_back(ctx, session, Some(delay)));
    }
    let retry_at = at_most_after(OffsetDateTime::now_utc(), delay);
    let Some(paused) = job.tenant.running_signal() else {
        return Some(job.hand_back(ctx, session, until(retry_at)));
    };
    let slept = tokio::select! {
        biased;
        _ = paused.cancelled() => false,
        slept = sleep_unless_stopped(delay, &session.stop) => slept,
    };
    if !slept {
        if session.stop.is_cancelled() {
            ctx.graph_slots.settled().await;
        }
        return Some(job.hand_back(ctx, session, until(retry_at)));
    }
    job.state.retry_at = None;
    None
}

/// `now + wait`, saturating instead of overflowing the calendar.
fn at_most_after(now: OffsetDateTime, wait: Duration) -> OffsetDateTime {
    time::Duration::try_from(wait)
        .ok()
        .and_then(|w| now.checked_add(w))
        .unwrap_or(OffsetDateTime::new_utc(
            time::Date::MAX,
            time::Time::MIDNIGHT,
        ))
}

fn until(at: OffsetDateTime) -> Option<Duration> {
    let left = at - OffsetDateTime::now_utc();
    left.is_positive()
        .then(|| left.try_into().unwrap_or_default())
}

fn invalid_outcome(invalid: Invalid, state: RetryState) -> Outcome {
    tracing::warn!(request_id = invalid.request_id.as_deref(), reason = %invalid.message, "invalid request");
    Outcome {
        request_id: invalid.request_id.unwrap_or_default(),
        device_id: invalid.device_id,
        requested_by: invalid.requested_by,
        reason: invalid.reason,
        attempts: state.attempts,
        error: Some(Failure::new(ErrorKind::InvalidRequest, invalid.message)),
        graph_request_id: None,
        client_request_id: None,
        received_at: state.first_received_at,
        completed_at: OffsetDateTime::now_utc(),
        devices: None,
        message: None,
    }
}

/// Publishes what the step calls for, with confirms, and acks only once all are confirmed.
/// A refused publish (nack, unroutable) is retried with backoff while the delivery is held —
/// Graph is not called again and the broker's delivery count is not spent; when the session
/// stops or the hold is too long, the delivery is requeued. On a dead channel nothing can be
/// settled and the broker requeues the delivery by itself. Nothing is lost either way.
async fn settle(
    ctx: &Context,
    session: &Session,
    delivery: &Delivery,
    step: Step,
    trace: Option<&TraceContext>,
    tenant: &TenantName,
) {
    let event_id = uuid::Uuid::new_v4().to_string();
    let held_since = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        let published = match &step {
            Step::Done(outcome) => {
                publish_outcome(ctx, session, delivery, outcome, &event_id, trace).await
            }
            Step::HandBack(state, progress) => {
                hand_back(ctx, session, delivery, state, progress.as_ref()).await
            }
        };
        let error = match published {
            Ok(()) => break,
            Err(e) => e,
        };
        // Only the delivery's own channel going (the connection's, or the consume channel's)
        // hands it back to the broker; a failed publish channel is reopened by the next try.
        if delivery.acker.poisoned() {
            tracing::warn!(error = %error, "the delivery's channel is gone; the broker will redeliver");
            return;
        }
        tracing::warn!(error = %error, retry_in = ?backoff, "publish not confirmed; holding the request");
        let give_back = held_since.elapsed() + backoff > MAX_PUBLISH_HOLD;
        if give_back || !sleep_unless_stopped(backoff, &session.stop).await {
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            let _ = delivery.acker.nack(requeue).await;
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    if !acked(delivery.acker.ack(BasicAckOptions::default()).await) {
        return;
    }
    if let Step::Done(outcome) = step {
        let seconds = (outcome.completed_at - outcome.received_at)
            .as_seconds_f64()
            .max(0.0);
        ctx.metrics
            .job_finished(tenant, outcome.error.is_some(), seconds);
        if let Some(failure) = &outcome.error {
            ctx.metrics.dead_lettered(tenant, failure.kind);
            tracing::warn!(kind = failure.kind.as_str(), message = %failure.message, "failed; dead-lettered");
        }
    }
}

/// Whether an ack reached the broker. lapin answers `Ok(false)` for one it could not even send
/// (the delivery's channel is gone): the broker redelivers, so nothing is finished yet.
fn acked(ack: Result<bool, lapin::Error>) -> bool {
    match ack {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(
                "ack not sent: the delivery's channel is gone; the broker will redeliver"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "ack failed; the broker will redeliver");
            false
        }
    }
}

/// Sleeps `d`; `false` if `stop` fired first.
async fn sleep_unless_stopped(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The event (and its copy to `reply-to`) and, on failure, the dead letter — concurrently.
async fn publish_outcome(
    ctx: &Context,
    session: &Session,
    delivery: &Delivery,
    outcome: &Outcome,
    event_id: &str,
    trace: Option<&TraceContext>,
) -> Result<(), PublishError> {
    let publisher = &session.publisher;
    let traceparent = trace.map(TraceContext::header);
    let event = outcome.to_event(&ctx.source, event_id.to_owned(), traceparent.as_deref());
    let body = serde_json::to_vec(&event).expect("events always serialise");
    let mut event_headers = FieldTable::default();
    if let Some(tp) = &traceparent {
        event_headers.insert(
            contract::headers::TRACEPARENT.into(),
            AMQPValue::LongString(tp.as_str().into()),
        );
    }
    let properties = BasicProperties::default()
        .with_content_type("application/cloudevents+json".into())
        .with_delivery_mode(2)
        .with_message_id(event_id.into())
        .with_correlation_id(outcome.request_id.as_str().into())
        .with_timestamp(
            outcome
                .completed_at
                .unix_timestamp()
                .try_into()
                .unwrap_or_default(),
        )
        .with_headers(event_headers);
    // A request nothing can correlate gets no event, only the dead letter.
    let has_event = !outcome.request_id.is_empty();
    let event = async {
        if has_event {
            let rk = outcome.event_type();
            publisher
                .publish(
                    &ctx.amqp.events_exchange,
                    rk,
                    &body,
                    properties.clone(),
                    true,
                )
                .await?;
        }
        Ok(())
    };
    let reply_to = async {
        match delivery
            .properties
            .reply_to()
            .as_ref()
            .filter(|_| has_event)
            .filter(|queue| reply_queue_allowed(ctx, queue.as_str()))
        {
            // A reply queue that is gone must not hold the request hostage: not mandatory.
            Some(queue) => {
                publisher
                    .publish("", queue.as_str(), &body, properties.clone(), false)
                    .await
            }
            None => Ok(()),
        }
    };
    let dead_letter = async {
        match &outcome.error {
            Some(failure) => {
                let mut headers = contract::dead_letter_headers(
                    delivery.properties.headers().as_ref(),
                    failure,
                    outcome.attempts,
                    outcome.completed_at,
                );
                if outcome.devices.is_some() {
                    // A replay must not redo the devices already unassigned.
                    let progress = outcome.progress();
                    let state = ctx.state_keys.sign_dead_letter(
                        &progress.done,
                        &delivery.data,
                        message_id(delivery),
                    );
                    merge(&mut headers, state);
                    if let Some(list) = progress.done_list() {
                        headers.insert(
                            contract::headers::DEVICES_DONE.into(),
                            AMQPValue::LongString(list.into()),
                        );
                    }
                }
                let properties = carried_properties(&delivery.properties).with_headers(headers);
                let exchange = &ctx.amqp.dead_letter_exchange;
                publisher
                    .publish(
                        exchange,
                        &ctx.amqp.routing_key,
                        &delivery.data,
                        properties,
                        true,
                    )
                    .await
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(event, reply_to, dead_letter).map(drop)
}

/// Puts the request back with its retry state — in the delay queue that fits the wait it owes,
/// else at the tail of its queue — so attempts and budgets survive restarts, and the broker's
/// delivery count (the crash-loop guard) is not spent on orderly hand-backs.
async fn hand_back(
    ctx: &Context,
    session: &Session,
    delivery: &Delivery,
    state: &RetryState,
    progress: Option<&Progress>,
) -> Result<(), PublishError> {
    let carried = Carried {
        retry: *state,
        progress: progress.cloned().unwrap_or_default(),
    };
    let mut headers = carried_headers(delivery.properties.headers().as_ref());
    merge(
        &mut headers,
        ctx.state_keys
            .sign(&carried, &delivery.data, message_id(delivery)),
    );
    let properties = carried_properties(&delivery.properties).with_headers(headers);
    let wait = state.retry_at.and_then(until).unwrap_or_default();
    // Straight to the queue through the default exchange: other bindings of the request
    // exchange (an audit queue, say) must not see a hand-back as a new request.
    let tier = ctx
        .parks(wait)
        .then(|| delay::tier_for(&ctx.amqp, wait))
        .flatten();
    let queue = match tier {
        Some((tier, tier_delay)) => {
            tracing::info!(
                wait_ms = wait.as_millis() as u64,
                tier_secs = tier_delay.as_secs(),
                "parked in a delay queue"
            );
            tier
        }
        None => ctx.amqp.queue.clone(),
    };
    session
        .publisher
        .publish("", &queue, &delivery.data, properties, true)
        .await
}

fn message_id(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(ShortString::as_str)
}

fn merge(headers: &mut FieldTable, more: FieldTable) {
    for (name, value) in more.inner() {
        headers.insert(name.clone(), value.clone());
    }
}

/// A `reply-to` names where the producer wants a copy of its event — never one of the worker's
/// own queues (a copy there would be taken for a request, an outcome or a dead letter) nor a
/// broker-reserved `amq.` name.
fn reply_queue_allowed(ctx: &Context, queue: &str) -> bool {
    let allowed = !queue.starts_with("amq.") && !ctx.amqp.is_own_queue(queue);
    if !allowed {
        tracing::warn!(
            reply_to = queue,
            "reply-to names a reserved or the worker's own queue; no copy sent there"
        );
    }
    allowed
}

/// Runs `f` when dropped, so a gauge is decremented on every path out.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::acked;

    #[test]
    fn an_ack_lapin_could_not_send_is_not_a_settlement() {
        assert!(acked(Ok(true)));
        assert!(!acked(Ok(false)), "the channel was gone: not acked");
        let gone = lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closed,
            "the delivery's channel is closed",
        );
        assert!(!acked(Err(gone.into())));
    }
}
