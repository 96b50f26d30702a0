//! How a job's end is worded: the outcome, why it gave up, and the verdict on several devices.

use time::OffsetDateTime;

use super::{Each, JobState, Now, lookup_of};
use crate::{
    contract::{DeviceOutcome, ErrorKind, Failure, Invalid, Outcome, Request, RetryState},
    lookup::Lookup,
    retry::Reply,
};

/// The summary of a partial failure is cut here (it also travels as a dead-letter header);
/// `data.devices` has every device's own error.
pub(super) const MAX_SUMMARY: usize = 2000;

/// Graph's status and error code, if an answer was had.
pub(super) fn failure_from(kind: ErrorKind, reply: Option<&Reply>) -> Failure {
    let response = reply.and_then(Reply::response);
    Failure {
        kind,
        http_status: response.map(|r| r.status),
        graph_code: response.and_then(|r| r.error.as_ref()?.code.clone()),
        message: reply.map(Reply::describe).unwrap_or_default(),
    }
}

/// An invalid request (or one naming a tenant no profile has): its outcome, before any call.
pub fn invalid_outcome(invalid: Invalid, state: RetryState, now: OffsetDateTime) -> Outcome {
    Outcome {
        request_id: invalid.request_id.unwrap_or_default(),
        device_id: invalid.device_id,
        requested_by: invalid.requested_by,
        reason: invalid.reason,
        attempts: state.attempts,
        error: Some(Failure::new(ErrorKind::InvalidRequest, invalid.message)),
        graph_request_id: None,
        client_request_id: None,
        received_at: state.first_received_at,
        completed_at: now,
        devices: None,
        message: None,
    }
}

/// A request whose `tenant_id` no profile has: invalid, before any call.
pub fn unknown_tenant(request: &Request) -> Invalid {
    Invalid {
        request_id: Some(request.request_id.clone()),
        device_id: request.device_id().cloned(),
        requested_by: request.requested_by.clone(),
        reason: request.reason.clone(),
        message: "tenant_id names no configured tenant".to_owned(),
    }
}

impl JobState {
    pub(super) fn outcome(
        &self,
        error: Option<Failure>,
        reply: Option<&Reply>,
        now: &Now,
    ) -> Outcome {
        let request = &self.request;
        Outcome {
            request_id: request.request_id.clone(),
            device_id: request.device_id().cloned(),
            requested_by: request.requested_by.clone(),
            reason: request.reason.clone(),
            attempts: self.retry.attempts,
            error,
            graph_request_id: reply.and_then(|r| r.response()?.request_id.clone()),
            client_request_id: reply.map(|r| r.client_request_id.clone()),
            received_at: self.retry.first_received_at,
            completed_at: now.at,
            devices: None,
            message: None,
        }
    }

    /// Gives up for good after `calls`, saying why and what Graph said last.
    pub(super) fn give_up(
        &self,
        kind: ErrorKind,
        calls: u32,
        last: Option<&Reply>,
        now: &Now,
    ) -> Failure {
        let why = match kind {
            ErrorKind::DeadlineExceeded => "not_after passed",
            ErrorKind::RetriesExhausted => "retry budget spent",
            _ => "failed",
        };
        let message = match last {
            Some(reply) => format!(
                "{why} after {calls} call(s) in {:.0?}; last: {}",
                self.elapsed(now),
                reply.describe()
            ),
            None => format!("{why} before any call was made"),
        };
        Failure {
            message,
            ..failure_from(kind, last)
        }
    }

    /// The lookup itself failed: nothing was unassigned.
    pub(super) fn lookup_failed(
        &mut self,
        failure: Failure,
        reply: Option<&Reply>,
        now: &Now,
    ) -> super::Action {
        let outcome = Outcome {
            devices: Some(Vec::new()),
            ..self.outcome(Some(failure), reply, now)
        };
        self.finish(outcome)
    }

    /// Every device of a serial or user request has its result.
    pub(super) fn devices_outcome(&self, each: Each, now: &Now) -> Outcome {
        let lookup = lookup_of(&self.request).unwrap_or(Lookup::User(""));
        let (error, message) = verdict(lookup, &each.results);
        let device_id = match lookup {
            Lookup::Serial(_) => each.ids.first().cloned(),
            Lookup::User(_) => None,
        };
        Outcome {
            device_id,
            devices: Some(each.results),
            message,
            ..self.outcome(error, each.last.as_ref(), now)
        }
    }
}

/// The request's error (the first failed device's kind, every failure summarised) and a note.
pub(super) fn verdict(
    lookup: Lookup<'_>,
    results: &[DeviceOutcome],
) -> (Option<Failure>, Option<String>) {
    let failed: Vec<(&str, &Failure)> = results
        .iter()
        .filter_map(|d| Some((d.device_id.as_str(), d.error.as_ref()?)))
        .collect();
    let Some((_, first)) = failed.first() else {
        let note = match lookup {
            Lookup::User(_) if results.is_empty() => {
                Some("no Autopilot device is assigned to this user: nothing to unassign".to_owned())
            }
            _ => None,
        };
        return (None, note);
    };
    let details: Vec<String> = failed
        .iter()
        .map(|(id, f)| format!("{id}: {} ({})", f.kind.as_str(), f.message))
        .collect();
    let mut message = format!(
        "{} of {} device(s) failed; the others are done and will not be redone: {}",
        failed.len(),
        results.len(),
        details.join("; ")
    );
    if let Some((cut, _)) = message.char_indices().nth(MAX_SUMMARY) {
        message.truncate(cut);
        message.push('…');
    }
    let error = Failure {
        message,
        ..(*first).clone()
    };
    (Some(error), None)
}
