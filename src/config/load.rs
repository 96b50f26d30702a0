//! The layers of CONTRACT section 2, lowest first: the embedded `config/default.toml`, the file
//! named by `--config` / `UNASSIGN_CONFIG`, `UNASSIGN__<SECTION>__<KEY>`, then the ecosystem's
//! standard variables (`AMQP_URL`, `AZURE_*`).

use std::path::PathBuf;

use figment::{
    Figment, Metadata, Profile, Provider, Source,
    providers::{Env, Format, Serialized, Toml},
    value::{Dict, Map},
};

use super::{ConfigError, Problem, Settings, tenants::inline_secrets};

const DEFAULTS: &str = include_str!("../../config/default.toml");

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

/// The standard variable that sets `key`, if one does.
pub(super) fn standard_var(key: &str) -> Option<&'static str> {
    STANDARD_VARS
        .iter()
        .find(|(_, k)| *k == key)
        .map(|(var, _)| *var)
}

/// A standard variable's value under the key it sets. A provider of its own so that an error
/// about the value names the variable the operator set, not the key alone.
struct StandardVar {
    name: &'static str,
    key: &'static str,
    value: String,
}

impl Provider for StandardVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("the variable {}", self.name))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::default(self.key, &self.value).data()
    }
}

impl Settings {
    /// Loads the layers from the process environment. `file` is `--config`, else `UNASSIGN_CONFIG`.
    pub fn load(file: Option<PathBuf>) -> Result<Self, ConfigError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file.or_else(|| var("UNASSIGN_CONFIG").map(PathBuf::from)) {
            if !path.is_file() {
                return Err(Problem::NoFile(path).into());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("UNASSIGN__").split("__"));
        for (name, key) in STANDARD_VARS {
            if let Some(value) = var(name) {
                figment = figment.merge(StandardVar { name, key, value });
            }
        }
        let settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError(Problem::Layer(Box::new(e))))?;
        settings.check_across_sections()?;
        settings.refuse_secrets_in_files(&figment)?;
        Ok(settings)
    }

    /// Inline secrets must come from the environment; in a file they would sit next to settings
    /// that are shared, reviewed and committed.
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
        for (name, field) in inline_secrets(&self.tenants) {
            let key = format!("tenants.{name}.{field}");
            if from_file(&key) {
                return Err(ConfigError::key(
                    &key,
                    format!(
                        "is a secret in a config file: use {field}_file, or the variable \
                         UNASSIGN__TENANTS__{}__{}",
                        name.as_str().to_uppercase(),
                        field.to_uppercase()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod tests {
    use std::time::Duration;

    use secrecy::ExposeSecret;

    use super::*;
    use crate::config::{
        LogFormat,
        testing::{err, jailed},
    };

    #[test]
    fn defaults_match_the_contract() {
        jailed(|_| {
            let s = Settings::load(None).unwrap();
            assert_eq!(s.worker.concurrency.get(), 16);
            assert_eq!(s.amqp.effective_prefetch(16), 32);
            assert_eq!(s.retry.max_attempts.get(), 20);
            assert_eq!(s.retry.base_delay, Duration::from_millis(1000));
            assert_eq!(s.retry.max_delay, Duration::from_secs(300));
            assert_eq!(s.retry.max_elapsed, Duration::from_secs(86_400));
            assert_eq!(s.retry.park_after, Duration::from_secs(5));
            assert_eq!(s.worker.shutdown_grace, Duration::from_secs(30));
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
            assert_eq!(s.worker.concurrency.get(), 32, "UNASSIGN__ beats the file");
            assert_eq!(
                s.worker.shutdown_grace.as_secs(),
                7,
                "the file beats defaults"
            );
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
            assert_eq!(Settings::load(None).unwrap().worker.concurrency.get(), 3);
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
            jail.set_env("UNASSIGN__AMQP__PREFETCH", "16");
            assert!(err(Settings::load(None)).contains("amqp.prefetch"));
            Ok(())
        });
        jailed(|_| {
            assert!(err(Settings::load(Some("missing.toml".into()))).contains("missing.toml"));
            Ok(())
        });
    }
}
