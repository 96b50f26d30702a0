//! One job as a pure state machine: [`plan`] takes the job's state, what just happened
//! ([`Event`]), the [`Policy`] and the moment ([`Now`]), and says what to do next ([`Action`]).
//! No I/O, no clock, no randomness of its own: every decision the worker makes about a request —
//! call, wait, park or hand back, pause the tenant, give up and why — is here and unit-tested
//! without a broker. The executor ([`crate::executor`]) performs the actions and feeds the
//! events back. Requests by serial number or user have a planner of their own for the device
//! list ([`listing`]); the wording of outcomes is in [`outcome`].

mod listing;
mod outcome;
#[cfg(test)]
mod tests;

use std::time::Duration;

use lapin::types::FieldTable;
use time::OffsetDateTime;
use url::Url;

use crate::{
    config::Settings,
    contract::{
        self, Carried, DeviceId, DeviceOutcome, ErrorKind, Failure, Limits, Outcome, Progress,
        Rejected, Request, RetryState, StateKeys, Target,
    },
    lookup::{self, Lookup, Resolved},
    retry::{self, Attempt, Decision, PauseReason, Reply},
    throttle::Budget,
};

pub use outcome::{invalid_outcome, unknown_tenant};

use listing::{Listed, Listing};

/// Added to a paused tenant's tier-long wait, so the time it takes to hand the job back does
/// not make it fit only the next shorter tier.
const PARK_SLACK: Duration = Duration::from_millis(250);

/// What the planner decides with, fixed for the life of the worker.
#[derive(Debug, Clone)]
pub struct Policy {
    pub retry: retry::Policy,
    /// Waits longer than this go through the delay queues (`retry.park_after_secs`).
    pub park_after: Duration,
    /// The delay tiers in seconds, shortest first (`amqp.delay_tiers_secs`).
    pub tiers: Vec<u64>,
    /// `graph.base_url`: lookups list under it, and follow only nextLinks under it.
    pub graph_base: Url,
}

impl Policy {
    pub fn new(settings: &Settings) -> Self {
        let r = &settings.retry;
        Self {
            retry: retry::Policy {
                max_attempts: r.max_attempts.get(),
                base_delay: r.base_delay,
                max_delay: r.max_delay,
                max_elapsed: r.max_elapsed,
            },
            park_after: r.park_after,
            tiers: settings.amqp.delay_tiers_secs.to_vec(),
            graph_base: settings.graph.base_url.url().clone(),
        }
    }

    /// Whether a wait of `wait` goes through a delay queue rather than holding the delivery.
    pub fn parks(&self, wait: Duration) -> bool {
        wait > self.park_after && self.tier_for(wait).is_some()
    }

    /// The longest tier that fits in `wait`: the rest is waited on the next delivery.
    pub fn tier_for(&self, wait: Duration) -> Option<Duration> {
        let secs = self
            .tiers
            .iter()
            .rev()
            .find(|&&t| Duration::from_secs(t) <= wait)?;
        Some(Duration::from_secs(*secs))
    }

    /// The shortest tier of at least `wait`, else the longest: a wait that rounds up to a whole
    /// tier is parked in one piece.
    fn tier_at_least(&self, wait: Duration) -> Duration {
        let tiers = &self.tiers;
        let secs = tiers.iter().find(|&&t| Duration::from_secs(t) >= wait);
        Duration::from_secs(secs.or(tiers.last()).copied().unwrap_or_default())
    }

    /// What a paused tenant's job owes when handed back: at least until the tenant's next
    /// probe, and long enough to be parked — rounded up to a whole tier, so the job neither
    /// comes back to spin nor holds its delivery waiting out a remainder.
    fn paused_wait(&self, until_probe: Duration) -> Duration {
        let parked = self.park_after + Duration::from_millis(1);
        self.tier_at_least(until_probe.max(parked)) + PARK_SLACK
    }
}

/// The world as the planner sees it at one step.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: OffsetDateTime,
    /// Uniform in [0, 1): the jitter of a retry's delay.
    pub jitter: f64,
    /// How much longer the tenant is held back by a Retry-After.
    pub held_for: Option<Duration>,
    /// While the tenant is paused for its credentials: how long until its next probe.
    pub paused_for: Option<Duration>,
    /// The session is stopping (shutdown, connection loss, every tenant paused).
    pub stopping: bool,
}

/// What happened since the last action.
#[derive(Debug, Clone)]
pub enum Event {
    /// The delivery arrived.
    Start,
    /// Graph answered the call (or timed out, or could not be reached).
    Answered(Reply),
    /// No token could be had for the call.
    NoToken,
    /// The wait is over.
    Waited,
    /// Waiting (or waiting for the tenant's turn) was cut short: the session is stopping or the
    /// tenant paused — or the action was [`Action::Pause`].
    Interrupted,
}

/// A Graph call: the action (a write) or a page of the device list (a read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Unassign(DeviceId),
    List(Url),
}

impl Call {
    /// Which of the tenant's gates the call goes through: Intune budgets writes and reads apart.
    pub fn budget(&self) -> Budget {
        match self {
            Self::Unassign(_) => Budget::Writes,
            Self::List(_) => Budget::Reads,
        }
    }
}

/// The whole vocabulary of the worker.
#[derive(Debug, Clone)]
pub enum Action {
    /// Make this call, through its gate (answer: [`Event::Answered`] or [`Event::NoToken`]).
    Call(Call),
    /// Wait this long holding the delivery ([`Event::Waited`] or [`Event::Interrupted`]).
    Wait(Duration),
    /// Credential trouble: pause the tenant, then [`Event::Interrupted`].
    Pause(PauseReason),
    /// The job is over for this delivery.
    Settle(Settlement),
}

/// How a delivery ends.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// A final outcome: publish the event (and dead letter), then ack.
    Finish(Box<Outcome>),
    /// Not finished: republish with its state, then ack.
    HandBack(HandBack),
}

/// A job going back to the broker with the state it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandBack {
    pub carried: Carried,
    /// The delay tier it is parked in; `None`: straight back to the request queue.
    pub tier: Option<Duration>,
}

/// One step's result: what Graph's answer was taken to mean (for the tenant's gate and the
/// observer), and what to do.
#[derive(Debug, Clone)]
pub struct Next {
    pub decision: Option<Decision>,
    pub action: Action,
}

/// A request in progress and its durable state.
#[derive(Debug, Clone)]
pub struct JobState {
    request: Request,
    retry: RetryState,
    /// Devices done and calls on the one in progress (serial and user requests).
    progress: Progress,
    /// `retry.attempts` when the device in progress was started: its own retry budget.
    base: u32,
    /// Reads (list calls) made for the page in progress: its own retry budget.
    reads: u32,
    /// The next call goes with a token fetched after a 401.
    token_refreshed: bool,
    /// Graph's last answer on the device or page in progress.
    last: Option<Reply>,
    phase: Phase,
}

#[derive(Debug, Clone)]
enum Phase {
    /// A `device_id` request.
    Device(DeviceId),
    /// A serial or user request, listing the identities.
    List(Listing),
    /// A serial or user request, unassigning what the listing found.
    Each(Each),
    Settled,
}

/// The devices of a serial or user request, one after another.
#[derive(Debug, Clone)]
struct Each {
    ids: Vec<DeviceId>,
    next: usize,
    results: Vec<DeviceOutcome>,
    /// The last answer on any device, for the outcome's Graph ids.
    last: Option<Reply>,
    /// The next device attempted may be the one a hand-back interrupted: its calls so far count.
    resumed: bool,
}

impl JobState {
    pub fn new(request: Request, carried: Carried, policy: &Policy) -> Self {
        let Carried { retry, progress } = carried;
        let spent = progress.device_calls.unwrap_or(retry.attempts);
        let phase = match &request.target {
            Target::Device(id) => Phase::Device(id.clone()),
            Target::Serial(_) | Target::User(_) => Phase::List(Listing::new(
                lookup_of(&request).unwrap_or(Lookup::User("")),
                &policy.graph_base,
            )),
        };
        Self {
            base: retry.attempts.saturating_sub(spent),
            request,
            retry,
            progress,
            reads: 0,
            token_refreshed: false,
            last: None,
            phase,
        }
    }

    pub fn attempts(&self) -> u32 {
        self.retry.attempts
    }

    /// The call in progress, if any.
    fn call(&self) -> Option<Call> {
        match &self.phase {
            Phase::Device(id) => Some(Call::Unassign(id.clone())),
            Phase::List(listing) => Some(Call::List(listing.url.clone())),
            Phase::Each(each) => each.ids.get(each.next).cloned().map(Call::Unassign),
            Phase::Settled => None,
        }
    }

    /// Calls made so far on what `call` is about.
    fn calls(&self, call: &Call) -> u32 {
        match call {
            Call::Unassign(_) => self.retry.attempts.saturating_sub(self.base),
            Call::List(_) => self.reads,
        }
    }

    fn elapsed(&self, now: &Now) -> Duration {
        (now.at - self.retry.first_received_at)
            .try_into()
            .unwrap_or_default()
    }

    /// Time left before `not_after`; zero once it has passed.
    fn until_deadline(&self, now: &Now) -> Option<Duration> {
        let not_after = self.request.not_after?;
        Some((not_after - now.at).try_into().unwrap_or_default())
    }
}

/// The next step of `job` after `event`.
pub fn plan(job: &mut JobState, event: Event, policy: &Policy, now: &Now) -> Next {
    let action = match event {
        _ if matches!(job.phase, Phase::Settled) => job.hand_back(None, policy, now),
        Event::Start => job.next_call(policy, now),
        Event::Waited => {
            job.retry.retry_at = None;
            job.next_call(policy, now)
        }
        Event::Interrupted => job.hand_back(until(job.retry.retry_at, now.at), policy, now),
        Event::NoToken => Action::Pause(PauseReason::NoToken),
        Event::Answered(reply) => return job.answered(reply, policy, now),
    };
    Next {
        decision: None,
        action,
    }
}

impl JobState {
    /// The call in progress — unless a wait is owed, the deadline has passed, the tenant is
    /// paused, or it is held back for longer than is worth waiting with the delivery in hand.
    fn next_call(&mut self, policy: &Policy, now: &Now) -> Action {
        if let Some(left) = until(self.retry.retry_at, now.at) {
            return self.wait_or_hand_back(left, policy, now);
        }
        let Some(call) = self.call() else {
            return self.hand_back(None, policy, now);
        };
        if self.until_deadline(now) == Some(Duration::ZERO) {
            let last = self.last.take();
            let calls = self.calls(&call);
            let failure = self.give_up(ErrorKind::DeadlineExceeded, calls, last.as_ref(), now);
            return self.target_done(Err((failure, last)), policy, now);
        }
        if now.paused_for.is_some() {
            return self.hand_back(None, policy, now);
        }
        if let Some(held) = now.held_for.filter(|held| policy.parks(*held)) {
            return self.hand_back(Some(held), policy, now);
        }
        Action::Call(call)
    }

    fn answered(&mut self, reply: Reply, policy: &Policy, now: &Now) -> Next {
        let Some(call) = self.call() else {
            return Next {
                decision: None,
                action: self.hand_back(None, policy, now),
            };
        };
        if retry::spends_attempt(&reply.answer) {
            match call {
                Call::Unassign(_) => self.retry.attempts = self.retry.attempts.saturating_add(1),
                Call::List(_) => self.reads = self.reads.saturating_add(1),
            }
        }
        let attempt = Attempt {
            calls: self.calls(&call),
            elapsed: self.elapsed(now),
            until_deadline: self.until_deadline(now),
            token_refreshed: self.token_refreshed,
        };
        let decision = retry::decide(
            &reply.answer,
            attempt,
            &policy.retry,
            now.at.into(),
            now.jitter,
        );
        self.token_refreshed = false;
        let action = match decision {
            Decision::Succeed => self.target_done(Ok(reply), policy, now),
            Decision::Fail(kind @ (ErrorKind::RetriesExhausted | ErrorKind::DeadlineExceeded)) => {
                let failure = self.give_up(kind, attempt.calls, Some(&reply), now);
                self.target_done(Err((failure, Some(reply))), policy, now)
            }
            Decision::Fail(kind) => {
                let failure = outcome::failure_from(kind, Some(&reply));
                self.target_done(Err((failure, Some(reply))), policy, now)
            }
            Decision::RefreshToken => {
                self.token_refreshed = true;
                self.last = Some(reply);
                self.next_call(policy, now)
            }
            Decision::Pause(reason) => Action::Pause(reason),
            Decision::Retry { delay, .. } => {
                self.last = Some(reply);
                self.wait_or_hand_back(delay, policy, now)
            }
        };
        Next {
            decision: Some(decision),
            action,
        }
    }

    /// Waits `delay` holding the delivery — unless it is long enough to go through the delay
    /// queues, or the tenant is paused: then the job is handed back with the wait still owed.
    fn wait_or_hand_back(&mut self, delay: Duration, policy: &Policy, now: &Now) -> Action {
        if policy.parks(delay) || now.paused_for.is_some() {
            return self.hand_back(Some(delay), policy, now);
        }
        self.retry.retry_at = Some(at_most_after(now.at, delay));
        Action::Wait(delay)
    }

    /// Not finished: back to the queue with its state and the wait it still owes — at least
    /// what is left of the tenant's Retry-After hold, so that no worker that picks the job up
    /// calls before it ends. A paused tenant's job, while the session goes on for the other
    /// tenants, is parked until the tenant's next probe.
    fn hand_back(&mut self, wait: Option<Duration>, policy: &Policy, now: &Now) -> Action {
        let mut wait = wait.max(now.held_for);
        if let Some(until_probe) = now.paused_for
            && !now.stopping
        {
            wait = wait.max(Some(policy.paused_wait(until_probe)));
        }
        let progress = match self.request.target {
            Target::Device(_) => Progress::default(),
            Target::Serial(_) | Target::User(_) => Progress {
                device_calls: Some(self.retry.attempts.saturating_sub(self.base)),
                ..self.progress.clone()
            },
        };
        let carried = Carried {
            retry: RetryState {
                retry_at: wait.map(|w| at_most_after(now.at, w)),
                ..self.retry
            },
            progress,
        };
        let tier = wait
            .filter(|w| policy.parks(*w))
            .and_then(|w| policy.tier_for(w));
        self.phase = Phase::Settled;
        Action::Settle(Settlement::HandBack(HandBack { carried, tier }))
    }

    fn finish(&mut self, outcome: Outcome) -> Action {
        self.phase = Phase::Settled;
        Action::Settle(Settlement::Finish(Box::new(outcome)))
    }

    /// The device or page in progress has its final answer.
    fn target_done(
        &mut self,
        result: Result<Reply, (Failure, Option<Reply>)>,
        policy: &Policy,
        now: &Now,
    ) -> Action {
        self.last = None;
        match std::mem::replace(&mut self.phase, Phase::Settled) {
            Phase::Device(_) | Phase::Settled => {
                let outcome = match result {
                    Ok(reply) => self.outcome(None, Some(&reply), now),
                    Err((failure, reply)) => self.outcome(Some(failure), reply.as_ref(), now),
                };
                self.finish(outcome)
            }
            Phase::List(mut listing) => {
                let lookup = lookup_of(&self.request).unwrap_or(Lookup::User(""));
                let base = &policy.graph_base;
                let listed = match result {
                    Ok(reply) => listing.page(lookup, base, &reply),
                    Err((failure, reply)) => listing.failed(lookup, base, failure, reply),
                };
                match listed {
                    // Each page has a retry budget of its own: a fault on page 21 of a scan
                    // is retried like one on page 1.
                    Listed::More => {
                        self.phase = Phase::List(listing);
                        self.reads = 0;
                        self.next_call(policy, now)
                    }
                    Listed::Failed(failure, reply) => {
                        self.lookup_failed(failure, reply.as_ref(), now)
                    }
                    Listed::Found(ids) => self.found(ids, policy, now),
                }
            }
            Phase::Each(mut each) => {
                if let Some(id) = each.ids.get(each.next) {
                    match result {
                        Ok(reply) => {
                            self.progress.done.push(id.clone());
                            each.results.push(DeviceOutcome::new(id, None));
                            each.last = Some(reply);
                        }
                        Err((failure, reply)) => {
                            each.results.push(DeviceOutcome::new(id, Some(failure)));
                            each.last = reply.or(each.last.take());
                        }
                    }
                }
                each.next += 1;
                self.next_device(each, policy, now)
            }
        }
    }

    /// The listing is complete: one device, several, or none — which may be the request's end.
    fn found(&mut self, ids: Vec<DeviceId>, policy: &Policy, now: &Now) -> Action {
        let lookup = lookup_of(&self.request).unwrap_or(Lookup::User(""));
        let (kind, message) = match lookup::resolve(lookup, ids) {
            Resolved::Devices(ids) => {
                let each = Each {
                    results: Vec::with_capacity(ids.len()),
                    ids,
                    next: 0,
                    last: None,
                    resumed: true,
                };
                return self.next_device(each, policy, now);
            }
            Resolved::NotFound(message) => (ErrorKind::DeviceNotFound, message),
            Resolved::Ambiguous(message) => (ErrorKind::AmbiguousDevice, message),
        };
        self.lookup_failed(Failure::new(kind, message), None, now)
    }

    /// The next device not done in an earlier delivery, or the verdict once all are.
    fn next_device(&mut self, mut each: Each, policy: &Policy, now: &Now) -> Action {
        while let Some(id) = each.ids.get(each.next) {
            if self.progress.is_done(id) {
                each.results.push(DeviceOutcome::new(id, None));
                each.next += 1;
                continue;
            }
            // Every device after the first one attempted starts a retry budget of its own.
            if !each.resumed {
                self.base = self.retry.attempts;
            }
            each.resumed = false;
            self.phase = Phase::Each(each);
            return self.next_call(policy, now);
        }
        let outcome = self.devices_outcome(each, now);
        self.finish(outcome)
    }
}

/// What a serial or user request looks up; `None` for a device id.
fn lookup_of(request: &Request) -> Option<Lookup<'_>> {
    match &request.target {
        Target::Device(_) => None,
        Target::Serial(serial) => Some(Lookup::Serial(serial)),
        Target::User(upn) => Some(Lookup::User(upn)),
    }
}

/// The state a delivery carries, if it verifies (CONTRACT section 6, item 7): anything else —
/// forged, from another body, from a retired key — is ignored (and why is said), and the
/// request starts afresh. An oversized body is refused unparsed; its state is not even hashed.
pub fn carried(
    (keys, limits): (&StateKeys, Limits),
    headers: &FieldTable,
    body: &[u8],
    message_id: Option<&str>,
    now: OffsetDateTime,
) -> (Carried, Option<Rejected>) {
    if body.len() > contract::MAX_BODY_BYTES {
        return (Carried::fresh(now), None);
    }
    keys.read(headers, body, message_id, now, limits)
}

/// `now + wait`, saturating instead of overflowing the calendar.
pub fn at_most_after(now: OffsetDateTime, wait: Duration) -> OffsetDateTime {
    time::Duration::try_from(wait)
        .ok()
        .and_then(|w| now.checked_add(w))
        .unwrap_or(OffsetDateTime::new_utc(
            time::Date::MAX,
            time::Time::MIDNIGHT,
        ))
}

/// How long until `at`, if it is still ahead.
pub fn until(at: Option<OffsetDateTime>, now: OffsetDateTime) -> Option<Duration> {
    let left = at? - now;
    left.is_positive()
        .then(|| left.try_into().unwrap_or_default())
}
