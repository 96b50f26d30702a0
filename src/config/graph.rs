//! `[graph]`: where Microsoft Graph is, how long a call may take, and each tenant's default call
//! budget (CONTRACT section 2).

use std::time::Duration;

use serde::Deserialize;

use super::units::{Rate, SecureUrl, nonzero_secs};
use crate::throttle::{Budget, GateConfig};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSettings {
    pub base_url: SecureUrl,
    #[serde(rename = "timeout_secs", deserialize_with = "nonzero_secs")]
    pub timeout: Duration,
    pub max_requests_per_second: Rate,
    /// The same for reads (device lookups), a budget of their own.
    pub max_reads_per_second: Rate,
    pub adaptive_throttling: bool,
}

impl GraphSettings {
    pub(super) fn gate_config(&self, budget: Budget) -> GateConfig {
        GateConfig {
            max_per_second: match budget {
                Budget::Writes => self.max_requests_per_second,
                Budget::Reads => self.max_reads_per_second,
            }
            .get(),
            adaptive: self.adaptive_throttling,
            budget,
        }
    }

    /// Graph's token scope is its origin + `/.default`, so national clouds and the simulator
    /// work.
    pub(super) fn default_scope(&self) -> String {
        format!("{}/.default", self.base_url.origin().ascii_serialization())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod tests {
    use crate::config::{
        Settings,
        testing::{err, jailed, load},
    };

    #[test]
    fn plain_http_only_on_loopback() {
        jailed(|jail| {
            jail.set_env("UNASSIGN__GRAPH__BASE_URL", "http://graph.example.com/beta");
            assert!(err(Settings::load(None)).contains("graph.base_url"));
            jail.set_env("UNASSIGN__GRAPH__BASE_URL", "http://127.0.0.1:8080/beta");
            jail.set_env("AZURE_AUTHORITY_HOST", "http://login.example.com");
            let e = err(Settings::load(None));
            assert!(e.contains("auth.authority_host"), "{e}");
            assert!(
                e.contains("azure_authority_host"),
                "names the variable: {e}"
            );
            jail.set_env("AZURE_AUTHORITY_HOST", "http://localhost:8080");
            load();
            Ok(())
        });
    }

    #[test]
    fn a_timeout_is_at_least_a_second_and_rates_are_finite() {
        jailed(|jail| {
            jail.set_env("UNASSIGN__GRAPH__TIMEOUT_SECS", "0");
            assert!(err(Settings::load(None)).contains("graph.timeout_secs"));
            jail.set_env("UNASSIGN__GRAPH__TIMEOUT_SECS", "2");
            jail.set_env("UNASSIGN__GRAPH__MAX_READS_PER_SECOND", "-1");
            let e = err(Settings::load(None));
            assert!(
                e.contains("graph.max_reads_per_second") && e.contains("finite"),
                "{e}"
            );
            jail.set_env("UNASSIGN__GRAPH__MAX_READS_PER_SECOND", "0");
            assert_eq!(load().graph.timeout.as_secs(), 2);
            Ok(())
        });
    }
}
