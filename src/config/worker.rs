//! `[worker]`: how many Graph calls at once, how long a shutdown may take, the instance name,
//! and the keys that sign the state a job carries (CONTRACT section 2).

use std::{num::NonZeroUsize, path::PathBuf, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, Settings, units::secs};
use crate::contract::StateKeys;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: NonZeroUsize,
    #[serde(rename = "shutdown_grace_secs", deserialize_with = "secs")]
    pub shutdown_grace: Duration,
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
                return Err(ConfigError::both(
                    "worker.state_key_file",
                    "worker.state_keys",
                    "keep one",
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
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod tests {
    use lapin::types::FieldTable;

    use crate::{
        config::{
            Settings,
            testing::{err, jailed},
        },
        contract::Carried,
    };

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
        let key_err = || {
            Settings::load(None)
                .unwrap()
                .state_keys()
                .unwrap_err()
                .to_string()
        };
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
}
