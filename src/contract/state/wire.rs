//! The state as it travels in `x-unassign-state`, and how a verified one is clamped to what this
//! worker could have written.

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{Carried, DeviceId, Limits, MAX_USER_DEVICES, Progress, RetryState, VERSION};
use crate::contract::rfc3339;

/// The state as it travels: JSON, so an operator can read it in the management UI.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Wire {
    pub(super) v: u8,
    #[serde(default)]
    attempts: u32,
    /// Absent on a dead letter: a replay starts its budgets afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    first_received_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_at: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    devices_done: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_calls: Option<u32>,
}

impl Default for Wire {
    fn default() -> Self {
        Self {
            v: VERSION,
            attempts: 0,
            first_received_at: None,
            retry_at: None,
            devices_done: Vec::new(),
            device_calls: None,
        }
    }
}

impl From<&Carried> for Wire {
    fn from(c: &Carried) -> Self {
        Self {
            v: VERSION,
            attempts: c.retry.attempts,
            first_received_at: Some(rfc3339(c.retry.first_received_at)),
            retry_at: c.retry.retry_at.map(rfc3339),
            devices_done: c.progress.done.iter().map(ToString::to_string).collect(),
            device_calls: c.progress.device_calls,
        }
    }
}

impl Wire {
    /// A dead letter's: the devices done, and nothing of the retry state.
    pub(super) fn dead_letter(done: &[DeviceId]) -> Self {
        Self {
            devices_done: done.iter().map(ToString::to_string).collect(),
            ..Self::default()
        }
    }

    /// Every value within what this worker could have written at `now`.
    pub(super) fn clamped(self, now: OffsetDateTime, limits: Limits) -> Carried {
        let time = |s: Option<&str>| s.and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok());
        let attempts = self.attempts.min(limits.max_attempts);
        let latest_retry = now.checked_add(
            limits
                .longest_wait
                .try_into()
                .unwrap_or(time::Duration::ZERO),
        );
        let retry_at = time(self.retry_at.as_deref())
            .filter(|at| *at > now)
            .map(|at| latest_retry.map_or(now, |latest| at.min(latest)));
        Carried {
            retry: RetryState {
                attempts,
                first_received_at: time(self.first_received_at.as_deref())
                    .map_or(now, |t| t.min(now)),
                retry_at,
            },
            progress: Progress {
                done: self
                    .devices_done
                    .iter()
                    .filter_map(|id| DeviceId::parse(id))
                    .take(MAX_USER_DEVICES)
                    .collect(),
                device_calls: self.device_calls.map(|n| n.min(attempts)),
            },
        }
    }
}
