//! `[replicas]`: the control plane through which replicas share each tenant's Graph budget.

use serde::{Deserialize, Deserializer, de::Error};

/// Heartbeats further apart than this would leave a crashed replica's share unused too long;
/// closer than the floor would be chatter.
const HEARTBEAT_MS: std::ops::RangeInclusive<u64> = 100..=10_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasSettings {
    /// Replicas tell each other holds, budget decreases and that they are alive; off, each
    /// learns the tenant's budget from its own 429s alone.
    pub enabled: bool,
    /// How often each replica says it is alive; one not heard for three is gone.
    #[serde(deserialize_with = "heartbeat_ms")]
    pub heartbeat_ms: u64,
}

/// Checked as it is read, so the error names the key like every other configuration error.
fn heartbeat_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let ms = u64::deserialize(d)?;
    if HEARTBEAT_MS.contains(&ms) {
        Ok(ms)
    } else {
        Err(D::Error::custom(format!(
            "must be {} to {} (milliseconds)",
            HEARTBEAT_MS.start(),
            HEARTBEAT_MS.end()
        )))
    }
}
