//! The worker's own state about a request — calls made, when it was first received, a wait
//! still owed, devices done — carried in headers from one delivery to the next, so budgets and
//! Retry-After holds survive hand-backs, restarts and other replicas (CONTRACT sections 2 and 6).
//!
//! Anyone who can publish a request can also write headers, so the state is authenticated:
//! `x-unassign-state` holds it as JSON and `x-unassign-state-mac` an HMAC-SHA256 over it, the
//! request body and the `message-id`, under a key every replica shares ([`StateKeys`]). State
//! that is absent, forged, bound to another body, or signed with a key no longer configured is
//! ignored and the request starts afresh: that loses nothing (the Graph action is idempotent)
//! and can never skip a call, spend a budget that was not spent, or park a job for ever. Even a
//! state that verifies is clamped to what this worker could have written ([`Limits`]).

use std::time::Duration;

use aws_lc_rs::{digest, hmac};
use lapin::types::{AMQPValue, FieldTable, LongString};
use time::OffsetDateTime;

use super::{DeviceId, header_str, headers};

mod wire;

use wire::Wire;

/// Most devices one user request unassigns; beyond it the request fails before any call, as a
/// leaver with that many Autopilot devices is more likely a service account or a data error.
pub const MAX_USER_DEVICES: usize = 100;
/// A state header longer than this is not even checked: the worker never writes one near it
/// (a hundred device ids are under 4 KiB).
const MAX_STATE_BYTES: usize = 8 * 1024;
/// Domain separation: a MAC made for anything else never verifies as a state.
const MAC_CONTEXT: &[u8] = b"unassign-worker/state/v1\0";
const VERSION: u8 = 1;

/// The longest Retry-After honoured: a header is a producer's data, and one saying "come back in
/// ten years" (or 2^64 seconds) must neither park a job and hold its tenant for ever nor overflow
/// the arithmetic on it. Graph's throttling windows are seconds to minutes; an hour is well past
/// any of them, and a job that cannot wait that long within `retry.max_elapsed_secs` fails as
/// `retries_exhausted`. It bounds the waits a carried state may claim ([`Limits`]), hence here.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a request carries from one delivery to the next so budgets survive requeues and
/// restarts: calls made, when it was first received, and a wait still owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryState {
    pub attempts: u32,
    pub first_received_at: OffsetDateTime,
    pub retry_at: Option<OffsetDateTime>,
}

impl RetryState {
    /// A first delivery: no calls, received `now`.
    pub fn fresh(now: OffsetDateTime) -> Self {
        Self {
            attempts: 0,
            first_received_at: now,
            retry_at: None,
        }
    }
}

/// How far a serial or user request has got: the devices already unassigned and the calls
/// spent on the one in progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: Vec<DeviceId>,
    /// `None` when absent: every call of the request was spent on the device in progress.
    pub device_calls: Option<u32>,
}

impl Progress {
    /// Whether `id` was unassigned already (Graph ids compare case-insensitively).
    pub fn is_done(&self, id: &DeviceId) -> bool {
        self.done
            .iter()
            .any(|d| d.as_str().eq_ignore_ascii_case(id.as_str()))
    }

    /// The devices done as the informative `x-unassign-devices-done` list, if any.
    pub fn done_list(&self) -> Option<String> {
        let ids: Vec<&str> = self.done.iter().map(DeviceId::as_str).collect();
        (!ids.is_empty()).then(|| ids.join(","))
    }
}

/// The state one delivery carried, once verified and clamped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub retry: RetryState,
    pub progress: Progress,
}

impl Carried {
    pub fn fresh(now: OffsetDateTime) -> Self {
        Self {
            retry: RetryState::fresh(now),
            progress: Progress::default(),
        }
    }
}

/// Why the state headers of a delivery were ignored (`unassign_state_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// State headers without a MAC, or the pre-MAC plain headers (a forgery, or a message
    /// parked by a version before the state was signed).
    Unsigned,
    /// A MAC that no configured key verifies: forged, another body, or a retired key.
    BadMac,
    /// Verified, but not a state this worker understands (a newer version, say).
    Malformed,
}

impl Rejected {
    pub const ALL: [Rejected; 3] = [Self::Unsigned, Self::BadMac, Self::Malformed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::BadMac => "bad_mac",
            Self::Malformed => "malformed",
        }
    }
}

/// The bounds of what this worker could have written, applied to every state it reads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_attempts: u32,
    /// The longest wait the worker ever writes (its longest delay tier or Retry-After ceiling):
    /// a `retry_at` further ahead is cut to it.
    pub longest_wait: Duration,
}

/// The keys that sign and verify the state: the first signs, every one verifies, so a key is
/// rotated by adding the new one second, then moving it first, then retiring the old one.
pub struct StateKeys {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for StateKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateKeys({} key(s), [REDACTED])", self.keys.len())
    }
}

impl StateKeys {
    /// `secrets` in order, the signing one first; `None` if there is none.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Option<Self> {
        let keys: Vec<hmac::Key> = secrets
            .iter()
            .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_ref()))
            .collect();
        (!keys.is_empty()).then_some(Self { keys })
    }

    /// The key every replica finds without configuration: derived from `material` (the
    /// worker's broker credentials and vhost), which producers with broker users of their own
    /// do not know. Derivation is one-way: the key reveals nothing of the password.
    pub fn derived(material: &[u8]) -> Self {
        let label = hmac::Key::new(hmac::HMAC_SHA256, b"unassign-worker default state key v1");
        let key = hmac::sign(&label, material);
        Self {
            keys: vec![hmac::Key::new(hmac::HMAC_SHA256, key.as_ref())],
        }
    }

    /// A MAC over `data` for another use than a job's state (the replicas' control messages):
    /// `domain` names the use, so a MAC made for one never verifies for another.
    pub fn mac(&self, domain: &[u8], data: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.keys[0], &domain_bytes(domain, data));
        let mut mac = [0; 32];
        mac.copy_from_slice(tag.as_ref());
        mac
    }

    /// Whether any of the keys made `mac` over `data` in `domain`.
    pub fn verify_mac(&self, domain: &[u8], data: &[u8], mac: &[u8]) -> bool {
        let signed = domain_bytes(domain, data);
        self.keys
            .iter()
            .any(|k| hmac::verify(k, &signed, mac).is_ok())
    }

    /// The state headers for `state`, bound to `body` and `message_id`.
    pub fn sign(&self, state: &Carried, body: &[u8], message_id: Option<&str>) -> FieldTable {
        self.sign_wire(&Wire::from(state), body, message_id)
    }

    /// A dead letter's state: the devices done, so a replay does not redo them, and nothing of
    /// the retry state — a replay starts with fresh budgets.
    pub fn sign_dead_letter(
        &self,
        done: &[DeviceId],
        body: &[u8],
        message_id: Option<&str>,
    ) -> FieldTable {
        self.sign_wire(&Wire::dead_letter(done), body, message_id)
    }

    fn sign_wire(&self, wire: &Wire, body: &[u8], message_id: Option<&str>) -> FieldTable {
        let json = serde_json::to_vec(wire).expect("the state always serialises");
        let mac = hmac::sign(&self.keys[0], &signed_bytes(&json, body, message_id));
        let mut table = FieldTable::default();
        table.insert(
            headers::STATE.into(),
            AMQPValue::LongString(LongString::from(json)),
        );
        table.insert(
            headers::STATE_MAC.into(),
            AMQPValue::LongString(LongString::from(hex(mac.as_ref()))),
        );
        table
    }

    /// The state `table` carries for this body, clamped to `limits`; a fresh one (and why) if
    /// it carries none that verifies. Never panics, whatever the headers hold.
    pub fn read(
        &self,
        table: &FieldTable,
        body: &[u8],
        message_id: Option<&str>,
        now: OffsetDateTime,
        limits: Limits,
    ) -> (Carried, Option<Rejected>) {
        match self.verify(table, body, message_id) {
            Ok(Some(wire)) => (wire.clamped(now, limits), None),
            Ok(None) => (Carried::fresh(now), None),
            Err(why) => (Carried::fresh(now), Some(why)),
        }
    }

    /// The verified wire state; `Ok(None)` when the delivery carries no state at all.
    fn verify(
        &self,
        table: &FieldTable,
        body: &[u8],
        message_id: Option<&str>,
    ) -> Result<Option<Wire>, Rejected> {
        let state = bytes_header(table, headers::STATE);
        let mac = header_str(table, headers::STATE_MAC);
        let (state, mac) = match (state, mac) {
            (Some(state), Some(mac)) => (state, mac),
            (None, None) if !has_plain_state(table) => return Ok(None),
            _ => return Err(Rejected::Unsigned),
        };
        let mac = match unhex(&mac) {
            Some(mac) if state.len() <= MAX_STATE_BYTES => mac,
            _ => return Err(Rejected::BadMac),
        };
        let signed = signed_bytes(state, body, message_id);
        if !self
            .keys
            .iter()
            .any(|k| hmac::verify(k, &signed, &mac).is_ok())
        {
            return Err(Rejected::BadMac);
        }
        match serde_json::from_slice::<Wire>(state) {
            Ok(wire) if wire.v == VERSION => Ok(Some(wire)),
            _ => Err(Rejected::Malformed),
        }
    }
}

/// Whether the table holds one of the plain state headers a version before signing trusted:
/// their presence without a MAC is a forgery (or a pre-upgrade message) worth counting.
fn has_plain_state(table: &FieldTable) -> bool {
    [
        headers::RETRY_AT,
        headers::FIRST_RECEIVED_AT,
        headers::DEVICE_CALLS,
    ]
    .iter()
    .any(|name| table.inner().contains_key(*name))
}

/// What the MAC covers, each part length-prefixed so no two inputs run together.
fn signed_bytes(state: &[u8], body: &[u8], message_id: Option<&str>) -> Vec<u8> {
    let body_digest = digest::digest(&digest::SHA256, body);
    let message_id = message_id.unwrap_or_default().as_bytes();
    let mut bytes = Vec::with_capacity(MAC_CONTEXT.len() + 48 + message_id.len() + state.len());
    bytes.extend_from_slice(MAC_CONTEXT);
    bytes.extend_from_slice(body_digest.as_ref());
    for part in [message_id, state] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(part);
    }
    bytes
}

/// `domain`, length-prefixed, then `data`: no domain's input reads as another's.
fn domain_bytes(domain: &[u8], data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(domain.len()).unwrap_or(u32::MAX);
    [&len.to_be_bytes(), domain, data].concat()
}

fn bytes_header<'a>(table: &'a FieldTable, name: &str) -> Option<&'a [u8]> {
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const A: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
    const B: &str = "8b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
    const BODY: &[u8] = br#"{"request_id":"r-1","user_principal_name":"ann@contoso.com"}"#;
    const LIMITS: Limits = Limits {
        max_attempts: 20,
        longest_wait: Duration::from_secs(3600),
    };

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_795_860_000).unwrap()
    }

    fn keys(secrets: &[&str]) -> StateKeys {
        StateKeys::new(secrets).unwrap()
    }

    fn state() -> Carried {
        Carried {
            retry: RetryState {
                attempts: 3,
                first_received_at: now() - time::Duration::MINUTE,
                retry_at: Some(now() + time::Duration::SECOND * 30),
            },
            progress: Progress {
                done: vec![DeviceId::parse(A).unwrap()],
                device_calls: Some(2),
            },
        }
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn a_signed_state_round_trips_and_no_state_is_a_fresh_request() {
        let k = keys(&["k1"]);
        let table = k.sign(&state(), BODY, Some("m-1"));
        assert_eq!(
            k.read(&table, BODY, Some("m-1"), now(), LIMITS),
            (state(), None)
        );
        assert_eq!(
            k.read(&FieldTable::default(), BODY, None, now(), LIMITS),
            (Carried::fresh(now()), None),
            "a first delivery is not a rejection"
        );
    }

    #[test]
    fn forged_plain_headers_are_ignored_and_counted() {
        let mut forged = FieldTable::default();
        forged.insert(headers::RETRY_AT.into(), text("9999-12-31T23:59:59-23:59"));
        forged.insert(
            headers::ATTEMPTS.into(),
            AMQPValue::LongLongInt(u32::MAX.into()),
        );
        forged.insert(headers::DEVICES_DONE.into(), text(&format!("{A},{B}")));
        let read = keys(&["k1"]).read(&forged, BODY, None, now(), LIMITS);
        assert_eq!(read, (Carried::fresh(now()), Some(Rejected::Unsigned)));
        // A state header without its MAC, or a MAC alone.
        let signed = keys(&["k1"]).sign(&state(), BODY, None);
        for drop in [headers::STATE_MAC, headers::STATE] {
            let mut map = signed.inner().clone();
            map.remove(drop);
            let half = FieldTable::from(map);
            let read = keys(&["k1"]).read(&half, BODY, None, now(), LIMITS);
            assert_eq!(
                read,
                (Carried::fresh(now()), Some(Rejected::Unsigned)),
                "{drop}"
            );
        }
    }

    #[test]
    fn a_mac_binds_the_state_to_its_key_body_and_message_id() {
        let signed = keys(&["k1"]).sign(&state(), BODY, Some("m-1"));
        let bad = |k: &StateKeys, table: &FieldTable, body: &[u8], id: Option<&str>| {
            k.read(table, body, id, now(), LIMITS)
        };
        let fresh = (Carried::fresh(now()), Some(Rejected::BadMac));
        assert_eq!(
            bad(&keys(&["k2"]), &signed, BODY, Some("m-1")),
            fresh,
            "another key"
        );
        assert_eq!(
            bad(&keys(&["k1"]), &signed, b"{}", Some("m-1")),
            fresh,
            "another body"
        );
        assert_eq!(
            bad(&keys(&["k1"]), &signed, BODY, Some("m-2")),
            fresh,
            "another id"
        );
        assert_eq!(bad(&keys(&["k1"]), &signed, BODY, None), fresh, "no id");
        let mut tampered = signed.clone();
        tampered.insert(headers::STATE.into(), text(r#"{"v":1,"attempts":0}"#));
        assert_eq!(
            bad(&keys(&["k1"]), &tampered, BODY, Some("m-1")),
            fresh,
            "edited state"
        );
        let mut garbage = signed.clone();
        garbage.insert(headers::STATE_MAC.into(), text("zz"));
        assert_eq!(
            bad(&keys(&["k1"]), &garbage, BODY, Some("m-1")),
            fresh,
            "not hex"
        );
    }

    #[test]
    fn keys_rotate_without_losing_parked_state() {
        let old = keys(&["old"]).sign(&state(), BODY, None);
        // Step 1: the new key verifies everywhere before it signs anywhere.
        let both = keys(&["new", "old"]);
        assert_eq!(both.read(&old, BODY, None, now(), LIMITS), (state(), None));
        let new = both.sign(&state(), BODY, None);
        assert_eq!(
            keys(&["new"]).read(&new, BODY, None, now(), LIMITS),
            (state(), None)
        );
        // Retired too early: the old state is ignored, never trusted, and the job starts afresh.
        let read = keys(&["new"]).read(&old, BODY, None, now(), LIMITS);
        assert_eq!(read, (Carried::fresh(now()), Some(Rejected::BadMac)));
    }

    #[test]
    fn even_a_verified_state_is_clamped_to_what_the_worker_could_write() {
        let k = keys(&["k1"]);
        let wild = Carried {
            retry: RetryState {
                attempts: u32::MAX,
                first_received_at: now() + time::Duration::DAY,
                retry_at: Some(OffsetDateTime::new_utc(
                    time::Date::MAX,
                    time::Time::MIDNIGHT,
                )),
            },
            progress: Progress {
                done: vec![DeviceId::parse(A).unwrap(); MAX_USER_DEVICES + 5],
                device_calls: Some(u32::MAX),
            },
        };
        let (read, why) = k.read(&k.sign(&wild, BODY, None), BODY, None, now(), LIMITS);
        assert_eq!(why, None);
        assert_eq!(read.retry.attempts, LIMITS.max_attempts);
        assert_eq!(read.retry.first_received_at, now());
        assert_eq!(read.retry.retry_at, Some(now() + time::Duration::HOUR));
        assert_eq!(read.progress.done.len(), MAX_USER_DEVICES);
        assert_eq!(read.progress.device_calls, Some(LIMITS.max_attempts));
        // A wait that has passed is no wait.
        let past = Carried {
            retry: RetryState {
                retry_at: Some(now() - time::Duration::SECOND),
                ..state().retry
            },
            ..state()
        };
        let (read, _) = k.read(&k.sign(&past, BODY, None), BODY, None, now(), LIMITS);
        assert_eq!(read.retry.retry_at, None);
    }

    #[test]
    fn a_dead_letter_carries_devices_done_and_fresh_budgets() {
        let k = keys(&["k1"]);
        let done = [DeviceId::parse(A).unwrap(), DeviceId::parse(B).unwrap()];
        let table = k.sign_dead_letter(&done, BODY, None);
        let (read, why) = k.read(&table, BODY, None, now(), LIMITS);
        assert_eq!(why, None);
        assert_eq!(read.retry, RetryState::fresh(now()));
        assert_eq!(read.progress.done, done);
        assert_eq!(read.progress.device_calls, None);
        assert!(
            read.progress
                .is_done(&DeviceId::parse(&B.to_uppercase()).unwrap())
        );
    }

    #[test]
    fn the_default_key_is_derived_and_redacted() {
        let a = StateKeys::derived(b"worker:secret@%2f");
        let table = a.sign(&state(), BODY, None);
        let same = StateKeys::derived(b"worker:secret@%2f");
        assert_eq!(same.read(&table, BODY, None, now(), LIMITS).1, None);
        let other = StateKeys::derived(b"producer:other@%2f");
        assert_eq!(
            other.read(&table, BODY, None, now(), LIMITS).1,
            Some(Rejected::BadMac)
        );
        assert_eq!(format!("{a:?}"), "StateKeys(1 key(s), [REDACTED])");
    }

    fn header_value() -> impl Strategy<Value = AMQPValue> {
        prop_oneof![
            any::<String>().prop_map(|s| text(&s)),
            "[0-9a-f]{64}".prop_map(|s| text(&s)),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<bool>().prop_map(AMQPValue::Boolean),
            "[-0-9T:+Z.]{0,40}".prop_map(|s| text(&s)),
        ]
    }

    proptest! {
        /// No header value, of any type, panics the reader or gets past it unsigned.
        #[test]
        fn arbitrary_headers_never_panic_nor_pass(
            values in proptest::collection::vec(header_value(), 7),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let names = [
                headers::STATE, headers::STATE_MAC, headers::RETRY_AT, headers::ATTEMPTS,
                headers::FIRST_RECEIVED_AT, headers::DEVICES_DONE, headers::DEVICE_CALLS,
            ];
            let mut table = FieldTable::default();
            for (name, value) in names.iter().zip(values) {
                table.insert((*name).into(), value);
            }
            let (read, _) = keys(&["k1"]).read(&table, &body, None, now(), LIMITS);
            prop_assert_eq!(read, Carried::fresh(now()));
        }

        /// Whatever the worker signs, it reads back within the limits, without panicking.
        #[test]
        fn any_signed_state_reads_back_within_limits(
            attempts in any::<u32>(),
            device_calls in proptest::option::of(any::<u32>()),
            received in -10_000_000_000i64..10_000_000_000,
            retry in proptest::option::of(-10_000_000_000i64..10_000_000_000),
        ) {
            let at = |secs: i64| now() + time::Duration::seconds(secs);
            let state = Carried {
                retry: RetryState { attempts, first_received_at: at(received), retry_at: retry.map(at) },
                progress: Progress { done: vec![DeviceId::parse(A).unwrap()], device_calls },
            };
            let k = keys(&["k1"]);
            let (read, why) = k.read(&k.sign(&state, BODY, None), BODY, None, now(), LIMITS);
            prop_assert_eq!(why, None);
            prop_assert!(read.retry.attempts <= LIMITS.max_attempts);
            prop_assert!(read.retry.first_received_at <= now());
            prop_assert!(read.retry.retry_at.is_none_or(|t| t > now() && t <= now() + time::Duration::HOUR));
            prop_assert!(read.progress.device_calls.is_none_or(|n| n <= read.retry.attempts));
        }
    }
}
