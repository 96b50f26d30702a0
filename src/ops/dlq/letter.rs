//! One dead letter as an operator sees it: what failed and why, from the worker's
//! `x-unassign-*` headers or the broker's `x-death`, which replays a filter selects, and the
//! headers its replayed copy carries. Pure: no broker here.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::contract::{self, ErrorKind, header_int, header_str, headers};
/// The kind `dlq list` shows for a dead letter the broker made through `x-delivery-limit`.
pub const DELIVERY_LIMIT: &str = "delivery_limit";
/// Other reasons a broker may write into `x-death` (kept filterable, should they appear).
const OTHER_BROKER_REASONS: [&str; 3] = ["rejected", "expired", "maxlen"];
/// A dead letter with neither `x-unassign-*` nor `x-death` headers (published by hand, say).
pub const UNKNOWN: &str = "unknown";

/// Headers a replay removes: the failure, the retry state (stale budgets would fail the job at
/// once) and the broker's dead-lettering history. `x-first-death-*` and `x-last-death-*` go too.
/// `x-unassign-devices-done` stays: a replay does not redo the devices already unassigned.
const CLEARED_ON_REPLAY: [&str; 10] = [
    headers::ERROR_KIND,
    headers::ERROR_MESSAGE,
    headers::HTTP_STATUS,
    headers::FAILED_AT,
    headers::ATTEMPTS,
    headers::FIRST_RECEIVED_AT,
    headers::RETRY_AT,
    headers::DEVICE_CALLS,
    "x-death",
    "x-delivery-count",
];
const CLEARED_PREFIXES: [&str; 2] = ["x-first-death-", "x-last-death-"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub request_id: Option<String>,
    pub error_kind: String,
    pub http_status: Option<u16>,
    pub attempts: Option<u32>,
    pub failed_at: Option<String>,
    pub message: Option<String>,
    pub replay_count: u32,
}

/// The newest entry of a broker-written `x-death` header.
struct Death {
    reason: String,
    queue: String,
    time: Option<OffsetDateTime>,
}

impl DeadLetter {
    /// Reads a dead letter's headers. The worker's `x-unassign-*` headers describe its own
    /// dead letters; `x-death` describes the broker's, unless the worker's are newer.
    pub fn describe(body: &[u8], properties: &BasicProperties) -> Self {
        let table = properties.headers().clone().unwrap_or_default();
        let message_id = properties.message_id().as_ref().map(ShortString::as_str);
        let request_id = match contract::parse_request(body, message_id) {
            Ok(request) => Some(request.request_id),
            Err(invalid) => invalid.request_id,
        };
        let attempts = header_int(&table, headers::ATTEMPTS).and_then(|n| u32::try_from(n).ok());
        let replay_count = header_int(&table, headers::REPLAY_COUNT)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        let failed_at = header_str(&table, headers::FAILED_AT).map(|s| s.into_owned());
        let worker_kind = header_str(&table, headers::ERROR_KIND).map(|s| s.into_owned());
        let death = latest_death(&table).filter(|death| {
            let worker_time = failed_at
                .as_deref()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
            worker_kind.is_none()
                || matches!((death.time, worker_time), (Some(d), Some(w)) if d > w)
        });
        let base = Self {
            request_id,
            error_kind: UNKNOWN.to_owned(),
            http_status: None,
            attempts,
            failed_at: None,
            message: None,
            replay_count,
        };
        match (death, worker_kind) {
            (Some(death), _) => Self {
                message: Some(death.explain()),
                failed_at: death.time.map(contract::rfc3339),
                error_kind: death.reason,
                ..base
            },
            (None, Some(kind)) => Self {
                error_kind: kind,
                http_status: header_int(&table, headers::HTTP_STATUS)
                    .and_then(|n| u16::try_from(n).ok()),
                failed_at,
                message: header_str(&table, headers::ERROR_MESSAGE).map(|s| s.into_owned()),
                ..base
            },
            (None, None) => Self {
                message: Some("no x-unassign-* or x-death headers".to_owned()),
                ..base
            },
        }
    }
}

impl Death {
    fn explain(&self) -> String {
        let why = match self.reason.as_str() {
            DELIVERY_LIMIT => {
                "x-delivery-limit reached (crash-loop guard: delivered that often without an ack)"
            }
            other => other,
        };
        format!("broker dead-lettered it from {}: {why}", self.queue)
    }
}

/// RabbitMQ keeps `x-death` newest first.
fn latest_death(table: &FieldTable) -> Option<Death> {
    let AMQPValue::FieldArray(deaths) = table.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(entry) = deaths.as_slice().first()? else {
        return None;
    };
    let time = match entry.inner().get("time") {
        Some(AMQPValue::Timestamp(t)) => i64::try_from(*t)
            .ok()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
        _ => None,
    };
    Some(Death {
        reason: header_str(entry, "reason")?.into_owned(),
        queue: header_str(entry, "queue").unwrap_or_default().into_owned(),
        time,
    })
}

/// The headers of a replayed copy: the original ones without the failure, the retry state and
/// the broker's history, and with `x-unassign-replay-count` one higher.
pub fn replay_headers(original: &FieldTable) -> FieldTable {
    let mut map = original.inner().clone();
    map.retain(|name, _| {
        let name = name.as_str();
        !CLEARED_ON_REPLAY.contains(&name) && !CLEARED_PREFIXES.iter().any(|p| name.starts_with(p))
    });
    let replays = header_int(original, headers::REPLAY_COUNT).unwrap_or(0);
    map.insert(
        headers::REPLAY_COUNT.into(),
        AMQPValue::LongLongInt(replays.saturating_add(1)),
    );
    FieldTable::from(map)
}

/// Every kind `--error-kind` accepts: the worker's, and the broker's `x-death` reasons.
pub fn known_kinds() -> Vec<&'static str> {
    let worker = ErrorKind::ALL.iter().map(|k| k.as_str());
    let broker = [DELIVERY_LIMIT].into_iter().chain(OTHER_BROKER_REASONS);
    worker.chain(broker).chain([UNKNOWN]).collect()
}

/// Which dead letters a replay moves.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub error_kind: Option<String>,
    pub request_id: Option<String>,
}

impl Filter {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let kind = self
            .error_kind
            .as_ref()
            .is_none_or(|k| *k == letter.error_kind);
        let id = self
            .request_id
            .as_ref()
            .is_none_or(|id| letter.request_id.as_ref() == Some(id));
        kind && id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Failure, dead_letter_headers};
    use lapin::types::{FieldArray, LongString};

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn props(table: FieldTable) -> BasicProperties {
        BasicProperties::default().with_headers(table)
    }

    const BODY: &[u8] =
        br#"{"request_id":"hr-1","device_id":"7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e"}"#;

    fn x_death(reason: &str, at: i64) -> AMQPValue {
        let mut entry = FieldTable::default();
        entry.insert("reason".into(), text(reason));
        entry.insert("queue".into(), text("q.requests"));
        entry.insert("count".into(), AMQPValue::LongLongInt(1));
        entry.insert("time".into(), AMQPValue::Timestamp(at as u64));
        let mut deaths = FieldArray::default();
        deaths.push(AMQPValue::FieldTable(entry));
        AMQPValue::FieldArray(deaths)
    }

    fn worker_made(at: i64) -> FieldTable {
        let failure = Failure {
            http_status: Some(404),
            ..Failure::new(ErrorKind::DeviceNotFound, "gone")
        };
        let at = OffsetDateTime::from_unix_timestamp(at).unwrap();
        dead_letter_headers(None, &failure, 3, at)
    }

    #[test]
    fn a_worker_made_dead_letter() {
        let letter = DeadLetter::describe(BODY, &props(worker_made(1_795_860_000)));
        assert_eq!(
            letter,
            DeadLetter {
                request_id: Some("hr-1".into()),
                error_kind: "device_not_found".into(),
                http_status: Some(404),
                attempts: Some(3),
                failed_at: Some("2026-11-28T10:00:00Z".into()),
                message: Some("gone".into()),
                replay_count: 0,
            }
        );
    }

    #[test]
    fn a_broker_made_dead_letter_reads_x_death() {
        let mut table = FieldTable::default();
        table.insert("x-death".into(), x_death("delivery_limit", 1_795_860_000));
        let properties = props(table).with_message_id("msg-7".into());
        let letter = DeadLetter::describe(b"not json", &properties);
        assert_eq!(
            letter.request_id.as_deref(),
            Some("msg-7"),
            "message-id fallback"
        );
        assert_eq!(letter.error_kind, DELIVERY_LIMIT);
        assert_eq!(letter.failed_at.as_deref(), Some("2026-11-28T10:00:00Z"));
        assert!(letter.message.unwrap().contains("q.requests"));
        assert_eq!((letter.http_status, letter.attempts), (None, None));
    }

    #[test]
    fn the_newer_of_worker_and_broker_history_wins() {
        let mut table = worker_made(1_795_860_000);
        table.insert("x-death".into(), x_death("delivery_limit", 1_795_860_060));
        assert_eq!(
            DeadLetter::describe(BODY, &props(table)).error_kind,
            DELIVERY_LIMIT
        );
        let mut table = worker_made(1_795_860_060);
        table.insert("x-death".into(), x_death("delivery_limit", 1_795_860_000));
        assert_eq!(
            DeadLetter::describe(BODY, &props(table)).error_kind,
            "device_not_found"
        );
    }

    #[test]
    fn no_history_no_id() {
        let letter = DeadLetter::describe(b"[]", &BasicProperties::default());
        assert_eq!(
            (letter.request_id, letter.error_kind.as_str()),
            (None, UNKNOWN)
        );
    }

    #[test]
    fn replay_clears_the_failure_and_history_and_counts() {
        let mut table = worker_made(1_795_860_000);
        table.insert("x-death".into(), x_death("delivery_limit", 1));
        for name in [
            "x-first-death-reason",
            "x-last-death-queue",
            "x-delivery-count",
        ] {
            table.insert(name.into(), text("x"));
        }
        table.insert(headers::RETRY_AT.into(), text("2026-11-28T10:00:00Z"));
        table.insert(
            headers::FIRST_RECEIVED_AT.into(),
            text("2026-11-28T10:00:00Z"),
        );
        table.insert(headers::TRACEPARENT.into(), text("00-abc-def-01"));
        table.insert(headers::REPLAY_COUNT.into(), AMQPValue::LongInt(2));
        table.insert(headers::DEVICE_CALLS.into(), AMQPValue::LongInt(3));
        table.insert(
            headers::DEVICES_DONE.into(),
            text("7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e"),
        );
        let replayed = replay_headers(&table);
        let names: Vec<&str> = replayed.inner().keys().map(ShortString::as_str).collect();
        assert_eq!(
            names,
            [
                headers::TRACEPARENT,
                headers::DEVICES_DONE,
                headers::REPLAY_COUNT
            ],
            "sorted by name; the devices done survive"
        );
        assert_eq!(header_int(&replayed, headers::REPLAY_COUNT), Some(3));
        assert_eq!(
            header_int(
                &replay_headers(&FieldTable::default()),
                headers::REPLAY_COUNT
            ),
            Some(1)
        );
    }

    #[test]
    fn filters() {
        let letter = DeadLetter::describe(BODY, &props(worker_made(0)));
        let f = |kind: Option<&str>, id: Option<&str>| Filter {
            error_kind: kind.map(str::to_owned),
            request_id: id.map(str::to_owned),
        };
        assert!(f(None, None).matches(&letter));
        assert!(f(Some("device_not_found"), Some("hr-1")).matches(&letter));
        assert!(!f(Some("delivery_limit"), None).matches(&letter));
        assert!(!f(None, Some("hr-2")).matches(&letter));
        assert!(known_kinds().contains(&DELIVERY_LIMIT));
    }
}
