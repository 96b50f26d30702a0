//! Typed settings, layered as CONTRACT section 2: embedded `config/default.toml` → the file named by
//! `--config` / `UNASSIGN_CONFIG` → `UNASSIGN__<SECTION>__<KEY>` → the ecosystem's standard
//! variables (`AMQP_URL`, `AZURE_*`). Every problem is a [`ConfigError`] naming the key, which the
//! CLI turns into exit code 2.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use figment::{
    Figment, Source,
    providers::{Env, Format, Serialized, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::{
    contract::{Limits, StateKeys},
    credential::{ClientSecret, Credential},
    throttle::{Budget, GateConfig},
};

const DEFAULTS: &str = include_str!("../config/default.toml");

/// A configuration problem; the message names the key and says why.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub(crate) fn key(key: &str, why: impl std::fmt::Display) -> Self {
        Self(format!("`{key}` {why}"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub auth: AuthSettings,
    pub graph: GraphSettings,
    pub retry: RetrySettings,
    pub worker: WorkerSettings,
    pub http: HttpSettings,
    pub intake: IntakeSettings,
    pub log: LogSettings,
    /// Further tenant profiles by name (`[tenants.<name>]`); `auth` is the `default` one.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSettings>,
}

/// One more tenant the worker serves (`[tenants.<name>]`), for requests naming its `tenant_id`.
/// Inline secrets only from the environment (`UNASSIGN__TENANTS__<NAME>__CLIENT_SECRET`), never
/// from a file: a config file is not a secret store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    pub tenant_id: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_certificate_path: Option<PathBuf>,
    #[serde(default)]
    pub client_certificate_password: Option<SecretString>,
    #[serde(default)]
    pub client_certificate_password_file: Option<PathBuf>,
    #[serde(default)]
    pub federated_token_file: Option<PathBuf>,
    /// Defaults to `auth.authority_host`.
    #[serde(default)]
    pub authority_host: Option<Url>,
    /// Defaults to `graph.max_requests_per_second`.
    #[serde(default)]
    pub max_requests_per_second: Option<f64>,
    /// Defaults to `graph.max_reads_per_second`.
    #[serde(default)]
    pub max_reads_per_second: Option<f64>,
    /// Defaults to `graph.adaptive_throttling`.
    #[serde(default)]
    pub adaptive_throttling: Option<bool>,
}

/// A tenant profile's name: `default` (the `auth` section) or a `[tenants.<name>]` key. The only
/// values the `tenant` metric label takes, with [`TenantName::unknown`] — never a tenant id from
/// a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantName(Arc<str>);

impl TenantName {
    /// The profile of the `auth` section: requests without a `tenant_id`.
    pub fn default_profile() -> Self {
        Self("default".into())
    }

    /// Requests that selected no profile (unparseable, or naming an unknown tenant).
    pub fn unknown() -> Self {
        Self("unknown".into())
    }

    /// Lower case, so that `UNASSIGN__TENANTS__<NAME>__…` (which figment lower-cases) reaches
    /// the same profile; no `__`, which would split the variable name.
    fn parse(name: &str) -> Result<Self, ConfigError> {
        let key = format!("tenants.{name}");
        let valid = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
            && !name.contains("__");
        if !valid {
            return Err(ConfigError::key(
                &key,
                "must be named with 1-32 of a-z 0-9 _ - (no `__`)",
            ));
        }
        if ["default", "unknown"].contains(&name) {
            return Err(ConfigError::key(&key, "is a reserved name"));
        }
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant profile, validated: who it is, how it authenticates, how fast it may be called.
#[derive(Debug, Clone)]
pub struct TenantProfile {
    pub name: TenantName,
    pub credentials: Credentials,
    /// For writes (the unassign action)…
    pub gate: GateConfig,
    /// …and for reads (lookups).
    pub read_gate: GateConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// The broker nodes; they hold the password, hence secret: log [`AmqpSettings::redacted_url`].
    pub url: BrokerUrls,
    pub prefetch: u16,
    pub heartbeat_secs: u16,
    pub declare_topology: bool,
    pub reconnect_max_delay_secs: u64,
    /// How often the request and dead-letter queue depths are read for `/metrics`.
    pub queue_poll_secs: u64,
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub events_exchange: String,
    pub outcomes_queue: String,
    pub delivery_limit: u32,
    pub delay_tiers_secs: Vec<u64>,
    /// `x-quorum-initial-group-size` of every queue; 0 leaves it to the broker.
    pub quorum_initial_group_size: u32,
}

/// The broker's nodes in order of preference: `amqp.url` as one URI, a comma-separated list
/// (how `AMQP_URL` carries several) or an array.
#[derive(Clone, Deserialize)]
#[serde(from = "UrlList")]
pub struct BrokerUrls(Vec<SecretString>);

#[derive(Deserialize)]
#[serde(untagged)]
enum UrlList {
    One(String),
    Many(Vec<String>),
}

impl From<UrlList> for BrokerUrls {
    fn from(list: UrlList) -> Self {
        let entries = match list {
            UrlList::One(s) => vec![s],
            UrlList::Many(v) => v,
        };
        let urls = entries
            .iter()
            .flat_map(|e| e.split(','))
            .map(|u| SecretString::from(u.trim().to_owned()))
            .collect();
        Self(urls)
    }
}

/// A URL or a comma-separated list of them, as `AMQP_URL` carries it.
impl From<String> for BrokerUrls {
    fn from(urls: String) -> Self {
        UrlList::One(urls).into()
    }
}

impl std::fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|u| redact_url(u.expose_secret())))
            .finish()
    }
}

impl BrokerUrls {
    /// Each entry is an `amqp://` or `amqps://` URL with a host; the error names the entry by
    /// position and never shows it (it may hold a password).
    fn validate(&self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            return Err(ConfigError::key("amqp.url", "lists no broker"));
        }
        for (i, url) in self.0.iter().enumerate() {
            let entry = format!("amqp.url (entry {} of {})", i + 1, self.0.len());
            match Url::parse(url.expose_secret()) {
                Ok(u) if !matches!(u.scheme(), "amqp" | "amqps") => {
                    return Err(ConfigError::key(
                        &entry,
                        "must start with amqp:// or amqps://",
                    ));
                }
                Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {}
                Ok(_) => return Err(ConfigError::key(&entry, "has no host")),
                Err(e) => return Err(ConfigError::key(&entry, format!("is not a URL: {e}"))),
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Node `i`'s URL. Secret: never log it.
    pub fn get(&self, i: usize) -> &SecretString {
        &self.0[i]
    }

    /// What the default state key is derived from: the broker user, password and vhost of the
    /// first entry (lapin's defaults where the URL leaves them out), which every replica of a
    /// deployment shares and producers with broker users of their own do not know.
    pub fn state_key_material(&self) -> Vec<u8> {
        let Some(url) = self
            .0
            .first()
            .and_then(|u| Url::parse(u.expose_secret()).ok())
        else {
            return b"guest:guest@/".to_vec();
        };
        let user = match url.username() {
            "" => "guest",
            user => user,
        };
        let vhost = match url.path().trim_start_matches('/') {
            "" => "%2f",
            vhost => vhost,
        };
        let password = url.password().unwrap_or("guest");
        format!("{user}:{password}@{vhost}").into_bytes()
    }

    /// `host:port` of every node, in order: what logs and the `node` metric label show.
    pub fn labels(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|u| node_label(u.expose_secret()))
            .collect()
    }
}

/// `host:port` of a broker URL, the port defaulted by scheme.
fn node_label(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => {
            let port = u
                .port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
            format!("{}:{port}", u.host_str().unwrap_or_default())
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub authority_host: Url,
    pub tenant_id: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_certificate_path: Option<PathBuf>,
    #[serde(default)]
    pub client_certificate_password: Option<SecretString>,
    #[serde(default)]
    pub federated_token_file: Option<PathBuf>,
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSettings {
    pub base_url: Url,
    pub timeout_secs: u64,
    pub max_requests_per_second: f64,
    /// The same for reads (device lookups), a budget of their own.
    pub max_reads_per_second: f64,
    pub adaptive_throttling: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_secs: u64,
    pub max_elapsed_secs: u64,
    pub park_after_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub shutdown_grace_secs: u64,
    pub instance: String,
    /// The keys that sign the state a job carries in headers, one a line (the first signs,
    /// every one verifies). Unset: a key derived from the broker credentials.
    #[serde(default)]
    pub state_key_file: Option<PathBuf>,
    /// The same keys inline, comma- or newline-separated: from the environment only
    /// (`UNASSIGN__WORKER__STATE_KEYS`), never in a file.
    #[serde(default)]
    pub state_keys: Option<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
}

/// The HTTP intake (`unassign-worker intake`, CONTRACT section 9).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeSettings {
    /// The public port: `/v1/*` only.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, apart from the public port.
    pub metrics_listen: SocketAddr,
    /// Bearer tokens, one a line; read again when the file changes.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// HMAC-SHA256 secrets, one a line; any line verifies, so secrets rotate.
    #[serde(default)]
    pub hmac_secret_file: Option<PathBuf>,
    /// A body above this is answered 413 unread.
    pub max_body_bytes: usize,
    /// Requests in one post; more is answered 413.
    pub max_batch: usize,
    /// How long a confirmed message-id is remembered, so a repeat publishes nothing.
    pub idempotency_window_secs: u64,
    /// How many message-ids are remembered at most (the oldest go first).
    pub idempotency_capacity: usize,
    /// Posts per second each credential may make (a token bucket, bursts up to one second's
    /// worth); 0 = no limit.
    pub rate_limit_per_second: f64,
    /// A post whose confirms take longer is answered 503 (and nothing is half-accepted).
    pub publish_timeout_secs: u64,
    /// After SIGTERM: how long posts in progress may take to finish their confirms.
    pub shutdown_grace_secs: u64,
}

impl IntakeSettings {
    /// What `intake` needs beyond the defaults' own checks: a credential source, and limits
    /// that can be met.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bearer_token_file.is_none() && self.hmac_secret_file.is_none() {
            return Err(ConfigError(
                "`intake.bearer_token_file` and `intake.hmac_secret_file` are both unset: \
                 set at least one (UNASSIGN__INTAKE__BEARER_TOKEN_FILE or \
                 UNASSIGN__INTAKE__HMAC_SECRET_FILE)"
                    .to_owned(),
            ));
        }
        if self.listen == self.metrics_listen && self.listen.port() != 0 {
            return Err(ConfigError::key(
                "intake.metrics_listen",
                format!(
                    "is intake.listen's address ({}): the public port serves only /v1/*",
                    self.listen
                ),
            ));
        }
        let at_least_one = [
            ("intake.max_body_bytes", self.max_body_bytes as u64),
            ("intake.max_batch", self.max_batch as u64),
            (
                "intake.idempotency_capacity",
                self.idempotency_capacity as u64,
            ),
            (
                "intake.idempotency_window_secs",
                self.idempotency_window_secs,
            ),
            ("intake.publish_timeout_secs", self.publish_timeout_secs),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::key(key, "must be at least 1"));
        }
        if !(self.rate_limit_per_second >= 0.0 && self.rate_limit_per_second.is_finite()) {
            return Err(ConfigError::key(
                "intake.rate_limit_per_second",
                "must be a finite number ≥ 0",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// Standard variables and the keys they set; later entries win over `UNASSIGN__…`.
const STANDARD_VARS: &[(&str, &str)] = &[
    ("AMQP_URL", "amqp.url"),
    ("AZURE_TENANT_ID", "auth.tenant_id"),
    ("AZURE_CLIENT_ID", "auth.client_id"),
    ("AZURE_CLIENT_SECRET", "auth.client_secret"),
    ("AZURE_CLIENT_SECRET_FILE", "auth.client_secret_file"),
    (
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "auth.client_certificate_path",
    ),
    (
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
        "auth.client_certificate_password",
    ),
    ("AZURE_FEDERATED_TOKEN_FILE", "auth.federated_token_file"),
    ("AZURE_AUTHORITY_HOST", "auth.authority_host"),
];

impl Settings {
    /// Loads the layers from the process environment. `file` is `--config`, else `UNASSIGN_CONFIG`.
    pub fn load(file: Option<PathBuf>) -> Result<Self, ConfigError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file.or_else(|| var("UNASSIGN_CONFIG").map(PathBuf::from)) {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("UNASSIGN__").split("__"));
        for (name, key) in STANDARD_VARS {
            if let Some(value) = var(name) {
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        let settings: Settings = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        settings.refuse_secrets_in_files(&figment)?;
        Ok(settings)
    }

    /// A tenant's inline secret must come from the environment; in a file it would sit next to
    /// settings that are shared, reviewed and committed.
    fn refuse_secrets_in_files(&self, figment: &Figment) -> Result<(), ConfigError> {
        let from_file = |key: &str| {
            figment
                .find_metadata(key)
                .is_some_and(|m| matches!(m.source, Some(Source::File(_))))
        };
        if self.worker.state_keys.is_some() && from_file("worker.state_keys") {
            return Err(ConfigError::key(
                "worker.state_keys",
                "is a secret in a config file: use worker.state_key_file, or the variable \
                 UNASSIGN__WORKER__STATE_KEYS",
            ));
        }
        for (name, tenant) in &self.tenants {
            let inline = [
                ("client_secret", tenant.client_secret.is_some()),
                (
                    "client_certificate_password",
                    tenant.client_certificate_password.is_some(),
                ),
            ];
            for (field, set) in inline {
                let key = format!("tenants.{name}.{field}");
                if set && from_file(&key) {
                    return Err(ConfigError::key(
                        &key,
                        format!(
                            "is a secret in a config file: use {field}_file, or the variable \
                             UNASSIGN__TENANTS__{}__{}",
                            name.to_uppercase(),
                            field.to_uppercase()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.url.validate()?;
        require_https_unless_loopback("graph.base_url", &self.graph.base_url)?;
        require_https_unless_loopback("auth.authority_host", &self.auth.authority_host)?;
        if self.worker.concurrency == 0 {
            return Err(ConfigError::key("worker.concurrency", "must be at least 1"));
        }
        if self.amqp.prefetch != 0 && usize::from(self.amqp.prefetch) <= self.worker.concurrency {
            return Err(ConfigError::key(
                "amqp.prefetch",
                format!(
                    "must exceed worker.concurrency ({})",
                    self.worker.concurrency
                ),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::key("retry.max_attempts", "must be at least 1"));
        }
        let rates = [
            (
                "graph.max_requests_per_second",
                self.graph.max_requests_per_second,
            ),
            (
                "graph.max_reads_per_second",
                self.graph.max_reads_per_second,
            ),
        ];
        if let Some((key, _)) = rates.iter().find(|(_, r)| !(*r >= 0.0 && r.is_finite())) {
            return Err(ConfigError::key(key, "must be a finite number ≥ 0"));
        }
        let tiers = &self.amqp.delay_tiers_secs;
        if tiers.is_empty() || tiers[0] == 0 || tiers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ConfigError::key(
                "amqp.delay_tiers_secs",
                "must list increasing whole seconds ≥ 1",
            ));
        }
        if self.graph.timeout_secs == 0 {
            return Err(ConfigError::key("graph.timeout_secs", "must be at least 1"));
        }
        Ok(())
    }

    /// What `run` and `check` need beyond the broker: the app registration and its credential,
    /// which is read (and, for a certificate, signed with) once now so a mistake exits 2 at start.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        let auth = &self.auth;
        if !crate::contract::is_guid(&auth.tenant_id) {
            return Err(ConfigError::key(
                "auth.tenant_id (AZURE_TENANT_ID)",
                "is required and must be a GUID",
            ));
        }
        if auth.client_id.is_empty() {
            return Err(ConfigError::key(
                "auth.client_id (AZURE_CLIENT_ID)",
                "is required",
            ));
        }
        let (key, credential) = auth.credential()?;
        self.checked_credentials(
            Credentials {
                authority_host: auth.authority_host.clone(),
                tenant_id: auth.tenant_id.clone(),
                client_id: auth.client_id.clone(),
                credential,
                scope: self.scope(),
            },
            &key,
        )
    }

    /// Every tenant the worker serves, `default` (the `auth` section) first, each validated and
    /// its credential read once now, so a mistake in any of them exits 2 at start.
    pub fn tenant_profiles(&self) -> Result<Vec<TenantProfile>, ConfigError> {
        let mut profiles = vec![TenantProfile {
            name: TenantName::default_profile(),
            credentials: self.credentials()?,
            gate: self.graph.gate_config(Budget::Writes),
            read_gate: self.graph.gate_config(Budget::Reads),
        }];
        for (name, tenant) in &self.tenants {
            let profile = tenant.profile(TenantName::parse(name)?, self)?;
            let same = profiles.iter().find(|p| {
                p.credentials
                    .tenant_id
                    .eq_ignore_ascii_case(&profile.credentials.tenant_id)
            });
            if let Some(other) = same {
                return Err(ConfigError::key(
                    &format!("tenants.{name}.tenant_id"),
                    format!("is already the tenant of profile `{}`", other.name),
                ));
            }
            profiles.push(profile);
        }
        Ok(profiles)
    }

    fn scope(&self) -> String {
        self.auth
            .scope
            .clone()
            .unwrap_or_else(|| default_scope(&self.graph.base_url))
    }

    /// Presents the credential once, so an unreadable file or unusable certificate exits 2.
    fn checked_credentials(
        &self,
        credentials: Credentials,
        key: &str,
    ) -> Result<Credentials, ConfigError> {
        let token_url = credentials.token_url();
        if let Err(e) = credentials
            .credential
            .fields(&credentials.client_id, token_url.as_str())
        {
            return Err(ConfigError::key(key, e));
        }
        Ok(credentials)
    }
}

impl GraphSettings {
    fn gate_config(&self, budget: Budget) -> GateConfig {
        GateConfig {
            max_per_second: match budget {
                Budget::Writes => self.max_requests_per_second,
                Budget::Reads => self.max_reads_per_second,
            },
            adaptive: self.adaptive_throttling,
            budget,
        }
    }
}

impl TenantSettings {
    fn profile(&self, name: TenantName, settings: &Settings) -> Result<TenantProfile, ConfigError> {
        let key = |field: &str| format!("tenants.{name}.{field}");
        if !crate::contract::is_guid(&self.tenant_id) {
            return Err(ConfigError::key(&key("tenant_id"), "must be a GUID"));
        }
        if self.client_id.is_empty() {
            return Err(ConfigError::key(&key("client_id"), "is required"));
        }
        let authority_host = self
            .authority_host
            .clone()
            .unwrap_or_else(|| settings.auth.authority_host.clone());
        require_https_unless_loopback(&key("authority_host"), &authority_host)?;
        let gate = |budget, own: Option<f64>, field: &str| {
            let mut gate = settings.graph.gate_config(budget);
            if let Some(rate) = own {
                if !(rate >= 0.0 && rate.is_finite()) {
                    return Err(ConfigError::key(&key(field), "must be a finite number ≥ 0"));
                }
                gate.max_per_second = rate;
            }
            gate.adaptive = self.adaptive_throttling.unwrap_or(gate.adaptive);
            Ok(gate)
        };
        let write_gate = gate(
            Budget::Writes,
            self.max_requests_per_second,
            "max_requests_per_second",
        )?;
        let read_gate = gate(
            Budget::Reads,
            self.max_reads_per_second,
            "max_reads_per_second",
        )?;
        let (credential_key, credential) = self.credential(&key)?;
        let credentials = Credentials {
            authority_host,
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            credential,
            scope: settings.scope(),
        };
        Ok(TenantProfile {
            name,
            credentials: settings.checked_credentials(credentials, &credential_key)?,
            gate: write_gate,
            read_gate,
        })
    }

    fn credential(
        &self,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(String, Credential), ConfigError> {
        let password = match (
            &self.client_certificate_password,
            &self.client_certificate_password_file,
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError(format!(
                    "`{}` and `{}` are both set: configure at most one",
                    key("client_certificate_password"),
                    key("client_certificate_password_file")
                )));
            }
            (Some(value), None) => Some(ClientSecret::Value(value.clone())),
            (None, Some(file)) => Some(ClientSecret::File(file.clone())),
            (None, None) => None,
        };
        if password.is_some() && self.client_certificate_path.is_none() {
            return Err(ConfigError::key(
                &key("client_certificate_password"),
                format!("is set without {}", key("client_certificate_path")),
            ));
        }
        let candidates = [
            (
                "client_secret",
                self.client_secret
                    .clone()
                    .map(|s| Credential::Secret(ClientSecret::Value(s))),
            ),
            (
                "client_secret_file",
                self.client_secret_file
                    .clone()
                    .map(|p| Credential::Secret(ClientSecret::File(p))),
            ),
            (
                "client_certificate_path",
                self.client_certificate_path
                    .clone()
                    .map(|path| Credential::Certificate { path, password }),
            ),
            (
                "federated_token_file",
                self.federated_token_file
                    .clone()
                    .map(Credential::FederatedToken),
            ),
        ];
        one_credential(
            candidates
                .into_iter()
                .filter_map(|(field, c)| Some((key(field), c?)))
                .collect(),
            || {
                ConfigError::key(
                    &key("client_secret_file"),
                    "or another credential is required: client_secret, client_secret_file, \
                     client_certificate_path or federated_token_file",
                )
            },
        )
    }
}

/// The one credential configured, with the key that set it. Two would leave the choice to an
/// order of precedence nobody remembers, so that is refused as firmly as none.
fn one_credential(
    candidates: Vec<(String, Credential)>,
    missing: impl FnOnce() -> ConfigError,
) -> Result<(String, Credential), ConfigError> {
    let mut candidates = candidates.into_iter();
    match (candidates.next(), candidates.next()) {
        (Some(one), None) => Ok(one),
        (None, _) => Err(missing()),
        (Some((first, _)), Some((second, _))) => Err(ConfigError(format!(
            "`{first}` and `{second}` are both set: configure exactly one credential"
        ))),
    }
}

impl AuthSettings {
    /// The one credential source configured, and the key (and variable) that set it.
    fn credential(&self) -> Result<(String, Credential), ConfigError> {
        let certificate =
            self.client_certificate_path
                .as_ref()
                .map(|path| Credential::Certificate {
                    path: path.clone(),
                    password: self
                        .client_certificate_password
                        .clone()
                        .map(ClientSecret::Value),
                });
        if certificate.is_none() && self.client_certificate_password.is_some() {
            return Err(ConfigError::key(
                "auth.client_certificate_password (AZURE_CLIENT_CERTIFICATE_PASSWORD)",
                "is set without AZURE_CLIENT_CERTIFICATE_PATH",
            ));
        }
        let sources = [
            self.client_secret
                .clone()
                .map(|s| Credential::Secret(ClientSecret::Value(s))),
            self.client_secret_file
                .clone()
                .map(|p| Credential::Secret(ClientSecret::File(p))),
            certificate,
            self.federated_token_file
                .clone()
                .map(Credential::FederatedToken),
        ];
        one_credential(
            sources
                .into_iter()
                .flatten()
                .map(|c| (c.key().to_owned(), c))
                .collect(),
            || {
                ConfigError::key(
                    "auth.client_secret (AZURE_CLIENT_SECRET)",
                    "or another credential is required: set one of AZURE_CLIENT_SECRET, \
                     AZURE_CLIENT_SECRET_FILE, AZURE_CLIENT_CERTIFICATE_PATH, AZURE_FEDERATED_TOKEN_FILE",
                )
            },
        )
    }
}

/// Everything needed to ask the identity platform for a Graph token.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub authority_host: Url,
    pub tenant_id: String,
    pub client_id: String,
    pub credential: Credential,
    pub scope: String,
}

impl Credentials {
    /// `{authority}/{tenant}/oauth2/v2.0/token`, also the audience of client assertions.
    pub fn token_url(&self) -> Url {
        let mut url = self.authority_host.clone();
        url.path_segments_mut()
            .expect("authority_host is an http(s) URL")
            .pop_if_empty()
            .extend([self.tenant_id.as_str(), "oauth2", "v2.0", "token"]);
        url
    }
}

impl AmqpSettings {
    /// Whether `name` is one of the queues the worker declares: the requests, the dead
    /// letters, the outcomes and each delay tier.
    pub fn is_own_queue(&self, name: &str) -> bool {
        [&self.queue, &self.dead_letter_queue, &self.outcomes_queue]
            .iter()
            .any(|q| q.as_str() == name)
            || self
                .delay_tiers_secs
                .iter()
                .any(|&secs| crate::amqp::delay::tier_queue(self, secs) == name)
    }

    /// Deliveries held at once: configured, or twice the Graph concurrency.
    pub fn effective_prefetch(&self, concurrency: usize) -> u16 {
        match self.prefetch {
            0 => u16::try_from(concurrency.saturating_mul(2)).unwrap_or(u16::MAX),
            n => n,
        }
    }

    /// Node `i`'s URL with the heartbeat set, for connecting. Secret: never log it.
    pub fn connect_url(&self, i: usize) -> String {
        let url = self.url.get(i).expose_secret();
        if url.contains("heartbeat=") {
            return url.to_owned();
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}heartbeat={}", self.heartbeat_secs)
    }

    /// The broker URLs without their passwords, comma-separated, for logs and `check`.
    pub fn redacted_url(&self) -> String {
        let urls: Vec<String> = (0..self.url.len())
            .map(|i| redact_url(self.url.get(i).expose_secret()))
            .collect();
        urls.join(",")
    }
}

/// Shortest state key accepted: 32 characters, as `openssl rand -base64 32` gives 44.
const MIN_STATE_KEY: usize = 32;

impl Settings {
    /// The keys that sign and verify the state a job carries in headers (CONTRACT section 2):
    /// `worker.state_key_file`'s, else the key every replica derives from the broker
    /// credentials and vhost of the first `amqp.url` entry, so that nothing needs configuring
    /// for state to survive restarts and replicas, and producers that have broker users of
    /// their own cannot forge it.
    pub fn state_keys(&self) -> Result<StateKeys, ConfigError> {
        let w = &self.worker;
        // An empty variable (a template left blank) is no key source.
        let file = w
            .state_key_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty());
        let inline = w
            .state_keys
            .as_ref()
            .filter(|k| !k.expose_secret().is_empty());
        let (key, source, text) = match (file, inline) {
            (Some(_), Some(_)) => {
                return Err(ConfigError(
                    "`worker.state_key_file` and `worker.state_keys` are both set: keep one"
                        .to_owned(),
                ));
            }
            (None, None) => return Ok(StateKeys::derived(&self.amqp.url.state_key_material())),
            (Some(path), None) => {
                let key = "worker.state_key_file";
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::key(key, format!("{} cannot be read: {e}", path.display()))
                })?;
                (key, path.display().to_string(), text)
            }
            (None, Some(inline)) => (
                "worker.state_keys",
                "the variable".to_owned(),
                inline.expose_secret().replace(',', "\n"),
            ),
        };
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() < MIN_STATE_KEY {
                // The key itself is never shown, only where it is.
                return Err(ConfigError::key(
                    key,
                    format!(
                        "entry {} of {source} is shorter than {MIN_STATE_KEY} characters; make \
                         a key with `openssl rand -base64 32`",
                        n + 1
                    ),
                ));
            }
            keys.push(line);
        }
        StateKeys::new(&keys).ok_or_else(|| ConfigError::key(key, format!("{source} holds no key")))
    }

    /// What a carried state is clamped to: no more attempts than the budget, no wait longer
    /// than any the worker writes — a Retry-After (capped), a backoff, a paused tenant's tier.
    pub fn state_limits(&self) -> Limits {
        let longest_tier = self
            .amqp
            .delay_tiers_secs
            .last()
            .copied()
            .unwrap_or_default();
        Limits {
            max_attempts: self.retry.max_attempts,
            longest_wait: crate::retry::MAX_RETRY_AFTER
                .max(Duration::from_secs(self.retry.max_delay_secs))
                .max(Duration::from_secs(longest_tier.saturating_add(1))),
        }
    }
}

impl RetrySettings {
    pub fn max_elapsed(&self) -> Duration {
        Duration::from_secs(self.max_elapsed_secs)
    }

    pub fn park_after(&self) -> Duration {
        Duration::from_secs(self.park_after_secs)
    }
}

/// `scheme://user:***@host…`: the password never leaves the process.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// Graph's token scope is its origin + `/.default`, so national clouds and the simulator work.
fn default_scope(base: &Url) -> String {
    format!("{}/.default", base.origin().ascii_serialization())
}

/// A client secret or bearer token must never cross a network in clear text.
fn require_https_unless_loopback(key: &str, url: &Url) -> Result<(), ConfigError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        "http" => Err(ConfigError::key(
            key,
            "must use https:// unless the host is loopback",
        )),
        other => Err(ConfigError::key(
            key,
            format!("has unsupported scheme {other}"),
        )),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod tests {
    use super::*;
    use crate::contract::Carried;
    use figment::Jail;
    use lapin::types::FieldTable;

    /// Runs `f` with a clean, private environment (figment's Jail serialises these tests).
    fn jailed(f: impl FnOnce(&mut Jail) -> Result<(), figment::Error>) {
        Jail::expect_with(|jail| {
            jail.clear_env();
            f(jail)
        });
    }

    /// The error text, lower-cased: figment names environment keys as they were spelled.
    fn err(result: Result<Settings, ConfigError>) -> String {
        result
            .expect_err("config should be refused")
            .to_string()
            .to_lowercase()
    }

    #[test]
    fn defaults_match_the_contract() {
        jailed(|_| {
            let s = Settings::load(None).unwrap();
            assert_eq!(s.worker.concurrency, 16);
            assert_eq!(s.amqp.effective_prefetch(16), 32);
            assert_eq!(s.retry.max_attempts, 20);
            assert_eq!(s.retry.base_delay_ms, 1000);
            assert_eq!(s.retry.max_delay_secs, 300);
            assert_eq!(s.retry.max_elapsed_secs, 86_400);
            assert_eq!(s.worker.shutdown_grace_secs, 30);
            assert_eq!(s.http.listen.to_string(), "0.0.0.0:9464");
            assert_eq!(
                s.graph.base_url.as_str(),
                "https://graph.microsoft.com/beta"
            );
            assert_eq!(s.amqp.delivery_limit, 20);
            assert!(s.graph.adaptive_throttling);
            assert_eq!(s.amqp.delay_tiers_secs.first(), Some(&4));
            Ok(())
        });
    }

    #[test]
    fn layers_override_in_order() {
        jailed(|jail| {
            jail.create_file("c.toml", "[worker]\nconcurrency = 4\nshutdown_grace_secs = 7\n[amqp]\nurl = \"amqp://file/x\"")?;
            jail.set_env("UNASSIGN__WORKER__CONCURRENCY", "32");
            jail.set_env("UNASSIGN__AMQP__URL", "amqp://prefixed/x");
            jail.set_env("AMQP_URL", "amqp://standard/x");
            jail.set_env("UNASSIGN__LOG__FORMAT", "text");
            let s = Settings::load(Some("c.toml".into())).unwrap();
            assert_eq!(s.worker.concurrency, 32, "UNASSIGN__ beats the file");
            assert_eq!(s.worker.shutdown_grace_secs, 7, "the file beats defaults");
            assert_eq!(
                s.amqp.url.get(0).expose_secret(),
                "amqp://standard/x",
                "AMQP_URL wins"
            );
            assert_eq!(s.log.format, LogFormat::Text);
            Ok(())
        });
    }

    #[test]
    fn config_file_from_unassign_config() {
        jailed(|jail| {
            jail.create_file("c.toml", "[worker]\nconcurrency = 3")?;
            jail.set_env("UNASSIGN_CONFIG", "c.toml");
            assert_eq!(Settings::load(None).unwrap().worker.concurrency, 3);
            Ok(())
        });
    }

    #[test]
    fn state_keys_come_from_a_file_or_the_environment_and_errors_name_the_key() {
        const K1: &str = "k1-0123456789abcdef0123456789abcdef";
        const K2: &str = "k2-0123456789abcdef0123456789abcdef";
        let state = Carried::fresh(time::OffsetDateTime::UNIX_EPOCH);
        let signed = |s: &Settings| s.state_keys().unwrap().sign(&state, b"{}", None);
        let verifies = |s: &Settings, table: &FieldTable| {
            let now = time::OffsetDateTime::UNIX_EPOCH;
            let keys = s.state_keys().unwrap();
            keys.read(table, b"{}", None, now, s.state_limits())
                .1
                .is_none()
        };
        let key_err = || Settings::load(None).unwrap().state_keys().unwrap_err().0;
        jailed(|jail| {
            // Derived from the broker credentials: the same URL, the same key.
            let table = signed(&Settings::load(None).unwrap());
            assert!(verifies(&Settings::load(None).unwrap(), &table));
            jail.set_env("AMQP_URL", "amqp://producer:pw@127.0.0.1:5672/%2f");
            assert!(!verifies(&Settings::load(None).unwrap(), &table));

            jail.create_file("keys", &format!("# rotated 2026-12\n{K2}\n\n{K1}\n"))?;
            jail.set_env("UNASSIGN__WORKER__STATE_KEY_FILE", "keys");
            let from_file = Settings::load(None).unwrap();
            jail.set_env("UNASSIGN__WORKER__STATE_KEY_FILE", "");
            jail.set_env("UNASSIGN__WORKER__STATE_KEYS", K1);
            let old_only = Settings::load(None).unwrap();
            assert!(
                verifies(&from_file, &signed(&old_only)),
                "every line verifies"
            );
            assert!(
                !verifies(&old_only, &signed(&from_file)),
                "the first line signs"
            );
            jail.set_env("UNASSIGN__WORKER__STATE_KEYS", format!("{K2},{K1}"));
            assert!(verifies(
                &Settings::load(None).unwrap(),
                &signed(&from_file)
            ));

            jail.set_env("UNASSIGN__WORKER__STATE_KEYS", "too-short-a-key");
            let e = key_err();
            assert!(
                e.contains("worker.state_keys") && !e.contains("too-short"),
                "{e}"
            );
            jail.set_env("UNASSIGN__WORKER__STATE_KEYS", "");
            jail.create_file("short", "short\n")?;
            jail.set_env("UNASSIGN__WORKER__STATE_KEY_FILE", "short");
            let e = key_err();
            assert!(
                e.contains("worker.state_key_file") && e.contains("entry 1"),
                "{e}"
            );
            jail.create_file("empty", "# nothing yet\n")?;
            jail.set_env("UNASSIGN__WORKER__STATE_KEY_FILE", "empty");
            assert!(key_err().contains("holds no key"));
            jail.set_env("UNASSIGN__WORKER__STATE_KEY_FILE", "missing");
            assert!(key_err().contains("worker.state_key_file"));
            jail.set_env("UNASSIGN__WORKER__STATE_KEYS", K1);
            assert!(key_err().contains("both set"));
            Ok(())
        });
        jailed(|jail| {
            jail.create_file("c.toml", &format!("[worker]\nstate_keys = \"{K1}\"\n"))?;
            let e = err(Settings::load(Some("c.toml".into())));
            assert!(e.contains("worker.state_keys") && !e.contains(K1), "{e}");
            Ok(())
        });
    }

    #[test]
    fn intake_settings_name_the_key() {
        jailed(|jail| {
            let intake = || Settings::load(None).unwrap().intake;
            let e = intake().validate().unwrap_err().to_string();
            assert!(
                e.contains("intake.bearer_token_file") && e.contains("intake.hmac_secret_file"),
                "{e}"
            );
            jail.set_env("UNASSIGN__INTAKE__HMAC_SECRET_FILE", "/run/secrets/hmac");
            intake().validate().unwrap();
            jail.set_env("UNASSIGN__INTAKE__MAX_BATCH", "0");
            assert!(
                intake()
                    .validate()
                    .unwrap_err()
                    .to_string()
                    .contains("intake.max_batch")
            );
            jail.set_env("UNASSIGN__INTAKE__MAX_BATCH", "10");
            jail.set_env("UNASSIGN__INTAKE__METRICS_LISTEN", "0.0.0.0:8080");
            let e = intake().validate().unwrap_err().to_string();
            assert!(e.contains("intake.metrics_listen"), "{e}");
            jail.set_env("UNASSIGN__INTAKE__METRICS_LISTEN", "0.0.0.0:9465");
            jail.set_env("UNASSIGN__INTAKE__RATE_LIMIT_PER_SECOND", "-1");
            let e = intake().validate().unwrap_err().to_string();
            assert!(e.contains("intake.rate_limit_per_second"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        jailed(|jail| {
            jail.set_env("UNASSIGN__WORKER__CONCURRENCY", "lots");
            assert!(err(Settings::load(None)).contains("worker.concurrency"));
            jail.set_env("UNASSIGN__WORKER__CONCURRENCY", "0");
            assert!(err(Settings::load(None)).contains("worker.concurrency"));
            jail.set_env("UNASSIGN__WORKER__CONCURRENCY", "8");
            jail.set_env("UNASSIGN__WORKER__CONCURENCY", "8");
            assert!(
                err(Settings::load(None)).contains("concurency"),
                "typos are refused"
            );
            Ok(())
        });
        jailed(|jail| {
            jail.set_env("UNASSIGN__AMQP__DELAY_TIERS_SECS", "[8, 4]");
            assert!(err(Settings::load(None)).contains("amqp.delay_tiers_secs"));
            Ok(())
        });
        jailed(|jail| {
            jail.set_env("UNASSIGN__AMQP__PREFETCH", "16");
            assert!(err(Settings::load(None)).contains("amqp.prefetch"));
            Ok(())
        });
        jailed(|_| {
            assert!(err(Settings::load(Some("missing.toml".into()))).contains("missing.toml"));
            Ok(())
        });
    }

    #[test]
    fn plain_http_only_on_loopback() {
        jailed(|jail| {
            jail.set_env("UNASSIGN__GRAPH__BASE_URL", "http://graph.example.com/beta");
            assert!(err(Settings::load(None)).contains("graph.base_url"));
            jail.set_env("UNASSIGN__GRAPH__BASE_URL", "http://127.0.0.1:8080/beta");
            jail.set_env("AZURE_AUTHORITY_HOST", "http://login.example.com");
            assert!(err(Settings::load(None)).contains("auth.authority_host"));
            jail.set_env("AZURE_AUTHORITY_HOST", "http://localhost:8080");
            Settings::load(None).unwrap();
            Ok(())
        });
    }

    #[test]
    fn credentials_are_checked_and_never_printed() {
        jailed(|jail| {
            let s = Settings::load(None).unwrap();
            assert!(err_c(&s).contains("AZURE_TENANT_ID"));
            jail.set_env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47");
            jail.set_env("AZURE_CLIENT_ID", "app");
            assert!(err_c(&Settings::load(None).unwrap()).contains("AZURE_CLIENT_SECRET"));
            jail.set_env("AZURE_CLIENT_SECRET", "hunter2-very-secret");
            let s = Settings::load(None).unwrap();
            let creds = s.credentials().unwrap();
            assert_eq!(creds.scope, "https://graph.microsoft.com/.default");
            for shown in [format!("{s:?}"), format!("{creds:?}")] {
                assert!(
                    !shown.contains("hunter2"),
                    "secret leaked into Debug: {shown}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn secret_from_file_and_scope_from_base_url() {
        jailed(|jail| {
            jail.create_file("secret", "from-file\n")?;
            jail.set_env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47");
            jail.set_env("AZURE_CLIENT_ID", "app");
            jail.set_env("AZURE_CLIENT_SECRET_FILE", "secret");
            jail.set_env(
                "UNASSIGN__GRAPH__BASE_URL",
                "https://graph.microsoft.us/beta",
            );
            let creds = Settings::load(None).unwrap().credentials().unwrap();
            assert_eq!(
                creds.credential.fields("app", "u").unwrap()[0]
                    .1
                    .expose_secret(),
                "from-file"
            );
            assert_eq!(creds.scope, "https://graph.microsoft.us/.default");
            Ok(())
        });
    }

    #[test]
    fn amqp_url_is_redacted_and_gets_a_heartbeat() {
        jailed(|jail| {
            jail.set_env("AMQP_URL", "amqp://user:pa55word@broker:5672/%2f");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.amqp.redacted_url(), "amqp://user:***@broker:5672/%2f");
            assert!(s.amqp.connect_url(0).ends_with("?heartbeat=10"));
            assert!(!format!("{s:?}").contains("pa55word"));
            Ok(())
        });
    }

    /// The variables the Azure workload identity webhook injects.
    fn workload_identity(jail: &mut Jail) -> Result<(), figment::Error> {
        jail.create_file("token", "header.claims.signature\n")?;
        jail.set_env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47");
        jail.set_env("AZURE_CLIENT_ID", "app");
        jail.set_env("AZURE_FEDERATED_TOKEN_FILE", "token");
        jail.set_env("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/");
        Ok(())
    }

    #[test]
    fn workload_identity_is_a_credential() {
        jailed(|jail| {
            workload_identity(jail)?;
            let creds = Settings::load(None).unwrap().credentials().unwrap();
            assert!(matches!(creds.credential, Credential::FederatedToken(_)));
            assert_eq!(
                creds.token_url().as_str(),
                "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token"
            );
            jail.create_file("token", "")?;
            assert!(err_c(&Settings::load(None).unwrap()).contains("AZURE_FEDERATED_TOKEN_FILE"));
            Ok(())
        });
    }

    #[test]
    fn exactly_one_credential_source() {
        jailed(|jail| {
            workload_identity(jail)?;
            jail.set_env("AZURE_CLIENT_SECRET_FILE", "token");
            let e = err_c(&Settings::load(None).unwrap());
            assert!(
                e.contains("AZURE_CLIENT_SECRET_FILE") && e.contains("AZURE_FEDERATED_TOKEN_FILE"),
                "{e}"
            );
            Ok(())
        });
        jailed(|jail| {
            workload_identity(jail)?;
            jail.set_env("AZURE_CLIENT_SECRET", "s");
            jail.set_env("AZURE_CLIENT_SECRET_FILE", "token");
            assert!(err_c(&Settings::load(None).unwrap()).contains("exactly one"));
            Ok(())
        });
        jailed(|jail| {
            workload_identity(jail)?;
            jail.set_env("AZURE_FEDERATED_TOKEN_FILE", "");
            jail.set_env("AZURE_CLIENT_CERTIFICATE_PASSWORD", "pw");
            let e = err_c(&Settings::load(None).unwrap());
            assert!(e.contains("AZURE_CLIENT_CERTIFICATE_PASSWORD"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn a_certificate_is_checked_at_start() {
        jailed(|jail| {
            workload_identity(jail)?;
            jail.set_env("AZURE_FEDERATED_TOKEN_FILE", "");
            jail.create_file(
                "cert.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            )?;
            jail.set_env("AZURE_CLIENT_CERTIFICATE_PATH", "cert.pem");
            let e = err_c(&Settings::load(None).unwrap());
            assert!(
                e.contains("AZURE_CLIENT_CERTIFICATE_PATH") && e.contains("PRIVATE KEY"),
                "{e}"
            );
            let pki = test_support::pki::TestCertificate::generate();
            jail.create_file("cert.pem", &pki.pem())?;
            let creds = Settings::load(None).unwrap().credentials().unwrap();
            assert!(format!("{creds:?}").contains("cert.pem"));
            assert!(!format!("{creds:?}").contains("PRIVATE"));
            Ok(())
        });
    }

    #[test]
    fn amqp_url_lists_several_nodes() {
        jailed(|jail| {
            jail.set_env(
                "AMQP_URL",
                "amqp://u:pa55word@n1:5701/%2f, amqps://u:pa55word@n2/%2f,amqp://n3",
            );
            let s = Settings::load(None).unwrap();
            assert_eq!(s.amqp.url.labels(), ["n1:5701", "n2:5671", "n3:5672"]);
            assert_eq!(
                s.amqp.connect_url(1),
                "amqps://u:pa55word@n2/%2f?heartbeat=10"
            );
            let shown = format!("{s:?} {}", s.amqp.redacted_url());
            assert!(!shown.contains("pa55word"), "password leaked: {shown}");
            assert!(shown.contains("amqp://u:***@n1:5701/%2f,amqps://u:***@n2/%2f,amqp://n3"));
            Ok(())
        });
        jailed(|jail| {
            jail.create_file(
                "c.toml",
                "[amqp]\nurl = [\"amqp://a:5701\", \"amqp://b:5702,amqp://c\"]",
            )?;
            let s = Settings::load(Some("c.toml".into())).unwrap();
            assert_eq!(s.amqp.url.labels(), ["a:5701", "b:5702", "c:5672"]);
            Ok(())
        });
    }

    const CONTOSO: &str = "0a1b2c3d-0000-4000-8000-00000000c0de";

    /// The default tenant from the standard variables, and a `contoso` profile from a file.
    fn two_tenants(jail: &mut Jail, contoso: &str) -> Result<(), figment::Error> {
        jail.set_env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47");
        jail.set_env("AZURE_CLIENT_ID", "app");
        jail.set_env("AZURE_CLIENT_SECRET", "default-secret");
        jail.create_file("contoso.secret", "contoso-secret\n")?;
        jail.create_file("c.toml", &format!("[tenants.contoso]\n{contoso}"))?;
        jail.set_env("UNASSIGN_CONFIG", "c.toml");
        Ok(())
    }

    fn profiles_err(s: &Settings) -> String {
        s.tenant_profiles()
            .expect_err("tenant profiles should be refused")
            .to_string()
    }

    #[test]
    fn tenant_profiles_have_their_own_credentials_and_limits() {
        jailed(|jail| {
            let contoso = format!(
                "tenant_id = \"{CONTOSO}\"\nclient_id = \"contoso-app\"\n\
                 client_secret_file = \"contoso.secret\"\nauthority_host = \"https://login.microsoftonline.us\"\n"
            );
            two_tenants(jail, &contoso)?;
            jail.set_env("UNASSIGN__TENANTS__CONTOSO__MAX_REQUESTS_PER_SECOND", "2");
            let s = Settings::load(None).unwrap();
            let profiles = s.tenant_profiles().unwrap();
            let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["default", "contoso"]);
            let contoso = &profiles[1];
            assert_eq!(contoso.credentials.client_id, "contoso-app");
            assert_eq!(contoso.gate.max_per_second, 2.0, "the variable wins");
            assert_eq!(
                profiles[0].gate.max_per_second, 5.0,
                "default keeps graph's"
            );
            assert_eq!(
                contoso.credentials.token_url().as_str(),
                format!("https://login.microsoftonline.us/{CONTOSO}/oauth2/v2.0/token")
            );
            let fields = contoso.credentials.credential.fields("a", "u").unwrap();
            assert_eq!(fields[0].1.expose_secret(), "contoso-secret");
            for shown in [format!("{s:?}"), format!("{profiles:?}")] {
                assert!(!shown.contains("-secret\""), "secret in Debug: {shown}");
                assert!(
                    !shown.contains("default-secret"),
                    "secret in Debug: {shown}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn bad_amqp_urls_name_the_entry_and_hide_it() {
        for (bad, why) in [
            ("amqp://u:pa55word@n1,http://u:pa55word@n2", "entry 2 of 2"),
            ("amqp://u:pa55word@n1,", "entry 2 of 2"),
            ("amqp://u:pa55word@n1,not a url", "entry 2 of 2"),
            ("amqp://u:pa55word@n1,amqp://", "entry 2 of 2"),
            ("localhost:5672", "entry 1 of 1"),
        ] {
            jailed(|jail| {
                jail.set_env("AMQP_URL", bad);
                let e = err(Settings::load(None));
                assert!(e.contains("amqp.url") && e.contains(why), "{bad}: {e}");
                assert!(!e.contains("pa55word"), "{bad}: password in {e}");
                Ok(())
            });
        }
        jailed(|jail| {
            jail.create_file("c.toml", "[amqp]\nurl = 5")?;
            let e = err(Settings::load(Some("c.toml".into())));
            assert!(e.contains("amqp.url"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn an_inline_tenant_secret_comes_from_the_environment_only() {
        jailed(|jail| {
            let contoso = format!(
                "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret = \"in-a-file\"\n"
            );
            two_tenants(jail, &contoso)?;
            let e = err(Settings::load(None));
            assert!(e.contains("tenants.contoso.client_secret"), "{e}");
            assert!(!e.contains("in-a-file"), "{e}");
            jail.create_file(
                "c.toml",
                &format!("[tenants.contoso]\ntenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\n"),
            )?;
            jail.set_env("UNASSIGN__TENANTS__CONTOSO__CLIENT_SECRET", "from-env");
            let profiles = Settings::load(None).unwrap().tenant_profiles().unwrap();
            let fields = profiles[1].credentials.credential.fields("c", "u").unwrap();
            assert_eq!(fields[0].1.expose_secret(), "from-env");
            Ok(())
        });
    }

    #[test]
    fn tenant_profile_errors_name_the_key() {
        let cases = [
            (
                "tenant_id = \"contoso\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"",
                "tenants.contoso.tenant_id",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"\"\nclient_secret_file = \"contoso.secret\""
                ),
                "tenants.contoso.client_id",
            ),
            (
                &format!("tenant_id = \"{CONTOSO}\"\nclient_id = \"c\""),
                "tenants.contoso.client_secret_file",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"missing\""
                ),
                "tenants.contoso.client_secret_file",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"\nfederated_token_file = \"contoso.secret\""
                ),
                "tenants.contoso.federated_token_file",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"\nclient_certificate_password_file = \"contoso.secret\""
                ),
                "tenants.contoso.client_certificate_path",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"\nmax_requests_per_second = -1"
                ),
                "tenants.contoso.max_requests_per_second",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"\nauthority_host = \"http://login.example.com\""
                ),
                "tenants.contoso.authority_host",
            ),
            (
                "tenant_id = \"72F988BF-86F1-41AF-91AB-2D7CD011DB47\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"",
                "tenants.contoso.tenant_id",
            ),
        ];
        for (contoso, key) in cases {
            jailed(|jail| {
                two_tenants(jail, contoso)?;
                let e = profiles_err(&Settings::load(None).unwrap());
                assert!(e.contains(key), "{key} not named in: {e}");
                Ok(())
            });
        }
        for name in ["Contoso", "default", "unknown", "a__b", ""] {
            assert!(TenantName::parse(name).is_err(), "{name:?} accepted");
        }
        assert!(TenantName::parse("contoso-eu_2").is_ok());
    }

    fn err_c(s: &Settings) -> String {
        s.credentials()
            .expect_err("credentials should be refused")
            .to_string()
    }
}
