//! `[retry]`: how often and how long a job is retried, and which waits are parked in the delay
//! queues rather than held in the process (CONTRACT section 2).

use std::{num::NonZeroU32, time::Duration};

use serde::Deserialize;

use super::units::{millis, secs};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Graph calls per job (per device of a serial or user request), the first included.
    pub max_attempts: NonZeroU32,
    #[serde(rename = "base_delay_ms", deserialize_with = "millis")]
    pub base_delay: Duration,
    #[serde(rename = "max_delay_secs", deserialize_with = "secs")]
    pub max_delay: Duration,
    #[serde(rename = "max_elapsed_secs", deserialize_with = "secs")]
    pub max_elapsed: Duration,
    /// Retry waits longer than this go through the delay queues.
    #[serde(rename = "park_after_secs", deserialize_with = "secs")]
    pub park_after: Duration,
}
