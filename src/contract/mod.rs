//! The message formats of CONTRACT sections 4–6, one module a section: the request a producer
//! publishes, the outcome event the worker publishes, the headers of a dead letter, the trace
//! context it continues, the signed state a job carries between deliveries, and what of a
//! producer's message is carried over. Pure data and validation, no I/O and no configuration:
//! everything else depends on this module, and it on nothing of the crate.

mod carry;
mod dead_letter;
mod event;
mod id;
mod request;
mod state;
mod trace;

pub use carry::{carried_headers, carried_properties};
pub use dead_letter::{dead_letter_headers, header_int, header_str, headers};
pub use event::{
    DeviceOutcome, EVENT_FAILED, EVENT_SUCCEEDED, ErrorKind, EventData, Failure, Outcome,
    OutcomeEvent, rfc3339,
};
pub use id::{DeviceId, NotAGuid, TenantId, is_guid};
pub use request::{Invalid, MAX_BODY_BYTES, REQUEST_FIELDS, Request, Target, parse_request};
pub use state::{
    Carried, Limits, MAX_RETRY_AFTER, MAX_USER_DEVICES, Progress, Rejected, RetryState, StateKeys,
};
pub use trace::TraceContext;
