//! The headers of a dead letter (section 6) and the header names the worker reads and writes.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use time::OffsetDateTime;

use super::{Failure, carried_headers, rfc3339};

/// Header names the worker reads and writes (section 6 and the retry state it carries).
pub mod headers {
    pub const ERROR_KIND: &str = "x-unassign-error-kind";
    pub const ERROR_MESSAGE: &str = "x-unassign-error-message";
    pub const HTTP_STATUS: &str = "x-unassign-http-status";
    pub const ATTEMPTS: &str = "x-unassign-attempts";
    pub const FAILED_AT: &str = "x-unassign-failed-at";
    pub const REPLAY_COUNT: &str = "x-unassign-replay-count";
    /// The worker's own state of the request (JSON: attempts, first received, a wait still
    /// owed, devices done), trusted only with a valid [`STATE_MAC`] (see `contract::state`).
    pub const STATE: &str = "x-unassign-state";
    /// HMAC-SHA256 (hex) over the state, the body and the message-id, under the state key.
    pub const STATE_MAC: &str = "x-unassign-state-mac";
    /// Devices of a serial or user request already unassigned (comma-separated ids), on dead
    /// letters: for people only, the signed state is what a replay trusts.
    pub const DEVICES_DONE: &str = "x-unassign-devices-done";
    /// Plain state headers written by versions before the state was signed. Never trusted;
    /// their presence without a MAC is counted as a rejected state, and a replay clears them.
    pub const FIRST_RECEIVED_AT: &str = "x-unassign-first-received-at";
    pub const RETRY_AT: &str = "x-unassign-retry-at";
    pub const DEVICE_CALLS: &str = "x-unassign-device-calls";
    pub const TRACEPARENT: &str = "traceparent";
}

/// Headers of a worker-made dead letter (section 6, item 2): the producer's own application
/// headers (never its directives: see [`carried_headers`]), the failure, and the replay count
/// an earlier `dlq replay` wrote. The signed state a replay needs is added by the caller.
pub fn dead_letter_headers(
    original: Option<&FieldTable>,
    failure: &Failure,
    attempts: u32,
    failed_at: OffsetDateTime,
) -> FieldTable {
    let mut map = carried_headers(original).inner().clone();
    let replays = original
        .and_then(|t| header_int(t, headers::REPLAY_COUNT))
        .unwrap_or(0)
        .max(0);
    let mut put = |name: &str, value: AMQPValue| {
        map.insert(ShortString::from(name), value);
    };
    put(headers::ERROR_KIND, long_string(failure.kind.as_str()));
    put(headers::ERROR_MESSAGE, long_string(&failure.message));
    put(headers::ATTEMPTS, AMQPValue::LongLongInt(attempts.into()));
    put(headers::FAILED_AT, long_string(&rfc3339(failed_at)));
    put(headers::REPLAY_COUNT, AMQPValue::LongLongInt(replays));
    if let Some(status) = failure.http_status {
        put(headers::HTTP_STATUS, AMQPValue::LongLongInt(status.into()));
    }
    FieldTable::from(map)
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// An integer header, whichever integer width the publisher chose.
pub fn header_int(table: &FieldTable, name: &str) -> Option<i64> {
    match table.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// A string header (AMQP long or short string).
pub fn header_str<'a>(table: &'a FieldTable, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => Some(std::borrow::Cow::Borrowed(s.as_str())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ErrorKind;

    #[test]
    fn dead_letter_headers_keep_the_original_ones() {
        let mut original = FieldTable::default();
        original.insert("traceparent".into(), long_string("00-abc-def-01"));
        original.insert(headers::HTTP_STATUS.into(), AMQPValue::LongLongInt(503));
        original.insert(headers::REPLAY_COUNT.into(), AMQPValue::LongInt(2));
        original.insert(
            headers::RETRY_AT.into(),
            long_string("2026-11-28T10:00:00Z"),
        );
        let t = OffsetDateTime::from_unix_timestamp(1_795_860_000).unwrap();
        original.insert("CC".into(), long_string("autopilot.unassign.requests"));
        let h = dead_letter_headers(
            Some(&original),
            &Failure::new(ErrorKind::RetriesExhausted, "m"),
            20,
            t,
        );
        assert_eq!(
            header_str(&h, "traceparent").as_deref(),
            Some("00-abc-def-01")
        );
        assert_eq!(
            header_str(&h, headers::ERROR_KIND).as_deref(),
            Some("retries_exhausted")
        );
        assert_eq!(header_str(&h, headers::ERROR_MESSAGE).as_deref(), Some("m"));
        assert_eq!(header_int(&h, headers::ATTEMPTS), Some(20));
        assert_eq!(
            header_int(&h, headers::HTTP_STATUS),
            None,
            "absent without an HTTP answer"
        );
        assert_eq!(header_int(&h, headers::REPLAY_COUNT), Some(2));
        assert!(
            header_str(&h, headers::RETRY_AT).is_none(),
            "no stale retry state"
        );
        assert!(header_str(&h, "CC").is_none(), "no routing directive");
        assert_eq!(
            header_str(&h, headers::FAILED_AT).as_deref(),
            Some("2026-11-28T10:00:00Z")
        );
    }
}
