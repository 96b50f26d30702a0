//! Typed settings, layered as CONTRACT section 2: embedded `config/default.toml` → the file named by
//! `--config` / `UNASSIGN_CONFIG` → `UNASSIGN__<SECTION>__<KEY>` → the ecosystem's standard
//! variables (`AMQP_URL`, `AZURE_*`). Every problem is a [`ConfigError`] naming the key, which the
//! CLI turns into exit code 2.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

const DEFAULTS: &str = include_str!("../config/default.toml");

/// A configuration problem; the message names the key and says why.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    fn key(key: &str, why: impl std::fmt::Display) -> Self {
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
    pub log: LogSettings,
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
    pub scope: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSettings {
    pub base_url: Url,
    pub timeout_secs: u64,
    pub max_requests_per_second: f64,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
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
    ("AZURE_AUTHORITY_HOST", "auth.authority_host"),
];

/// Credential variables a later release supports; refusing them beats silently ignoring them.
const UNSUPPORTED_VARS: &[&str] = &[
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_CERTIFICATE_PATH",
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
        if let Some(name) = UNSUPPORTED_VARS.iter().find(|n| var(n).is_some()) {
            return Err(ConfigError::key(
                name,
                "is not supported yet: use AZURE_CLIENT_SECRET or AZURE_CLIENT_SECRET_FILE",
            ));
        }
        Ok(settings)
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
        if !(self.graph.max_requests_per_second >= 0.0
            && self.graph.max_requests_per_second.is_finite())
        {
            return Err(ConfigError::key(
                "graph.max_requests_per_second",
                "must be a finite number ≥ 0",
            ));
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

    /// What `run` and `check` need beyond the broker: the app registration and its secret.
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
        let secret = match (&auth.client_secret, &auth.client_secret_file) {
            (Some(secret), _) => ClientSecret::Value(secret.clone()),
            (None, Some(path)) => ClientSecret::File(path.clone()),
            (None, None) => {
                return Err(ConfigError::key(
                    "auth.client_secret (AZURE_CLIENT_SECRET)",
                    "is required (or AZURE_CLIENT_SECRET_FILE)",
                ));
            }
        };
        // Checked now so a typo exits 2 at start; a file is read again for every token.
        match secret.current() {
            Ok(value) if value.expose_secret().is_empty() => {
                return Err(ConfigError::key(secret.key(), "is empty"));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(ConfigError::key(
                    secret.key(),
                    format!("cannot be read: {e}"),
                ));
            }
        }
        Ok(Credentials {
            authority_host: auth.authority_host.clone(),
            tenant_id: auth.tenant_id.clone(),
            client_id: auth.client_id.clone(),
            client_secret: secret,
            scope: auth
                .scope
                .clone()
                .unwrap_or_else(|| default_scope(&self.graph.base_url)),
        })
    }
}

/// Everything needed to ask the identity platform for a Graph token.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub authority_host: Url,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: ClientSecret,
    pub scope: String,
}

/// The client secret, or the file that holds it. A file (a mounted Kubernetes Secret) is read
/// for every token request, so a rotated secret is picked up without a restart.
#[derive(Debug, Clone)]
pub enum ClientSecret {
    Value(SecretString),
    File(PathBuf),
}

impl ClientSecret {
    pub fn current(&self) -> std::io::Result<SecretString> {
        match self {
            Self::Value(secret) => Ok(secret.clone()),
            Self::File(path) => {
                std::fs::read_to_string(path).map(|s| SecretString::from(s.trim_end().to_owned()))
            }
        }
    }

    fn key(&self) -> &'static str {
        match self {
            Self::Value(_) => "auth.client_secret (AZURE_CLIENT_SECRET)",
            Self::File(_) => "auth.client_secret_file (AZURE_CLIENT_SECRET_FILE)",
        }
    }
}

impl AmqpSettings {
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
    use figment::Jail;

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
        jailed(|jail| {
            jail.set_env("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token");
            assert!(err(Settings::load(None)).contains("azure_federated_token_file"));
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
                creds.client_secret.current().unwrap().expose_secret(),
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

    fn err_c(s: &Settings) -> String {
        s.credentials()
            .expect_err("credentials should be refused")
            .to_string()
    }
}
