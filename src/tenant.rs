//! The tenants one worker serves: each profile with its own token cache, gate (Retry-After holds
//! and adaptive budget) and credential pause.
//!
//! Credential trouble belongs to one tenant. Its jobs are handed back — parked in the delay
//! queues until its next probe — while the other tenants' jobs flow, and a task probes for a
//! token with backoff (1 s doubling to 60 s) until one works. Only when *every* tenant is paused
//! does the consume session pause as a whole (consumer cancelled, jobs straight back in the
//! queue, `/readyz` 503), which is exactly the single-tenant behaviour of CONTRACT section 6.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::TokenSource,
    config::{TenantName, TenantProfile},
    contract::TenantId,
    metrics::Metrics,
    observe::{Happened, Observe},
    retry::PauseReason,
    throttle::{Budget, Gate},
};

/// Probing after a credential pause backs off up to this (CONTRACT section 6, item 3).
const MAX_PAUSE_BACKOFF: Duration = Duration::from_secs(60);
/// A tenant that pauses sooner than this after resuming keeps its pause backoff growing.
const PAUSE_RESET_AFTER: Duration = Duration::from_secs(60);
const FIRST_PAUSE_BACKOFF: Duration = Duration::from_secs(1);

/// One tenant profile at run time.
pub struct Tenant {
    pub name: TenantName,
    pub tenant_id: TenantId,
    pub tokens: TokenSource,
    /// The tenant's gate for writes (the unassign action)…
    pub gate: Arc<Gate>,
    /// …and for reads (lookups), which Intune budgets apart from writes.
    pub read_gate: Arc<Gate>,
    pause: Mutex<PauseState>,
}

struct PauseState {
    /// `Some` while paused: why, and when the next probe is due.
    paused: Option<(PauseReason, Instant)>,
    /// Cancelled when the tenant pauses, so its waiting jobs hand themselves back; a fresh one
    /// on resume.
    signal: CancellationToken,
    /// Wait before the next probe.
    backoff: Duration,
    resumed_at: Instant,
}

impl PauseState {
    /// Marks the tenant paused and schedules its first probe; the backoff keeps growing when
    /// pauses follow each other quickly (a 403 that a fresh token does not cure).
    fn pause(&mut self, reason: PauseReason, now: Instant) {
        if now.saturating_duration_since(self.resumed_at) > PAUSE_RESET_AFTER {
            self.backoff = FIRST_PAUSE_BACKOFF;
        }
        self.paused = Some((reason, now));
        self.reschedule(now);
        self.signal.cancel();
    }

    /// After a failed probe (or on pausing): the next one, `backoff` later, which then doubles.
    fn reschedule(&mut self, now: Instant) {
        if let Some((_, probe_at)) = self.paused.as_mut() {
            *probe_at = now + self.backoff;
        }
        self.backoff = (self.backoff * 2).min(MAX_PAUSE_BACKOFF);
    }

    fn resume(&mut self, now: Instant) {
        self.paused = None;
        self.signal = CancellationToken::new();
        self.resumed_at = now;
    }
}

impl Tenant {
    /// The gate a call spending `budget` goes through.
    pub fn gate(&self, budget: Budget) -> &Arc<Gate> {
        match budget {
            Budget::Writes => &self.gate,
            Budget::Reads => &self.read_gate,
        }
    }

    /// How much longer calls to the tenant are held back by a Retry-After, if they are.
    pub fn held_for(&self) -> Option<Duration> {
        self.gate.held_for().max(self.read_gate.held_for())
    }

    /// A Retry-After speaks for the whole tenant: reads and writes alike wait it out.
    pub fn hold(&self, duration: Duration) {
        self.gate.hold(duration);
        self.read_gate.hold(duration);
    }

    /// Fired when the tenant pauses; `None` when it is paused already.
    pub fn running_signal(&self) -> Option<CancellationToken> {
        let state = self.lock();
        state.paused.is_none().then(|| state.signal.clone())
    }

    /// While paused, how long until the next probe (zero once it is due).
    pub fn paused_for(&self) -> Option<Duration> {
        let (_, probe_at) = self.lock().paused?;
        Some(probe_at.saturating_duration_since(Instant::now()))
    }

    pub fn pause_reason(&self) -> Option<PauseReason> {
        self.lock().paused.map(|(reason, _)| reason)
    }

    fn lock(&self) -> MutexGuard<'_, PauseState> {
        // Plain data updated under the lock: a poisoned lock still holds a consistent value.
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every tenant profile, `default` first.
pub struct Tenants {
    all: Vec<Arc<Tenant>>,
    /// Serialises pauses and resumes, so "every tenant is paused" is decided on one view.
    transitions: Mutex<()>,
    /// How many tenants are paused; the supervisor waits on it while all of them are.
    paused: watch::Sender<usize>,
    /// Stops the probe tasks when the worker stops.
    probes: CancellationToken,
    observe: Arc<dyn Observe>,
}

impl Tenants {
    pub fn new(
        profiles: Vec<TenantProfile>,
        http: &reqwest::Client,
        metrics: &Arc<Metrics>,
        observe: Arc<dyn Observe>,
    ) -> Self {
        let all = profiles
            .into_iter()
            .map(|profile| {
                let name = profile.name;
                observe.report(Happened::TenantServed(&name));
                Arc::new(Tenant {
                    tenant_id: profile.credentials.tenant_id.clone(),
                    tokens: TokenSource::new(
                        http.clone(),
                        profile.credentials,
                        name.clone(),
                        metrics.clone(),
                    ),
                    gate: Gate::new(profile.gate, metrics.gate_observer(&name)),
                    read_gate: Gate::new(profile.read_gate, metrics.gate_observer(&name)),
                    name,
                    pause: Mutex::new(PauseState {
                        paused: None,
                        signal: CancellationToken::new(),
                        backoff: FIRST_PAUSE_BACKOFF,
                        resumed_at: Instant::now(),
                    }),
                })
            })
            .collect();
        Self {
            all,
            transitions: Mutex::new(()),
            paused: watch::Sender::new(0),
            probes: CancellationToken::new(),
            observe,
        }
    }

    /// The profile a request's `tenant_id` selects: `default` without one, else the profile
    /// with that tenant id (GUIDs compare case-insensitively); `None` if no profile has it.
    pub fn select(&self, tenant_id: Option<&str>) -> Option<&Arc<Tenant>> {
        match tenant_id {
            None => self.all.first(),
            Some(id) => self.all.iter().find(|t| t.tenant_id.is(id)),
        }
    }

    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }

    pub fn all_paused(&self) -> bool {
        *self.paused.borrow() == self.all.len()
    }

    /// Credential trouble in `tenant`: `None` if it is paused already, else the pause to
    /// [`Pausing::commit`] — after the caller has acted on [`Pausing::last`]: when no tenant is
    /// left working the whole consume session pauses, and it must stop before the tenant's
    /// pause is visible, so that its jobs see the session stopping and go straight back to the
    /// queue rather than into a delay queue.
    pub fn pause(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        reason: PauseReason,
    ) -> Option<Pausing<'_>> {
        let transition = self.lock_transitions();
        if tenant.pause_reason().is_some() {
            return None;
        }
        Some(Pausing {
            tenants: self,
            tenant: tenant.clone(),
            reason,
            _transition: transition,
        })
    }

    /// Waits out the backoff, then asks for a fresh token, until one comes (or the worker stops).
    async fn probe(self: Arc<Self>, tenant: Arc<Tenant>) {
        while let Some(wait) = tenant.paused_for() {
            tracing::warn!(tenant = %tenant.name, probe_in = ?wait, "tenant paused");
            tokio::select! {
                _ = self.probes.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            tenant.tokens.clear();
            match tenant.tokens.token().await {
                Ok(_) => self.resume(&tenant),
                Err(e) => {
                    tracing::warn!(tenant = %tenant.name, error = %e, "still no token");
                    tenant.lock().reschedule(Instant::now());
                }
            }
        }
    }

    fn resume(&self, tenant: &Tenant) {
        let _transition = self.lock_transitions();
        tenant.lock().resume(Instant::now());
        self.paused.send_modify(|n| *n -= 1);
        self.observe.report(Happened::TenantPaused {
            tenant: &tenant.name,
            reason: None,
        });
    }

    /// Resolves once at least one tenant works (at once if one does).
    pub async fn one_works(&self) {
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|n| *n < self.all.len()).await;
    }

    /// Stops probing; the worker is stopping.
    pub fn stop_probing(&self) {
        self.probes.cancel();
    }

    fn lock_transitions(&self) -> MutexGuard<'_, ()> {
        self.transitions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A tenant's pause, decided but not yet visible (see [`Tenants::pause`]). Holds the
/// transition lock, so "every tenant is paused" cannot change meanwhile.
pub struct Pausing<'a> {
    tenants: &'a Arc<Tenants>,
    tenant: Arc<Tenant>,
    reason: PauseReason,
    _transition: MutexGuard<'a, ()>,
}

impl Pausing<'_> {
    /// This is the last tenant working: the consume session must pause as a whole.
    pub fn last(&self) -> bool {
        *self.tenants.paused.borrow() + 1 == self.tenants.all.len()
    }

    /// Makes the pause visible — the tenant's jobs hand themselves back — and starts probing.
    pub fn commit(self) {
        let Self {
            tenants,
            tenant,
            reason,
            _transition,
        } = self;
        tenant.lock().pause(reason, Instant::now());
        tenants.paused.send_modify(|n| *n += 1);
        tenants.observe.report(Happened::TenantPaused {
            tenant: &tenant.name,
            reason: Some(reason),
        });
        tokio::spawn(tenants.clone().probe(tenant));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(now: Instant) -> PauseState {
        PauseState {
            paused: None,
            signal: CancellationToken::new(),
            backoff: FIRST_PAUSE_BACKOFF,
            resumed_at: now,
        }
    }

    fn probe_in(s: &PauseState, now: Instant) -> Duration {
        s.paused.expect("paused").1 - now
    }

    #[tokio::test(start_paused = true)]
    async fn probes_back_off_to_a_minute_and_reset_after_a_minute_of_work() {
        let t0 = Instant::now();
        let mut s = state(t0);
        let signal = s.signal.clone();
        s.pause(PauseReason::NoToken, t0);
        assert!(signal.is_cancelled(), "waiting jobs are told");
        assert_eq!(probe_in(&s, t0), Duration::from_secs(1));
        let mut waits = Vec::new();
        for _ in 0..8 {
            s.reschedule(t0);
            waits.push(probe_in(&s, t0).as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);

        // Resumed, then paused again at once: the backoff keeps growing.
        s.resume(t0);
        assert!(!s.signal.is_cancelled(), "a fresh signal after resuming");
        s.pause(PauseReason::Forbidden, t0 + Duration::from_secs(10));
        assert_eq!(
            probe_in(&s, t0 + Duration::from_secs(10)),
            MAX_PAUSE_BACKOFF
        );

        // A minute and more of work: the next pause starts from a second again.
        s.resume(t0);
        let later = t0 + Duration::from_secs(61);
        s.pause(PauseReason::NoToken, later);
        assert_eq!(probe_in(&s, later), Duration::from_secs(1));
    }
}
