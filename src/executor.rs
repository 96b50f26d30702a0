//! The executor: one delivery, from its message to its settlement. It asks the planner
//! ([`job::plan`]) what to do, does it through the ports ([`crate::ports`]) and feeds back what
//! happened, until the job settles; then it publishes with confirms *before* acking (CONTRACT
//! section 6). Every decision is the planner's; this only performs them.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};

use crate::{
    config::TenantName,
    contract::{self, TraceContext},
    job::{self, Action, Call, Event, JobState, Now, Settlement},
    observe,
    observe::Happened,
    ports::{Clock, Graph, Message, Settle},
    retry::{Decision, RetryReason},
    session::{Context, Session},
    tenant::Tenant,
    throttle::Ticket,
};

/// Longest a delivery is held while its outcome cannot be published; well below RabbitMQ's
/// 30-minute consumer timeout.
const MAX_PUBLISH_HOLD: Duration = Duration::from_secs(600);

/// A call on its way to its answer's decision: what the gate and the token source hear of it.
struct Sent<T> {
    call: Call,
    token: T,
    ticket: Ticket,
    answer: String,
}

/// Handles one delivery to the end. Never panics on input; every path settles the delivery or
/// leaves it unacked for the broker to redeliver.
pub async fn handle<G: Graph, C: Clock>(
    ctx: &Context<G, C>,
    session: &Session,
    message: Message,
    settle: impl Settle,
) {
    let _inflight = observe::Inflight::new(&*ctx.observe);
    let now = ctx.clock.now();
    let (headers, id) = (&message.headers, message.message_id.as_deref());
    let keys = (&*ctx.state_keys, ctx.state_limits);
    let (carried, rejected) = job::carried(keys, headers, &message.body, id, now);
    if let Some(why) = rejected {
        ctx.observe.report(Happened::StateRejected(why));
    }
    // The job is a span of its own in the producer's trace, if it sent a valid one.
    let trace = contract::header_str(&message.headers, contract::headers::TRACEPARENT)
        .and_then(|tp| TraceContext::parse(&tp))
        .map(|parent| parent.child());
    let span = tracing::info_span!(
        "job",
        request_id = Empty,
        device_id = Empty,
        tenant = Empty,
        attempt = carried.retry.attempts,
        graph_request_id = Empty,
        trace_id = trace.as_ref().map(|t| t.trace_id.as_str()),
        span_id = trace.as_ref().map(|t| t.span_id.as_str())
    );
    // Metrics name the profile the request selected, never a tenant id it sent.
    let mut profile = TenantName::unknown();
    let invalid = match contract::parse_request(&message.body, message.message_id.as_deref()) {
        Ok(request) => {
            span.record("request_id", request.request_id.as_str());
            if let Some(id) = request.device_id() {
                span.record("device_id", id.as_str());
            }
            match ctx.tenants.select(request.tenant_id.as_deref()) {
                Some(tenant) => {
                    span.record("tenant", tenant.name.as_str());
                    profile = tenant.name.clone();
                    let job = JobState::new(request, carried.clone(), &ctx.policy);
                    Ok(run(ctx, session, tenant, job)
                        .instrument(span.clone())
                        .await)
                }
                None => Err(job::unknown_tenant(&request)),
            }
        }
        Err(invalid) => Err(invalid),
    };
    let settlement = invalid.unwrap_or_else(|invalid| {
        tracing::warn!(request_id = invalid.request_id.as_deref(), reason = %invalid.message, "invalid request");
        let outcome = job::invalid_outcome(invalid, carried.retry, now);
        Settlement::Finish(Box::new(outcome))
    });
    let trace = trace.as_ref();
    settle_delivery(ctx, session, &settle, &settlement, trace, &profile)
        .instrument(span)
        .await;
}

/// The job's loop: plan, perform, feed back — until it settles.
async fn run<G: Graph, C: Clock>(
    ctx: &Context<G, C>,
    session: &Session,
    tenant: &Arc<Tenant>,
    mut job: JobState,
) -> Settlement {
    let mut event = Event::Start;
    let mut sent: Option<Sent<G::Token>> = None;
    loop {
        let now = Now {
            at: ctx.clock.now(),
            jitter: ctx.clock.jitter(),
            held_for: tenant.held_for(),
            paused_for: tenant.paused_for(),
            stopping: session.stop.is_cancelled(),
        };
        let next = job::plan(&mut job, event, &ctx.policy, &now);
        if let (Some(decision), Some(sent)) = (&next.decision, sent.take()) {
            heard(ctx, tenant, decision, sent);
            tracing::Span::current().record("attempt", job.attempts());
        }
        event = match next.action {
            Action::Call(call) => match send(ctx, session, tenant, call).await {
                Ok((call, reply)) => {
                    sent = Some(call);
                    Event::Answered(reply)
                }
                Err(event) => event,
            },
            Action::Wait(delay) => wait(ctx, session, tenant, delay).await,
            Action::Pause(reason) => {
                if let Some(pausing) = ctx.tenants.pause(tenant, reason) {
                    if pausing.last() {
                        session.pause(reason);
                    }
                    pausing.commit();
                }
                Event::Interrupted
            }
            Action::Settle(settlement) => return settlement,
        };
    }
}

/// What the tenant's gate and token source learn from a decided answer.
fn heard<G: Graph, C>(
    ctx: &Context<G, C>,
    tenant: &Tenant,
    decision: &Decision,
    sent: Sent<G::Token>,
) {
    let gate = tenant.gate(sent.call.budget());
    match decision {
        Decision::Succeed => gate.succeeded(),
        Decision::Retry {
            reason,
            hold_tenant,
            ..
        } => {
            if *reason == RetryReason::Throttled {
                gate.throttled(sent.ticket);
            }
            if let Some(hold) = hold_tenant {
                tenant.hold(*hold);
            }
        }
        Decision::RefreshToken => ctx.graph.invalidate(tenant, &sent.token),
        Decision::Fail(_) | Decision::Pause(_) => {}
    }
    let (tenant, call, answer) = (&tenant.name, &sent.call, &sent.answer);
    ctx.observe.report(Happened::Decided {
        tenant,
        call,
        decision,
        answer,
    });
}

/// One Graph call: a token, then the tenant's turn on the call's gate and a concurrency slot.
async fn send<G: Graph, C>(
    ctx: &Context<G, C>,
    session: &Session,
    tenant: &Tenant,
    call: Call,
) -> Result<(Sent<G::Token>, crate::retry::Reply), Event> {
    let Some(paused) = tenant.running_signal() else {
        return Err(Event::Interrupted);
    };
    // The token first, holding neither a slot nor the tenant's turn: a token endpoint that hangs
    // must not keep the other tenants' calls from their slots.
    let token = match unless_stopped(ctx, session, &paused, ctx.graph.token(tenant)).await? {
        Ok(token) => token,
        Err(e) => {
            tracing::error!(error = %e, "no access token");
            return Err(Event::NoToken);
        }
    };
    let gate = tenant.gate(call.budget());
    let admitted = gate.admit_with(|| ctx.graph_slots.acquire());
    let (_permit, ticket) = unless_stopped(ctx, session, &paused, admitted).await?;
    // Once sent, a call is seen through: aborting it would leave Graph's side unknown.
    let started = Instant::now();
    let reply = ctx.graph.call(&token, &call).await;
    let seconds = started.elapsed().as_secs_f64();
    let name = &tenant.name;
    ctx.observe.report(Happened::Called {
        tenant: name,
        call: &call,
        reply: &reply,
        seconds,
    });
    let answer = reply.describe();
    Ok((
        Sent {
            call,
            token,
            ticket,
            answer,
        },
        reply,
    ))
}

/// Awaits `f` — a token, the tenant's turn — unless the session stops or the tenant pauses
/// first; once the calls in flight have answered if the session stopped (an answer on its way
/// may extend the tenant's hold the job carries away).
async fn unless_stopped<G, C, T>(
    ctx: &Context<G, C>,
    session: &Session,
    paused: &CancellationToken,
    f: impl Future<Output = T>,
) -> Result<T, Event> {
    tokio::select! {
        biased;
        _ = session.stop.cancelled() => {
            ctx.graph_slots.settled().await;
            Err(Event::Interrupted)
        }
        _ = paused.cancelled() => Err(Event::Interrupted),
        out = f => Ok(out),
    }
}

/// Waits `delay` holding the delivery, unless the session stops or the tenant pauses.
async fn wait<G, C: Clock>(
    ctx: &Context<G, C>,
    session: &Session,
    tenant: &Tenant,
    delay: Duration,
) -> Event {
    let Some(paused) = tenant.running_signal() else {
        return Event::Interrupted;
    };
    let sleep = ctx.clock.sleep(delay);
    unless_stopped(ctx, session, &paused, sleep)
        .await
        .map_or_else(|e| e, |()| Event::Waited)
}

/// Publishes what the settlement calls for, with confirms, and acks only once all are
/// confirmed. A refused publish (nack, unroutable) is retried with backoff while the delivery
/// is held — Graph is not called again and the broker's delivery count is not spent; when the
/// session stops or the hold is too long, the delivery is requeued. On a dead channel nothing
/// can be settled and the broker requeues the delivery by itself. Nothing is lost either way.
async fn settle_delivery<G, C: Clock>(
    ctx: &Context<G, C>,
    session: &Session,
    settle: &impl Settle,
    settlement: &Settlement,
    trace: Option<&TraceContext>,
    tenant: &TenantName,
) {
    let held_since = Instant::now();
    let mut backoff = Duration::from_millis(200);
    while let Err(error) = settle.publish(settlement, trace).await {
        // Only the delivery's own channel going hands it back to the broker; a failed publish
        // channel is reopened by the next try.
        if settle.channel_gone() {
            tracing::warn!(error = %error, "the delivery's channel is gone; the broker will redeliver");
            return;
        }
        tracing::warn!(error = %error, retry_in = ?backoff, "publish not confirmed; holding the request");
        let give_back = held_since.elapsed() + backoff > MAX_PUBLISH_HOLD;
        let slept = tokio::select! {
            biased;
            _ = session.stop.cancelled() => false,
            () = ctx.clock.sleep(backoff) => true,
        };
        if give_back || !slept {
            settle.requeue().await;
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    if settle.ack().await {
        ctx.observe.report(Happened::Settled { tenant, settlement });
    }
}
