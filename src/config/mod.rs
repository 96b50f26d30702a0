//! Typed settings, one module a section of CONTRACT section 2, layered as `load` describes:
//! embedded `config/default.toml` → the file named by `--config` / `UNASSIGN_CONFIG` →
//! `UNASSIGN__<SECTION>__<KEY>` → the ecosystem's standard variables (`AMQP_URL`, `AZURE_*`).
//!
//! Invariants live in the types (`units`, [`DelayTiers`], [`BrokerUrls`], [`TenantName`]): whole-number durations from the documented `*_secs`
//! and `*_ms` keys, non-zero counts, finite rates, plain HTTP only to loopback, increasing delay
//! tiers — so a wrong value fails deserialization, and figment's message names the key. What
//! spans keys or needs a file read is checked after, with a [`ConfigError`] naming the key;
//! the CLI turns either into exit code 2. Depends on `contract` and `credential`, and on
//! `throttle` for the gate settings a profile resolves to.

mod amqp;
mod credentials;
mod graph;
mod intake;
mod load;
mod replicas;
mod retry;
mod tenants;
mod units;
mod worker;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::Deserialize;

pub use amqp::{AmqpSettings, BrokerUrls, DelayTiers, redact_url};
pub use credentials::Credentials;
pub use graph::GraphSettings;
pub use intake::IntakeSettings;
pub use replicas::ReplicasSettings;
pub use retry::RetrySettings;
pub use tenants::{TenantName, TenantProfile, TenantSettings};
pub use units::{Rate, SecureUrl};
pub use worker::WorkerSettings;

use crate::contract::{Limits, MAX_RETRY_AFTER};

/// A configuration problem; the message names the key and says why.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] pub Problem);

/// What is wrong, without the `configuration:` prefix (what `check` shows).
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A layer could not be read or a value has the wrong type or range; figment's message
    /// names the key and the layer it came from.
    #[error("{0}")]
    Layer(Box<figment::Error>),
    #[error("config file {} does not exist or is not a file", .0.display())]
    NoFile(PathBuf),
    #[error("`{key}` {why}")]
    Key { key: String, why: String },
    /// Two keys that exclude each other.
    #[error("`{first}` and `{second}` are both set: {remedy}")]
    Both {
        first: String,
        second: String,
        remedy: &'static str,
    },
    /// `intake` has no way to authenticate its senders.
    #[error(
        "`intake.bearer_token_file` and `intake.hmac_secret_file` are both unset: set at least \
         one (UNASSIGN__INTAKE__BEARER_TOKEN_FILE or UNASSIGN__INTAKE__HMAC_SECRET_FILE)"
    )]
    NoIntakeCredential,
}

impl ConfigError {
    pub(crate) fn key(key: impl Into<String>, why: impl std::fmt::Display) -> Self {
        Self(Problem::Key {
            key: key.into(),
            why: why.to_string(),
        })
    }

    fn both(first: impl Into<String>, second: impl Into<String>, remedy: &'static str) -> Self {
        Self(Problem::Both {
            first: first.into(),
            second: second.into(),
            remedy,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    /// The tenant profile `default`, for requests without a `tenant_id`.
    pub auth: TenantSettings,
    pub graph: GraphSettings,
    pub retry: RetrySettings,
    pub worker: WorkerSettings,
    pub http: HttpSettings,
    pub intake: IntakeSettings,
    pub log: LogSettings,
    pub replicas: ReplicasSettings,
    /// Further tenant profiles by name (`[tenants.<name>]`), the same settings as `auth`.
    #[serde(default)]
    pub tenants: BTreeMap<TenantName, TenantSettings>,
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

impl Settings {
    /// What spans sections, checked once every section has deserialized.
    fn check_across_sections(&self) -> Result<(), ConfigError> {
        let concurrency = self.worker.concurrency.get();
        if self.amqp.prefetch != 0 && usize::from(self.amqp.prefetch) <= concurrency {
            return Err(ConfigError::key(
                "amqp.prefetch",
                format!("must exceed worker.concurrency ({concurrency})"),
            ));
        }
        Ok(())
    }

    /// What a carried state is clamped to: no more attempts than the budget, no wait longer
    /// than any the worker writes — a Retry-After (capped), a backoff, a paused tenant's tier.
    pub fn state_limits(&self) -> Limits {
        let longest_tier = self.amqp.delay_tiers_secs.last().copied().unwrap_or(0);
        Limits {
            max_attempts: self.retry.max_attempts.get(),
            longest_wait: MAX_RETRY_AFTER.max(self.retry.max_delay).max(
                std::time::Duration::from_secs(longest_tier.saturating_add(1)),
            ),
        }
    }
}

/// What the sections' tests share: a private environment and the text of a refusal.
#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod testing {
    use figment::Jail;

    use super::{ConfigError, Settings};

    /// Runs `f` with a clean, private environment (figment's Jail serialises these tests).
    pub fn jailed(f: impl FnOnce(&mut Jail) -> Result<(), figment::Error>) {
        Jail::expect_with(|jail| {
            jail.clear_env();
            f(jail)
        });
    }

    /// The error text, lower-cased: figment names environment keys as they were spelled.
    pub fn err<T: std::fmt::Debug>(result: Result<T, ConfigError>) -> String {
        result
            .expect_err("config should be refused")
            .to_string()
            .to_lowercase()
    }

    pub fn load() -> Settings {
        Settings::load(None).expect("the configuration loads")
    }
}
