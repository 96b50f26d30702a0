//! The message formats of CONTRACT sections 4–6: the request a producer publishes, the outcome
//! event the worker publishes, and the headers of a dead letter. Pure data and validation, no I/O.

use std::fmt;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

mod carry;
mod state;

pub use carry::{carried_headers, carried_properties};
pub use state::{Carried, Limits, MAX_USER_DEVICES, Progress, Rejected, RetryState, StateKeys};

/// The request's fields (section 4), as JSON keys and CSV columns.
pub const REQUEST_FIELDS: [&str; 8] = [
    "request_id",
    "device_id",
    "serial_number",
    "user_principal_name",
    "tenant_id",
    "requested_by",
    "reason",
    "not_after",
];

/// Bodies above this are refused unparsed.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_REQUEST_ID: usize = 128;
const MAX_REQUESTED_BY: usize = 256;
const MAX_REASON: usize = 1024;
const MAX_SERIAL: usize = 128;
const MAX_UPN: usize = 256;

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

/// `true` for exactly 8-4-4-4-12 hex digits: no braces, no whitespace, nothing else.
pub fn is_guid(s: &str) -> bool {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    s.len() == 36
        && s.split('-').map(str::len).eq(GROUPS)
        && s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

/// A validated Autopilot identity id. The only way to build one is [`DeviceId::parse`], so
/// whatever reaches a Graph URL is a GUID and cannot inject a path or query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn parse(s: &str) -> Option<Self> {
        is_guid(s).then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a request asks to unassign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(DeviceId),
    Serial(String),
    User(String),
}

/// A valid request (section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub request_id: String,
    pub target: Target,
    pub tenant_id: Option<String>,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub not_after: Option<OffsetDateTime>,
}

impl Request {
    pub fn device_id(&self) -> Option<&DeviceId> {
        match &self.target {
            Target::Device(id) => Some(id),
            _ => None,
        }
    }
}

/// A request that cannot be processed, with what is known of it for the event and dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `None` when no trustworthy id exists: such a request is dead-lettered without an event.
    pub request_id: Option<String>,
    pub device_id: Option<DeviceId>,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub message: String,
}

/// The wire shape. `Option<String>` makes serde reject wrong types and duplicate keys for us;
/// unknown fields are ignored as the contract says.
#[derive(Deserialize)]
#[serde(expecting = "a JSON object")]
struct Raw {
    request_id: Option<String>,
    device_id: Option<String>,
    serial_number: Option<String>,
    user_principal_name: Option<String>,
    tenant_id: Option<String>,
    requested_by: Option<String>,
    reason: Option<String>,
    not_after: Option<String>,
}

/// Just enough to correlate a body that is otherwise unusable.
#[derive(Deserialize)]
struct IdOnly {
    request_id: Option<serde_json::Value>,
}

fn valid_request_id(s: &str) -> bool {
    (1..=MAX_REQUEST_ID).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b))
}

/// Parses and validates a request body. `message_id` is the AMQP `message-id`, the fallback id.
pub fn parse_request(body: &[u8], message_id: Option<&str>) -> Result<Request, Invalid> {
    let fallback_id = message_id
        .filter(|id| valid_request_id(id))
        .map(str::to_owned);
    let invalid = |request_id: Option<String>, message: String| Invalid {
        request_id,
        device_id: None,
        requested_by: None,
        reason: None,
        message,
    };
    if body.len() > MAX_BODY_BYTES {
        let message = format!(
            "body is {} bytes; the limit is {MAX_BODY_BYTES}",
            body.len()
        );
        return Err(invalid(fallback_id, message));
    }
    // serde would also read a struct from a JSON array; the contract says object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(invalid(
            fallback_id,
            "body is not a valid request: expected a JSON object".to_owned(),
        ));
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| {
        let id = serde_json::from_slice::<IdOnly>(body)
            .ok()
            .and_then(|v| v.request_id)
            .and_then(|v| {
                v.as_str()
                    .filter(|s| valid_request_id(s))
                    .map(str::to_owned)
            });
        invalid(
            id.or(fallback_id.clone()),
            format!("body is not a valid request: {e}"),
        )
    })?;
    let request_id = match raw.request_id.as_deref() {
        Some(id) if valid_request_id(id) => id.to_owned(),
        Some(_) => {
            let message =
                format!("request_id must be 1–{MAX_REQUEST_ID} characters of A-Z a-z 0-9 . _ : -");
            return Err(invalid(fallback_id, message));
        }
        None => match fallback_id {
            Some(id) => id,
            None => {
                let message = "request_id is missing (neither the body nor message-id has one)";
                return Err(invalid(None, message.to_owned()));
            }
        },
    };
    validate(raw, request_id)
}

fn validate(raw: Raw, request_id: String) -> Result<Request, Invalid> {
    let device_id = raw.device_id.as_deref().and_then(DeviceId::parse);
    let fail = |message: String| Invalid {
        request_id: Some(request_id.clone()),
        device_id: device_id.clone(),
        requested_by: raw.requested_by.clone(),
        reason: raw.reason.clone(),
        message,
    };
    let requested_by = bounded("requested_by", raw.requested_by.clone(), MAX_REQUESTED_BY);
    let reason = bounded("reason", raw.reason.clone(), MAX_REASON);
    let (requested_by, reason) = match (requested_by, reason) {
        (Ok(by), Ok(reason)) => (by, reason),
        (Err(e), _) | (_, Err(e)) => {
            // The audit fields are themselves invalid, so do not echo them.
            return Err(Invalid {
                requested_by: None,
                reason: None,
                ..fail(e)
            });
        }
    };
    let target = target(&raw, device_id.clone()).map_err(&fail)?;
    let tenant_id = match raw.tenant_id {
        Some(t) if is_guid(&t) => Some(t),
        Some(_) => return Err(fail("tenant_id must be a GUID".to_owned())),
        None => None,
    };
    let not_after = match raw.not_after.as_deref() {
        Some(s) => Some(
            OffsetDateTime::parse(s, &Rfc3339)
                .map_err(|e| fail(format!("not_after must be an RFC 3339 timestamp: {e}")))?,
        ),
        None => None,
    };
    Ok(Request {
        request_id,
        target,
        tenant_id,
        requested_by,
        reason,
        not_after,
    })
}

/// Exactly one of the three targets, each well-formed.
fn target(raw: &Raw, device_id: Option<DeviceId>) -> Result<Target, String> {
    match (&raw.device_id, &raw.serial_number, &raw.user_principal_name) {
        (Some(_), None, None) => device_id.map(Target::Device).ok_or_else(|| {
            "device_id must be a GUID (8-4-4-4-12 hex digits, nothing else)".to_owned()
        }),
        (None, Some(serial), None) => serial_number(serial).map(|s| Target::Serial(s.to_owned())),
        (None, None, Some(upn)) => {
            let upn = text("user_principal_name", upn, MAX_UPN)?;
            if upn.split('@').count() != 2 || upn.starts_with('@') || upn.ends_with('@') {
                return Err("user_principal_name must look like user@domain".to_owned());
            }
            Ok(Target::User(upn.to_owned()))
        }
        _ => Err(
            "exactly one of device_id, serial_number, user_principal_name is required".to_owned(),
        ),
    }
}

/// A serial is searched by its longest hyphen-free run: one of only hyphens and blanks would
/// search for nothing, which matches every device of the tenant.
fn serial_number(serial: &str) -> Result<&str, String> {
    let serial = text("serial_number", serial, MAX_SERIAL)?;
    if serial.chars().all(|c| c == '-' || c.is_whitespace()) {
        return Err("serial_number must contain more than hyphens and blanks".to_owned());
    }
    Ok(serial)
}

/// Non-empty, at most `max` characters, no control characters.
fn text<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, String> {
    let chars = value.chars().count();
    if chars == 0 || chars > max {
        return Err(format!("{field} must be 1–{max} characters (got {chars})"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    Ok(value)
}

fn bounded(field: &str, value: Option<String>, max: usize) -> Result<Option<String>, String> {
    match value {
        Some(v) => {
            text(field, &v, max)?;
            Ok(Some(v))
        }
        None => Ok(None),
    }
}

/// W3C trace context from a `traceparent` header. Only a well-formed one is continued: an
/// untrusted header is never echoed into events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    pub span_id: String,
    flags: String,
}

impl TraceContext {
    /// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, ids not all zero.
    pub fn parse(header: &str) -> Option<Self> {
        let hex = |s: &str, len| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        let mut parts = header.split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let valid = version == "00"
            && parts.next().is_none()
            && hex(trace_id, 32)
            && nonzero(trace_id)
            && hex(span_id, 16)
            && nonzero(span_id)
            && hex(flags, 2);
        valid.then(|| Self {
            trace_id: trace_id.into(),
            span_id: span_id.into(),
            flags: flags.into(),
        })
    }

    /// The job's own span in the same trace: same trace id and flags, a new span id.
    pub fn child(&self) -> Self {
        let span_id = format!("{:016x}", rand::random::<u64>().max(1));
        Self {
            span_id,
            ..self.clone()
        }
    }

    pub fn header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// Why a request failed for good (section 5).
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
    use serde_json::json;

    const GUID: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";

    fn parse(value: serde_json::Value) -> Result<Request, Invalid> {
        parse_request(value.to_string().as_bytes(), None)
    }

    fn invalid(value: serde_json::Value) -> Invalid {
        parse(value).expect_err("should be invalid")
    }

    #[test]
    fn guid_rules() {
        assert!(is_guid(GUID));
        assert!(is_guid(&GUID.to_uppercase()));
        for bad in [
            "",
            "7b7c4c1e6f5a4c399a432b1e5b0c1d2e",
            "{7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e}",
            " 7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e",
            "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e ",
            "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2g",
            "7b7c4c1e-6f5a4-c39-9a43-2b1e5b0c1d2e",
            "../../me/../../../../../../../../xx",
            "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2?",
            "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d%2",
            "7b7c4c1é-6f5a-4c39-9a43-2b1e5b0c1d2",
        ] {
            assert!(!is_guid(bad), "{bad:?}");
            assert!(DeviceId::parse(bad).is_none());
        }
    }

    #[test]
    fn a_valid_request() {
        let r = parse(json!({
            "request_id": "hr-4711", "device_id": GUID, "requested_by": "workday",
            "reason": "offboarding", "not_after": "2026-12-01T00:00:00Z", "extra": [1, 2]
        }))
        .unwrap();
        assert_eq!(r.request_id, "hr-4711");
        assert_eq!(r.device_id().unwrap().as_str(), GUID);
        assert_eq!(r.requested_by.as_deref(), Some("workday"));
        assert!(r.not_after.is_some());
    }

    #[test]
    fn request_id_falls_back_to_message_id() {
        let body = json!({"device_id": GUID}).to_string();
        let r = parse_request(body.as_bytes(), Some("msg-1")).unwrap();
        assert_eq!(r.request_id, "msg-1");
        let e = parse_request(body.as_bytes(), None).unwrap_err();
        assert_eq!(
            e.request_id, None,
            "no id at all: dead letter without event"
        );
        let e = parse_request(body.as_bytes(), Some("bad id!")).unwrap_err();
        assert_eq!(e.request_id, None);
    }

    #[test]
    fn path_and_query_injection_never_passes() {
        for id in [
            "../../me",
            "x/../../users",
            "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e/../x",
            "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e?$select=x",
            "me",
        ] {
            let e = invalid(json!({"request_id": "r1", "device_id": id}));
            assert!(e.message.contains("GUID"), "{id}: {}", e.message);
            assert_eq!(e.device_id, None);
            assert_eq!(e.request_id.as_deref(), Some("r1"));
        }
    }

    #[test]
    fn exactly_one_target() {
        let e = invalid(json!({"request_id": "r", "device_id": GUID, "serial_number": "X1"}));
        assert!(e.message.contains("exactly one"));
        let e = invalid(json!({"request_id": "r"}));
        assert!(e.message.contains("exactly one"));
        assert!(matches!(
            parse(json!({"request_id": "r", "serial_number": "X1"}))
                .unwrap()
                .target,
            Target::Serial(_)
        ));
        assert!(matches!(
            parse(json!({"request_id": "r", "user_principal_name": "a@b.com"}))
                .unwrap()
                .target,
            Target::User(_)
        ));
        invalid(json!({"request_id": "r", "user_principal_name": "nobody"}));
    }

    #[test]
    fn a_serial_of_only_hyphens_and_blanks_is_invalid() {
        for serial in ["-", "---", " - ", "\u{a0}-"] {
            let e = invalid(json!({"request_id": "r", "serial_number": serial}));
            assert!(
                e.message.contains("serial_number"),
                "{serial:?}: {}",
                e.message
            );
        }
        parse(json!({"request_id": "r", "serial_number": "-A-"})).unwrap();
    }

    #[test]
    fn strictness() {
        // Wrong types, empty and over-long values, duplicate keys: all invalid, never truncated.
        invalid(json!({"request_id": "r", "device_id": 42}));
        invalid(json!({"request_id": "r", "device_id": GUID, "reason": ""}));
        invalid(json!({"request_id": "r", "device_id": GUID, "reason": "x".repeat(1025)}));
        parse(json!({"request_id": "r", "device_id": GUID, "reason": "x".repeat(1024)})).unwrap();
        invalid(json!({"request_id": "r", "device_id": GUID, "requested_by": "x".repeat(257)}));
        invalid(json!({"request_id": "r".repeat(129), "device_id": GUID}));
        invalid(json!({"request_id": "r", "device_id": GUID, "tenant_id": "contoso"}));
        invalid(json!({"request_id": "r", "device_id": GUID, "not_after": "tomorrow"}));
        let dup = format!(r#"{{"request_id":"r","device_id":"{GUID}","device_id":"{GUID}"}}"#);
        let e = parse_request(dup.as_bytes(), None).unwrap_err();
        assert!(e.message.contains("duplicate"), "{}", e.message);
        assert_eq!(e.request_id.as_deref(), Some("r"), "still correlated");
    }

    #[test]
    fn garbage_bodies() {
        let e = parse_request(b"not json", Some("m1")).unwrap_err();
        assert_eq!(e.request_id.as_deref(), Some("m1"));
        let e = parse_request(b"[1,2]", None).unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = parse_request(br#"{"request_id":"r9","device_id":7}"#, None).unwrap_err();
        assert_eq!(e.request_id.as_deref(), Some("r9"));
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let e = parse_request(&big, Some("m2")).unwrap_err();
        assert!(e.message.contains("limit"));
        assert!(parse_request(&[0xff, 0xfe], None).is_err());
    }

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

    #[test]
    fn trace_context_is_validated_and_continued() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceContext::parse(tp).unwrap();
        assert_eq!(parent.header(), tp);
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert!(TraceContext::parse(&child.header()).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-<script>alert(1)</script>-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    /// Property tests: whatever the body, the parser answers (never panics), and the only
    /// device id it lets through is a bare GUID — nothing that could steer a Graph URL.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A parse that must not panic; a `Device` target must be hex digits and dashes only.
        fn check(body: &[u8], message_id: Option<&str>) -> Result<(), TestCaseError> {
            if let Ok(request) = parse_request(body, message_id) {
                prop_assert!(valid_request_id(&request.request_id));
                if let Target::Device(id) = &request.target {
                    prop_assert!(is_guid(id.as_str()), "{id:?}");
                    prop_assert!(
                        id.as_str()
                            .bytes()
                            .all(|b| b == b'-' || b.is_ascii_hexdigit()),
                        "{id:?}"
                    );
                }
            }
            Ok(())
        }

        fn hostile_string() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(GUID.to_owned()),
                Just(GUID.to_uppercase()),
                Just("../../me".to_owned()),
                Just(format!("{GUID}/../x")),
                Just(format!("{GUID}?$select=y")),
                Just(format!("{GUID}#frag")),
                Just(format!("{{{GUID}}}")),
                Just(format!(" {GUID}")),
                Just(format!("{GUID}\n")),
                Just(format!("{GUID}\u{0}")),
                Just("%2e%2e%2f%2e%2e".to_owned()),
                Just("7b7c4c1e%2f6f5a-4c39-9a43-2b1e5b0c1d2e".to_owned()),
                Just("7b7c4c1é-6f5a-4c39-9a43-2b1e5b0c1d2".to_owned()),
                Just("７b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e".to_owned()),
                "[0-9a-fA-F/.?#%-]{30,40}",
                "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f/.?#%]{12}",
                "\\PC{0,64}",
                ".{0,64}",
                "[\\x00-\\x1f]{1,8}",
                "x{1000,5000}",
            ]
        }

        fn hostile_value() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                4 => hostile_string().prop_map(serde_json::Value::from),
                1 => Just(serde_json::Value::Null),
                1 => any::<bool>().prop_map(serde_json::Value::from),
                1 => any::<i64>().prop_map(serde_json::Value::from),
                1 => any::<f64>().prop_map(serde_json::Value::from),
                1 => prop::collection::vec(hostile_string(), 0..3)
                    .prop_map(serde_json::Value::from),
                1 => hostile_string().prop_map(|s| json!({ "id": s })),
            ]
        }

        fn arbitrary_json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                ".{0,20}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("request_id".to_owned()),
                            Just("device_id".to_owned()),
                            Just("serial_number".to_owned()),
                            Just("user_principal_name".to_owned()),
                            Just("tenant_id".to_owned()),
                            ".{0,12}",
                        ],
                        inner,
                        0..6
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        use super::REQUEST_FIELDS as FIELDS;

        /// A JSON object written by hand so keys can repeat: `(field index, value)` pairs.
        fn object_text(fields: &[(usize, serde_json::Value)]) -> String {
            let members: Vec<String> = fields
                .iter()
                .map(|(i, v)| format!("{}:{v}", serde_json::Value::from(FIELDS[*i])))
                .collect();
            format!("{{{}}}", members.join(","))
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(
                body in prop::collection::vec(any::<u8>(), 0..512),
                message_id in proptest::option::of(".{0,40}"),
            ) {
                check(&body, message_id.as_deref())?;
            }

            #[test]
            fn arbitrary_json_never_panics(value in arbitrary_json()) {
                check(value.to_string().as_bytes(), Some("m-1"))?;
            }

            #[test]
            fn adversarial_objects_only_let_guids_through(
                device_id in hostile_value(),
                others in prop::collection::vec((0..FIELDS.len(), hostile_value()), 0..6),
                request_id in prop_oneof![Just(json!("r-1")), hostile_value()],
            ) {
                let mut fields = vec![(0, request_id), (1, device_id.clone())];
                fields.extend(others);
                let body = object_text(&fields);
                check(body.as_bytes(), None)?;
                // With nothing else in the way, a string device id is accepted iff it is a GUID.
                let alone = object_text(&[(0, json!("r-1")), (1, device_id.clone())]);
                check(alone.as_bytes(), None)?;
                let accepted = parse_request(alone.as_bytes(), None).is_ok();
                prop_assert_eq!(accepted, device_id.as_str().is_some_and(is_guid));
            }

            #[test]
            fn guid_shaped_ids_pass_only_as_hex(
                id in "[0-9a-fA-F/.?#%gG é]{8}-[0-9a-f/.?#%]{4}-[0-9a-f.]{4}-[0-9a-f?]{4}-[0-9a-f/.?#%]{12}",
            ) {
                let body = object_text(&[(0, json!("r-1")), (1, json!(id))]);
                check(body.as_bytes(), None)?;
                let hex = id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit());
                prop_assert_eq!(parse_request(body.as_bytes(), None).is_ok(), hex && id.len() == 36);
            }

            #[test]
            fn duplicate_keys_are_refused(field in 0..FIELDS.len(), value in hostile_value()) {
                let body = object_text(&[
                    (0, json!("r-1")),
                    (1, json!(GUID)),
                    (field, value.clone()),
                    (field, value),
                ]);
                prop_assert!(parse_request(body.as_bytes(), None).is_err(), "{}", body);
            }
        }
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
