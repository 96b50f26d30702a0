//! The request a producer publishes (section 4): parsed and validated, or refused with what is
//! known of it for the event and the dead letter.

use serde::Deserialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{DeviceId, is_guid};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::id::tests::GUID;
    use serde_json::json;

    fn parse(value: serde_json::Value) -> Result<Request, Invalid> {
        parse_request(value.to_string().as_bytes(), None)
    }

    fn invalid(value: serde_json::Value) -> Invalid {
        parse(value).expect_err("should be invalid")
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
}
