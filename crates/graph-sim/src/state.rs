//! The simulator's shared state and the rules that decide each answer.
//!
//! Every request takes the lock once, decides synchronously, and answers (after any delay)
//! without holding it, so thousands of calls a second never wait on each other.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rand::RngExt;
use rand::distr::Alphanumeric;

use crate::aad::AadError;
use crate::assertion::Issuer;
use crate::devices::{Device, Devices, Filter, ListQuery, is_guid};
use crate::throttle::{self, Told, Window};
use crate::token::{self, App, Form};
use crate::{Behaviour, Scripted, SimOptions, Stats};

const MAX_UNEXPECTED: usize = 100;
/// Filters and arrival times of list calls kept in the stats.
const MAX_FILTERS_KEPT: usize = 100;
const MAX_OFFSETS_KEPT: usize = 1000;
/// Retry-After for the manual outage switch, whose end the simulator cannot know.
const MANUAL_OUTAGE_WAIT: Duration = Duration::from_secs(1);

/// Settings fixed for the simulator's lifetime.
pub(super) struct Config {
    pub app: App,
    pub token_ttl: Duration,
    pub page_size: usize,
    outages: Vec<(f64, f64)>,
    pub started: Instant,
}

const MAX_ISSUED_KEPT: usize = 100;

pub(super) struct Shared {
    pub cfg: Config,
    inner: Mutex<Inner>,
}

struct Inner {
    behaviour: Behaviour,
    stats: Stats,
    in_flight: u64,
    tokens: HashMap<String, Token>,
    /// The latest tokens handed out, revoked or not, so tests can look for them in logs.
    issued: VecDeque<String>,
    /// The latest client assertions received, accepted or not, for the same reason.
    assertions: VecDeque<String>,
    script: VecDeque<Scripted>,
    read_script: VecDeque<Scripted>,
    windows: HashMap<String, Window>,
    /// Reads are throttled in windows of their own (Intune's read and write limits differ).
    read_windows: HashMap<String, Window>,
    /// Per tenant, the latest instant a Retry-After sent to it denoted.
    not_before: HashMap<String, SystemTime>,
    /// Every wait told to each tenant's clients, for `late_calls`.
    told: HashMap<String, Told>,
    devices: Option<Devices>,
}

struct Token {
    tenant: String,
    expires: Instant,
}

/// How to answer one Graph call (the response body follows from the status).
#[derive(Debug)]
pub(super) struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    /// Replaces the status's usual error message (why a token was refused, why a filter was).
    pub message: Option<String>,
    pub delay: Duration,
}

impl Answer {
    fn new(status: u16) -> Answer {
        Answer {
            status,
            retry_after: None,
            message: None,
            delay: Duration::ZERO,
        }
    }

    fn with_message(status: u16, message: impl Into<String>) -> Answer {
        Answer {
            message: Some(message.into()),
            ..Answer::new(status)
        }
    }

    fn retry_after(self, value: Option<String>) -> Answer {
        Answer {
            retry_after: value,
            ..self
        }
    }
}

impl From<Scripted> for Answer {
    fn from(s: Scripted) -> Answer {
        Answer {
            delay: Duration::from_millis(s.delay_ms),
            ..Answer::new(s.status).retry_after(s.retry_after)
        }
    }
}

/// One page of the device list.
pub(super) struct Page {
    pub devices: Vec<Device>,
    /// Query string of the next page, if there is one.
    pub next_query: Option<String>,
    /// Replaces the request's own origin in `@odata.nextLink`.
    pub next_origin: Option<String>,
    pub delay: Duration,
}

/// Counts an action call as in flight until dropped (also when the client goes away mid-delay).
pub(super) struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

impl Shared {
    pub fn new(opts: &SimOptions) -> anyhow::Result<Shared> {
        let devices = match &opts.inventory {
            Some(list) => Some(Devices::from_list(list.clone())),
            None => opts.devices.as_deref().map(Devices::load).transpose()?,
        };
        let cfg = Config {
            app: App {
                tenant_id: opts.tenant_id.clone(),
                client_id: opts.client_id.clone(),
                issuer: Issuer::generate()?,
            },
            token_ttl: Duration::from_secs(opts.token_ttl_secs),
            page_size: opts.page_size.max(1),
            outages: opts.outages.clone(),
            started: Instant::now(),
        };
        let mut behaviour = Behaviour::from(opts);
        for path in &opts.client_certificates {
            let pem = std::fs::read_to_string(path).with_context(|| {
                format!("graph-sim: cannot read certificate {}", path.display())
            })?;
            behaviour.client_certificates.push(pem);
        }
        let inner = Inner {
            behaviour,
            stats: Stats::default(),
            in_flight: 0,
            tokens: HashMap::new(),
            issued: VecDeque::new(),
            assertions: VecDeque::new(),
            script: VecDeque::new(),
            read_script: VecDeque::new(),
            windows: HashMap::new(),
            read_windows: HashMap::new(),
            not_before: HashMap::new(),
            told: HashMap::new(),
            devices,
        };
        Ok(Shared {
            cfg,
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the simulator down with it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn reset_stats(&self) {
        let mut inner = self.lock();
        inner.stats = Stats {
            max_in_flight: inner.in_flight,
            ..Stats::default()
        };
    }

    pub fn behaviour(&self) -> Behaviour {
        self.lock().behaviour.clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.lock().behaviour);
    }

    pub fn push_script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.lock().script.extend(answers);
    }

    pub fn push_read_script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.lock().read_script.extend(answers);
    }

    pub fn devices(&self) -> Vec<Device> {
        let inner = self.lock();
        inner
            .devices
            .as_ref()
            .map(|d| d.list().to_vec())
            .unwrap_or_default()
    }

    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().issued.iter().cloned().collect()
    }

    pub fn received_assertions(&self) -> Vec<String> {
        self.lock().assertions.iter().cloned().collect()
    }

    pub fn record_unexpected(&self, request: String) {
        self.lock().stats.record_unexpected(request);
    }

    /// Handles a token request for `tenant` sent to `token_url`: the access token, or Entra's
    /// error.
    pub fn token(
        &self,
        tenant: &str,
        token_url: &str,
        form: &Form,
    ) -> (Result<String, AadError>, Duration) {
        let mut inner = self.lock();
        inner.stats.token_requests += 1;
        if let Some(assertion) = form.get("client_assertion") {
            keep_latest(&mut inner.assertions, assertion.clone());
        }
        let result = token::validate(&self.cfg.app, &inner.behaviour, tenant, token_url, form);
        let result = result.map(|kind| {
            *inner
                .stats
                .tokens_by_credential
                .entry(kind.to_owned())
                .or_default() += 1;
            *inner
                .stats
                .tokens_by_tenant
                .entry(tenant.to_ascii_lowercase())
                .or_default() += 1;
            inner.issue_token(tenant, self.cfg.token_ttl)
        });
        inner.stats.token_failures += u64::from(result.is_err());
        (result, inner.latency())
    }

    /// Decides the answer to an `unassignUserFromDevice` call; the guard keeps it counted in flight.
    pub fn unassign(
        &self,
        bearer: Option<&str>,
        id: &str,
        request: &str,
    ) -> (Answer, InFlight<'_>) {
        let mut inner = self.lock();
        inner.enter();
        inner.stats.action_calls += 1;
        if inner.stats.first_action_offset_ms.is_none() {
            let offset = u64::try_from(self.cfg.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            inner.stats.first_action_offset_ms = Some(offset);
        }
        *inner
            .stats
            .calls_by_device
            .entry(id.to_owned())
            .or_default() += 1;
        let mut answer = inner.unassign(&self.cfg, bearer, id, request);
        *inner
            .stats
            .responses_by_status
            .entry(answer.status)
            .or_default() += 1;
        answer.delay += inner.latency();
        (answer, InFlight(self))
    }

    /// A device list call, counted in flight until the guard drops.
    pub fn list_in_flight(&self) -> InFlight<'_> {
        self.lock().enter();
        InFlight(self)
    }

    /// Decides the answer to a device list call.
    pub fn list(&self, bearer: Option<&str>, raw_query: Option<&str>) -> Result<Page, Answer> {
        let mut inner = self.lock();
        inner.stats.list_calls += 1;
        let offset = u64::try_from(self.cfg.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if inner.stats.list_call_offsets_ms.len() < MAX_OFFSETS_KEPT {
            inner.stats.list_call_offsets_ms.push(offset);
        }
        let latency = inner.latency();
        let result = inner.list(self.cfg.page_size, bearer, raw_query);
        let status = result.as_ref().map_or_else(|a| a.status, |_| 200);
        *inner
            .stats
            .list_responses_by_status
            .entry(status)
            .or_default() += 1;
        result
            .map(|page| Page {
                delay: latency,
                ..page
            })
            .map_err(|answer| Answer {
                delay: latency,
                ..answer
            })
    }
}

impl Stats {
    fn record_unexpected(&mut self, request: String) {
        if self.unexpected_requests.len() < MAX_UNEXPECTED {
            self.unexpected_requests.push(request);
        }
    }
}

impl Inner {
    fn enter(&mut self) {
        self.in_flight += 1;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.in_flight);
    }

    fn latency(&self) -> Duration {
        Duration::from_millis(self.behaviour.latency_ms)
    }

    fn issue_token(&mut self, tenant: &str, ttl: Duration) -> String {
        let now = Instant::now();
        self.tokens.retain(|_, t| t.expires > now);
        let token: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(64)
            .map(char::from)
            .collect();
        let expires = now + ttl;
        let tenant = tenant.to_ascii_lowercase();
        self.tokens.insert(token.clone(), Token { tenant, expires });
        keep_latest(&mut self.issued, token.clone());
        token
    }

    /// The tenant of a valid bearer token, or why it is refused (Graph's 401 messages).
    fn authenticate(&self, bearer: Option<&str>) -> Result<String, Answer> {
        let refuse = |message: &str| Answer::with_message(401, message);
        let bearer = bearer
            .filter(|b| !b.is_empty())
            .ok_or_else(|| refuse("Access token is empty."))?;
        let token = self
            .tokens
            .get(bearer)
            .ok_or_else(|| refuse("Access token validation failure. Invalid audience."))?;
        if token.expires <= Instant::now() {
            return Err(refuse("Lifetime validation failed, the token is expired."));
        }
        Ok(token.tenant.clone())
    }

    /// Authentication and permission, checked first on every Graph call.
    fn admit(&self, bearer: Option<&str>) -> Result<String, Answer> {
        let tenant = self.authenticate(bearer)?;
        if self.behaviour.forbid {
            return Err(Answer::new(403));
        }
        Ok(tenant)
    }

    fn unassign(&mut self, cfg: &Config, bearer: Option<&str>, id: &str, request: &str) -> Answer {
        let tenant = match self.admit(bearer) {
            Ok(tenant) => tenant,
            Err(answer) => return answer,
        };
        *self
            .stats
            .calls_by_tenant
            .entry(tenant.clone())
            .or_default() += 1;
        if !is_guid(id) {
            self.stats.record_unexpected(request.to_owned());
            return Answer::new(400);
        }
        let now = SystemTime::now();
        self.stats.early_calls += u64::from(self.is_early(&tenant, now));
        let late = self.told.get(&tenant).is_some_and(|t| t.is_late(now));
        self.stats.late_calls += u64::from(late);
        let answer = self
            .script
            .pop_front()
            .map(Answer::from)
            .or_else(|| self.outage(cfg, now))
            .or_else(|| self.throttle(Kind::Write, &tenant, now))
            .or_else(|| self.injected_error(now))
            .or_else(|| self.failing_device(id))
            .unwrap_or_else(|| self.apply_unassign(id));
        self.remember_retry_after(tenant, &answer, now);
        answer
    }

    /// Every call to the tenant must wait out the latest Retry-After it was given.
    fn remember_retry_after(&mut self, tenant: String, answer: &Answer, now: SystemTime) {
        let deadline = answer
            .retry_after
            .as_deref()
            .and_then(|v| throttle::deadline(v, now));
        if let Some(deadline) = deadline {
            let told = self.told.entry(tenant.clone()).or_default();
            told.tell(now, deadline);
            let latest = self.not_before.entry(tenant).or_insert(deadline);
            *latest = (*latest).max(deadline);
        }
    }

    fn failing_device(&self, id: &str) -> Option<Answer> {
        let status = *self.behaviour.failing_devices.get(id)?;
        Some(Answer::new(status))
    }

    /// 503 during a configured outage window (Retry-After: until its end) or the manual switch.
    fn outage(&self, cfg: &Config, now: SystemTime) -> Option<Answer> {
        let elapsed = cfg.started.elapsed().as_secs_f64();
        let window = cfg
            .outages
            .iter()
            .find(|(start, end)| (*start..*end).contains(&elapsed));
        let wait = match window {
            Some((_, end)) => Duration::from_secs_f64(end - elapsed),
            None if self.behaviour.outage => MANUAL_OUTAGE_WAIT,
            None => return None,
        };
        let retry_after = self
            .behaviour
            .outage_retry_after
            .then(|| self.retry_after(wait, now));
        Some(Answer::new(503).retry_after(retry_after.flatten()))
    }

    /// Whether a call to `tenant` now comes before a Retry-After it was given.
    fn is_early(&self, tenant: &str, now: SystemTime) -> bool {
        self.not_before.get(tenant).is_some_and(|&t| now < t)
    }

    /// 429 when the call is over its kind's limit; reads and writes count in windows apart.
    fn throttle(&mut self, kind: Kind, tenant: &str, now: SystemTime) -> Option<Answer> {
        let (windows, limit) = match kind {
            Kind::Write => {
                let own = self.behaviour.tenants.get(tenant);
                let limit = own.and_then(|app| app.throttle_limit);
                (
                    &mut self.windows,
                    limit.unwrap_or(self.behaviour.throttle_limit),
                )
            }
            Kind::Read => (&mut self.read_windows, self.behaviour.read_throttle_limit),
        };
        let limit = usize::try_from(limit).ok().filter(|&l| l > 0)?;
        let window = Duration::from_millis(self.behaviour.throttle_window_ms);
        let wait =
            windows
                .entry(tenant.to_owned())
                .or_default()
                .hit(Instant::now(), limit, window)?;
        Some(Answer::new(429).retry_after(self.retry_after(wait, now)))
    }

    /// A random error per `error_rates`; 429 and 503 carry a short Retry-After like Graph's.
    fn injected_error(&self, now: SystemTime) -> Option<Answer> {
        let mut rng = rand::rng();
        let roll: f64 = rng.random();
        let mut cumulative = 0.0;
        let &(status, _) = self.behaviour.error_rates.iter().find(|(_, ratio)| {
            cumulative += ratio;
            roll < cumulative
        })?;
        let retry_after = matches!(status, 429 | 503)
            .then(|| self.retry_after(Duration::from_millis(rng.random_range(500..2500)), now));
        Some(Answer::new(status).retry_after(retry_after.flatten()))
    }

    fn apply_unassign(&mut self, id: &str) -> Answer {
        let lagging = self.behaviour.lagging_unassign;
        let known = self.devices.as_mut().is_none_or(|d| {
            if lagging {
                d.contains(id)
            } else {
                d.unassign(id)
            }
        });
        Answer::new(if known { 204 } else { 404 })
    }

    fn retry_after(&self, wait: Duration, now: SystemTime) -> Option<String> {
        throttle::format(self.behaviour.retry_after, wait, now)
    }

    fn list(
        &mut self,
        page_size: usize,
        bearer: Option<&str>,
        raw: Option<&str>,
    ) -> Result<Page, Answer> {
        let tenant = self.admit(bearer)?;
        let query = ListQuery::parse(raw);
        if let Ok(ListQuery {
            raw_filter: Some(filter),
            ..
        }) = &query
            && self.stats.filters.len() < MAX_FILTERS_KEPT
        {
            self.stats.filters.push(filter.clone());
        }
        let now = SystemTime::now();
        self.stats.early_reads += u64::from(self.is_early(&tenant, now));
        let refused = self
            .read_script
            .pop_front()
            .map(Answer::from)
            .or_else(|| self.throttle(Kind::Read, &tenant, now));
        if let Some(answer) = refused {
            self.remember_retry_after(tenant, &answer, now);
            return Err(answer);
        }
        let query = query.map_err(|message| Answer::with_message(400, message))?;
        if self.behaviour.refuse_upn_filter && matches!(query.filter, Filter::UpnEquals(_)) {
            let message = "Invalid filter clause: filtering on userPrincipalName is not supported.";
            return Err(Answer::with_message(400, message));
        }
        let (devices, more) = self
            .devices
            .as_ref()
            .map(|d| d.page(&query, page_size))
            .unwrap_or_default();
        Ok(Page {
            next_query: more.then(|| query.next_query(devices.len())),
            next_origin: self.behaviour.next_link_origin.clone(),
            devices,
            delay: Duration::ZERO,
        })
    }
}

fn keep_latest(kept: &mut VecDeque<String>, value: String) {
    if kept.len() == MAX_ISSUED_KEPT {
        kept.pop_front();
    }
    kept.push_back(value);
}

/// Which of a tenant's limits a call counts against.
#[derive(Clone, Copy)]
enum Kind {
    Write,
    Read,
}
