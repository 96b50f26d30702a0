//! Control messages as they travel: a 32-byte HMAC-SHA256 (the worker's state keys, in a domain
//! of its own) followed by JSON. Anyone with access to the broker can publish to the control
//! exchange, so a message counts only if a state key signed it, was sent within [`MAX_AGE`] by
//! the wall clock (a replayed one is soon void) and fits the bounds below; everything in it is
//! clamped again where it is used.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{contract::StateKeys, metrics::ControlRejected, throttle::Learned};

const DOMAIN: &[u8] = b"unassign-worker replica control v1";
const VERSION: u8 = 1;
const MAC_LEN: usize = 32;
/// Larger bodies are dropped before any work is spent on them.
pub const MAX_BODY: usize = 16 * 1024;
/// At most this many entries in a heartbeat (far more than tenant profiles × 2 budgets).
pub const MAX_ENTRIES: usize = 128;
/// A message sent longer ago than this, or this far ahead, is dropped. Several heartbeats long,
/// and well above the clock skew of NTP-synchronised hosts.
pub const MAX_AGE: Duration = Duration::from_secs(15);
/// Tenant profile names are at most 32 characters (config); a little slack, then dropped.
const MAX_TENANT: usize = 64;

/// One message from a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u8,
    /// The sender's id, random per process: its own messages come back to it too.
    pub from: u64,
    /// Wall-clock milliseconds since the epoch when it was sent.
    pub sent_ms: u64,
    pub msg: Msg,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Msg {
    /// The tenant was told to wait until `until_ms` (wall clock).
    Hold { tenant: String, until_ms: u64 },
    /// A 429 decreased the tenant's shared budget.
    Throttled(LearnedEntry),
    /// "I am alive", with what this replica knows, so a replica that joins (or restarts) starts
    /// from it rather than from nothing.
    Heartbeat {
        #[serde(default)]
        holds: Vec<HoldEntry>,
        #[serde(default)]
        learned: Vec<LearnedEntry>,
    },
    /// Leaving on shutdown: the others take over its share at once.
    Leaving,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldEntry {
    pub tenant: String,
    pub until_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedEntry {
    pub tenant: String,
    pub budget: WireBudget,
    pub rate: f64,
    pub throttled_at: f64,
    /// When the 429 was (wall clock). Replicas built before it was added do not send it: then
    /// it is taken as the moment the message arrived.
    #[serde(default)]
    pub at_ms: Option<u64>,
}

impl LearnedEntry {
    pub fn new(tenant: &str, budget: WireBudget, learned: Learned) -> Self {
        Self {
            tenant: tenant.to_owned(),
            budget,
            rate: learned.rate,
            throttled_at: learned.throttled_at,
            at_ms: Some(unix_ms(learned.at)),
        }
    }

    /// What the sender learned, `received` when the message arrived.
    pub fn learned(&self, received: SystemTime) -> Learned {
        Learned {
            at: self.at_ms.and_then(from_unix_ms).unwrap_or(received),
            rate: self.rate,
            throttled_at: self.throttled_at,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireBudget {
    Writes,
    Reads,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `None` past what the platform's clock can hold.
pub fn from_unix_ms(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// The message's bytes, signed with the first state key.
pub fn encode(keys: &StateKeys, envelope: &Envelope) -> Vec<u8> {
    let json = serde_json::to_vec(envelope).expect("a control message always serialises");
    let mac = keys.mac(DOMAIN, &json);
    [&mac[..], &json].concat()
}

/// The message in `bytes` if it is authentic, current and within bounds. Never panics.
pub fn decode(
    keys: &StateKeys,
    bytes: &[u8],
    now: SystemTime,
) -> Result<Envelope, ControlRejected> {
    if bytes.len() > MAX_BODY {
        return Err(ControlRejected::Malformed);
    }
    let (mac, json) = bytes
        .split_at_checked(MAC_LEN)
        .ok_or(ControlRejected::Signature)?;
    if !keys.verify_mac(DOMAIN, json, mac) {
        return Err(ControlRejected::Signature);
    }
    let envelope: Envelope =
        serde_json::from_slice(json).map_err(|_| ControlRejected::Malformed)?;
    if envelope.v != VERSION || !envelope.msg.within_bounds() {
        return Err(ControlRejected::Malformed);
    }
    let sent = from_unix_ms(envelope.sent_ms).ok_or(ControlRejected::Stale)?;
    let age = now.duration_since(sent).unwrap_or_else(|e| e.duration());
    if age > MAX_AGE {
        return Err(ControlRejected::Stale);
    }
    Ok(envelope)
}

impl Msg {
    fn within_bounds(&self) -> bool {
        let tenant = |t: &str| t.len() <= MAX_TENANT;
        match self {
            Msg::Hold { tenant: t, .. } => tenant(t),
            Msg::Throttled(l) => tenant(&l.tenant),
            Msg::Heartbeat { holds, learned } => {
                holds.len() <= MAX_ENTRIES
                    && learned.len() <= MAX_ENTRIES
                    && holds.iter().all(|h| tenant(&h.tenant))
                    && learned.iter().all(|l| tenant(&l.tenant))
            }
            Msg::Leaving => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn keys() -> StateKeys {
        StateKeys::new(&["a replica control test key, 32+ chars"]).unwrap()
    }

    fn envelope(msg: Msg, sent: SystemTime) -> Envelope {
        Envelope {
            v: VERSION,
            from: 7,
            sent_ms: unix_ms(sent),
            msg,
        }
    }

    fn hold() -> Msg {
        Msg::Hold {
            tenant: "default".into(),
            until_ms: 1,
        }
    }

    #[test]
    fn round_trips_every_message() {
        let now = SystemTime::now();
        let learned = LearnedEntry {
            tenant: "contoso".into(),
            budget: WireBudget::Reads,
            rate: 40.5,
            throttled_at: 45.0,
            at_ms: None,
        };
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let throttled = LearnedEntry::new(
            "default",
            WireBudget::Writes,
            Learned {
                at,
                rate: 45.0,
                throttled_at: 50.0,
            },
        );
        assert_eq!(throttled.learned(now).at, at);
        assert_eq!(
            learned.learned(now).at,
            now,
            "no time sent: when it arrived"
        );
        for msg in [
            hold(),
            Msg::Throttled(throttled),
            Msg::Heartbeat {
                holds: vec![HoldEntry {
                    tenant: "default".into(),
                    until_ms: 5,
                }],
                learned: vec![learned],
            },
            Msg::Leaving,
        ] {
            let sent = envelope(msg, now);
            assert_eq!(decode(&keys(), &encode(&keys(), &sent), now), Ok(sent));
        }
    }

    #[test]
    fn refuses_forgeries_replays_and_oversize() {
        let now = SystemTime::now();
        let bytes = encode(&keys(), &envelope(hold(), now));
        let other = StateKeys::new(&["another deployment's key, 32+ chars"]).unwrap();
        assert_eq!(decode(&other, &bytes, now), Err(ControlRejected::Signature));
        let mut tampered = bytes.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            decode(&keys(), &tampered, now),
            Err(ControlRejected::Signature)
        );
        let later = now + MAX_AGE + Duration::from_secs(1);
        assert_eq!(decode(&keys(), &bytes, later), Err(ControlRejected::Stale));
        let earlier = now - MAX_AGE - Duration::from_secs(1);
        assert_eq!(
            decode(&keys(), &bytes, earlier),
            Err(ControlRejected::Stale)
        );
        let crowded = Msg::Heartbeat {
            holds: vec![
                HoldEntry {
                    tenant: "t".into(),
                    until_ms: 0
                };
                MAX_ENTRIES + 1
            ],
            learned: vec![],
        };
        let bytes = encode(&keys(), &envelope(crowded, now));
        assert_eq!(
            decode(&keys(), &bytes, now),
            Err(ControlRejected::Malformed)
        );
        let long = Msg::Hold {
            tenant: "x".repeat(MAX_TENANT + 1),
            until_ms: 0,
        };
        let bytes = encode(&keys(), &envelope(long, now));
        assert_eq!(
            decode(&keys(), &bytes, now),
            Err(ControlRejected::Malformed)
        );
    }

    #[test]
    fn a_signed_but_unknown_message_is_malformed() {
        let now = SystemTime::now();
        let json = format!(
            r#"{{"v":1,"from":1,"sent_ms":{},"msg":{{"reboot":{{}}}}}}"#,
            unix_ms(now)
        );
        let bytes = [&keys().mac(DOMAIN, json.as_bytes())[..], json.as_bytes()].concat();
        assert_eq!(
            decode(&keys(), &bytes, now),
            Err(ControlRejected::Malformed)
        );
    }

    proptest! {
        /// Whatever arrives, the decoder answers without panicking, and only a signed message
        /// gets past the MAC.
        #[test]
        fn never_panics_and_never_trusts_unsigned_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let result = decode(&keys(), &bytes, SystemTime::now());
            prop_assert_eq!(result, Err(ControlRejected::Signature));
        }

        /// Signed JSON of any shape and any numbers: decoded or refused, never a panic.
        #[test]
        fn signed_garbage_is_refused_or_bounded(
            json in "\\{\"v\":1,\"from\":[0-9]{1,25},\"sent_ms\":[0-9]{1,25},\"msg\":\\{\"(hold|throttled|heartbeat|leaving)\":.{0,80}\\}\\}",
            until in any::<u64>(),
            rate in any::<f64>(),
        ) {
            let bytes = [&keys().mac(DOMAIN, json.as_bytes())[..], json.as_bytes()].concat();
            let _ = decode(&keys(), &bytes, SystemTime::now());
            let msg = Msg::Throttled(LearnedEntry { tenant: "t".into(), budget: WireBudget::Writes, rate, throttled_at: rate, at_ms: Some(u64::MAX) });
            let sent = envelope(msg, SystemTime::now());
            let _ = decode(&keys(), &encode(&keys(), &sent), SystemTime::now());
            let sent = Envelope { sent_ms: until, ..envelope(hold(), SystemTime::now()) };
            let _ = decode(&keys(), &encode(&keys(), &sent), SystemTime::now());
        }
    }
}
