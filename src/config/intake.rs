//! `[intake]`: the HTTP intake (`unassign-worker intake`, CONTRACT section 9) — its ports, how
//! senders authenticate, and the limits of a post.

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    ConfigError, Problem,
    units::{Rate, nonzero_secs, secs},
};

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
    pub max_body_bytes: NonZeroUsize,
    /// Requests in one post; more is answered 413.
    pub max_batch: NonZeroUsize,
    /// How long a confirmed message-id is remembered, so a repeat publishes nothing.
    #[serde(rename = "idempotency_window_secs", deserialize_with = "nonzero_secs")]
    pub idempotency_window: Duration,
    /// How many message-ids are remembered at most (the oldest go first).
    pub idempotency_capacity: NonZeroUsize,
    /// Posts per second each credential may make (a token bucket, bursts up to one second's
    /// worth); 0 = no limit.
    pub rate_limit_per_second: Rate,
    /// A post whose confirms take longer is answered 503 (and nothing is half-accepted).
    #[serde(rename = "publish_timeout_secs", deserialize_with = "nonzero_secs")]
    pub publish_timeout: Duration,
    /// After SIGTERM: how long posts in progress may take to finish their confirms.
    #[serde(rename = "shutdown_grace_secs", deserialize_with = "secs")]
    pub shutdown_grace: Duration,
}

impl IntakeSettings {
    /// What only `intake` needs (the worker runs without it): a credential source, and a
    /// metrics port apart from the public one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bearer_token_file.is_none() && self.hmac_secret_file.is_none() {
            return Err(Problem::NoIntakeCredential.into());
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
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod tests {
    use crate::config::{
        Settings,
        testing::{err, jailed},
    };

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
            jail.set_env("UNASSIGN__INTAKE__METRICS_LISTEN", "0.0.0.0:8080");
            let e = intake().validate().unwrap_err().to_string();
            assert!(e.contains("intake.metrics_listen"), "{e}");
            jail.set_env("UNASSIGN__INTAKE__METRICS_LISTEN", "0.0.0.0:9465");
            // Limits that cannot be met fail the load itself, for every command.
            for (key, bad) in [
                ("max_batch", "0"),
                ("max_body_bytes", "0"),
                ("idempotency_capacity", "0"),
                ("idempotency_window_secs", "0"),
                ("publish_timeout_secs", "0"),
                ("rate_limit_per_second", "-1"),
            ] {
                let var = format!("UNASSIGN__INTAKE__{}", key.to_uppercase());
                jail.set_env(&var, bad);
                let e = err(Settings::load(None));
                assert!(e.contains(&format!("intake.{key}")), "{e}");
                jail.set_env(&var, "10");
            }
            assert_eq!(intake().publish_timeout.as_secs(), 10);
            Ok(())
        });
    }
}
