//! The outcome event the worker publishes for every request (section 5), a CloudEvent.

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{DeviceId, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidRequest,
    DeviceNotFound,
    AmbiguousDevice,
    GraphRejected,
    RetriesExhausted,
    DeadlineExceeded,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 6] = [
        Self::InvalidRequest,
        Self::DeviceNotFound,
        Self::AmbiguousDevice,
        Self::GraphRejected,
        Self::RetriesExhausted,
        Self::DeadlineExceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::DeviceNotFound => "device_not_found",
            Self::AmbiguousDevice => "ambiguous_device",
            Self::GraphRejected => "graph_rejected",
            Self::RetriesExhausted => "retries_exhausted",
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

/// The `error` object of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: ErrorKind,
    pub http_status: Option<u16>,
    pub graph_code: Option<String>,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            http_status: None,
            graph_code: None,
            message: message.into(),
        }
    }
}

pub const EVENT_SUCCEEDED: &str = "autopilot.unassign.succeeded";
pub const EVENT_FAILED: &str = "autopilot.unassign.failed";

/// A structured-mode CloudEvents 1.0 outcome event (section 5).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    pub time: String,
    pub datacontenttype: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub traceparent: Option<String>,
    pub data: EventData,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventData {
    pub request_id: String,
    pub device_id: Option<String>,
    pub outcome: String,
    pub attempts: u32,
    pub error: Option<Failure>,
    pub graph_request_id: Option<String>,
    pub client_request_id: Option<String>,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub received_at: String,
    pub completed_at: String,
    /// Each device a serial or user request resolved to; absent for a `device_id` request.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub devices: Option<Vec<DeviceOutcome>>,
    /// A note for people, e.g. that a user had nothing to unassign.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

/// One resolved device's result in `data.devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceOutcome {
    pub device_id: String,
    pub outcome: String,
    pub error: Option<Failure>,
}

impl DeviceOutcome {
    pub fn new(device: &DeviceId, error: Option<Failure>) -> Self {
        Self {
            device_id: device.to_string(),
            outcome: outcome_word(error.is_some()).to_owned(),
            error,
        }
    }

    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}

fn outcome_word(failed: bool) -> &'static str {
    if failed { "failed" } else { "succeeded" }
}

/// Everything known about a request at its end, from which the event and dead letter are made.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    pub device_id: Option<DeviceId>,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub attempts: u32,
    pub error: Option<Failure>,
    pub graph_request_id: Option<String>,
    pub client_request_id: Option<String>,
    pub received_at: OffsetDateTime,
    pub completed_at: OffsetDateTime,
    /// `data.devices` of a serial or user request.
    pub devices: Option<Vec<DeviceOutcome>>,
    pub message: Option<String>,
}

impl Outcome {
    /// What a dead letter carries forward: the devices already unassigned.
    pub fn progress(&self) -> Progress {
        let done = self.devices.iter().flatten().filter(|d| d.succeeded());
        Progress {
            done: done.filter_map(|d| DeviceId::parse(&d.device_id)).collect(),
            device_calls: None,
        }
    }

    pub fn event_type(&self) -> &'static str {
        if self.error.is_some() {
            EVENT_FAILED
        } else {
            EVENT_SUCCEEDED
        }
    }

    /// The CloudEvent for this outcome; `source` is `unassign-worker/<instance>`, `traceparent`
    /// the request's W3C trace context, carried over.
    pub fn to_event(&self, source: &str, id: String, traceparent: Option<&str>) -> OutcomeEvent {
        OutcomeEvent {
            specversion: "1.0".to_owned(),
            id,
            source: source.to_owned(),
            event_type: self.event_type().to_owned(),
            subject: self.device_id.as_ref().map(ToString::to_string),
            time: rfc3339(self.completed_at),
            datacontenttype: "application/json".to_owned(),
            traceparent: traceparent.map(str::to_owned),
            data: EventData {
                request_id: self.request_id.clone(),
                device_id: self.device_id.as_ref().map(ToString::to_string),
                outcome: outcome_word(self.error.is_some()).to_owned(),
                attempts: self.attempts,
                error: self.error.clone(),
                graph_request_id: self.graph_request_id.clone(),
                client_request_id: self.client_request_id.clone(),
                requested_by: self.requested_by.clone(),
                reason: self.reason.clone(),
                received_at: rfc3339(self.received_at),
                completed_at: rfc3339(self.completed_at),
                devices: self.devices.clone(),
                message: self.message.clone(),
            },
        }
    }
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .expect("every OffsetDateTime formats as RFC 3339")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::id::tests::GUID;
    use serde_json::json;

    #[test]
    fn event_matches_the_documented_shape() {
        let t = OffsetDateTime::from_unix_timestamp(1_795_860_000).unwrap();
        let outcome = Outcome {
            request_id: "hr-4711".into(),
            device_id: DeviceId::parse(GUID),
            requested_by: Some("workday".into()),
            reason: Some("offboarding".into()),
            attempts: 2,
            error: None,
            graph_request_id: Some("g".into()),
            client_request_id: Some("c".into()),
            received_at: t,
            completed_at: t,
            devices: None,
            message: None,
        };
        let event = serde_json::to_value(outcome.to_event("unassign-worker/w1", "e1".into(), None))
            .unwrap();
        assert_eq!(
            event,
            json!({
                "specversion": "1.0", "id": "e1", "source": "unassign-worker/w1",
                "type": "autopilot.unassign.succeeded", "subject": GUID,
                "time": "2026-11-28T10:00:00Z", "datacontenttype": "application/json",
                "data": {
                    "request_id": "hr-4711", "device_id": GUID, "outcome": "succeeded",
                    "attempts": 2, "error": null, "graph_request_id": "g",
                    "client_request_id": "c", "requested_by": "workday", "reason": "offboarding",
                    "received_at": "2026-11-28T10:00:00Z", "completed_at": "2026-11-28T10:00:00Z"
                }
            })
        );
        let failed = Outcome {
            device_id: None,
            error: Some(Failure {
                http_status: Some(404),
                graph_code: Some("ResourceNotFound".into()),
                ..Failure::new(ErrorKind::DeviceNotFound, "gone")
            }),
            ..outcome
        };
        let event =
            serde_json::to_value(failed.to_event("s", "e2".into(), Some("00-t-s-01"))).unwrap();
        assert_eq!(event["type"], "autopilot.unassign.failed");
        assert_eq!(
            event["traceparent"], "00-t-s-01",
            "the distributed-tracing extension"
        );
        assert!(
            event.get("subject").is_none(),
            "no subject without a valid device id"
        );
        assert_eq!(event["data"]["outcome"], "failed");
        assert_eq!(
            event["data"]["error"],
            json!({"kind": "device_not_found", "http_status": 404, "graph_code": "ResourceNotFound", "message": "gone"})
        );
    }
    #[test]
    fn device_lists_appear_only_for_lookups() {
        let t = OffsetDateTime::from_unix_timestamp(1_795_860_000).unwrap();
        let outcome = Outcome {
            request_id: "r".into(),
            device_id: None,
            requested_by: None,
            reason: None,
            attempts: 0,
            error: None,
            graph_request_id: None,
            client_request_id: None,
            received_at: t,
            completed_at: t,
            devices: None,
            message: None,
        };
        let event = serde_json::to_value(outcome.to_event("s", "e".into(), None)).unwrap();
        assert!(event["data"].get("devices").is_none());
        let id = DeviceId::parse(GUID).unwrap();
        let failed = Failure::new(ErrorKind::DeviceNotFound, "gone");
        let outcome = Outcome {
            devices: Some(vec![
                DeviceOutcome::new(&id, None),
                DeviceOutcome::new(&id, Some(failed)),
            ]),
            message: Some("note".into()),
            ..outcome
        };
        let event = serde_json::to_value(outcome.to_event("s", "e".into(), None)).unwrap();
        assert_eq!(
            event["data"]["devices"],
            json!([
                {"device_id": GUID, "outcome": "succeeded", "error": null},
                {"device_id": GUID, "outcome": "failed", "error":
                    {"kind": "device_not_found", "http_status": null, "graph_code": null, "message": "gone"}},
            ])
        );
        assert_eq!(event["data"]["message"], "note");
        assert_eq!(
            outcome.progress().done,
            [id],
            "only succeeded devices are done"
        );
    }
}
