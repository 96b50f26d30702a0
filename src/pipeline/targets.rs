//! Requests by serial number or by user: list the Autopilot identities (reads, on the read
//! gate), match on the client, then unassign each device found (writes), recording each one
//! done so a hand-back, retry or replay never redoes it.

use super::{Call, Context, Ended, Job, Session, Step, call_until_decided, failure_from};
use crate::{
    contract::{DeviceId, DeviceOutcome, ErrorKind, Failure, Outcome},
    graph::Reply,
    lookup::{self, Lookup, MAX_PAGES, Matches, Resolved},
};

/// The summary of a partial failure is cut here (it also travels as a dead-letter header);
/// `data.devices` has every device's own error.
const MAX_SUMMARY: usize = 2000;

/// Looks the devices up and unassigns each.
pub(super) async fn unassign_looked_up(
    ctx: &Context,
    session: &Session,
    mut job: Job<'_>,
    lookup: Lookup<'_>,
) -> Step {
    let ids = match find(ctx, session, &mut job, lookup).await {
        Ok(ids) => ids,
        Err(step) => return step,
    };
    match lookup::resolve(lookup, ids) {
        Resolved::Devices(ids) => unassign_each(ctx, session, job, lookup, ids).await,
        Resolved::NotFound(message) => {
            lookup_failed(&job, Failure::new(ErrorKind::DeviceNotFound, message), None)
        }
        Resolved::Ambiguous(message) => lookup_failed(
            &job,
            Failure::new(ErrorKind::AmbiguousDevice, message),
            None,
        ),
    }
}

/// How listing ended short of a list of matches.
enum Unlisted {
    /// Graph answered 400 to the filter itself: a user's devices can still be found by a scan;
    /// otherwise the request ends with this step.
    FilterRefused(Step),
    Step(Step),
}

/// Every identity matching `lookup`: through the server-side filter, or — when Graph refuses
/// the user filter — by a scan of every identity.
async fn find(
    ctx: &Context,
    session: &Session,
    job: &mut Job<'_>,
    lookup: Lookup<'_>,
) -> Result<Vec<DeviceId>, Step> {
    let filter = lookup::filter(lookup);
    let listed = match list(ctx, session, job, lookup, Some(&filter)).await {
        Err(Unlisted::FilterRefused(_)) if matches!(lookup, Lookup::User(_)) => {
            tracing::info!("Graph refused the userPrincipalName filter; scanning every identity");
            list(ctx, session, job, lookup, None).await
        }
        listed => listed,
    };
    match listed {
        Ok(matches) => {
            let mut ids = matches.into_ids();
            // A stable order, so a handed-back request resumes with the device it was on.
            ids.sort_by_key(|id| id.as_str().to_ascii_lowercase());
            Ok(ids)
        }
        Err(Unlisted::Step(step) | Unlisted::FilterRefused(step)) => Err(step),
    }
}

/// Follows the pages of one listing, collecting matches.
async fn list(
    ctx: &Context,
    session: &Session,
    job: &mut Job<'_>,
    lookup: Lookup<'_>,
    filter: Option<&str>,
) -> Result<Matches, Unlisted> {
    let base = ctx.graph.base();
    let mut url = lookup::list_url(base, filter);
    let mut matches = Matches::default();
    let rejected = |job: &Job<'_>, message: String, reply: Option<&Reply>| {
        let failure = Failure {
            message,
            ..failure_from(ErrorKind::GraphRejected, reply)
        };
        Unlisted::Step(lookup_failed(job, failure, reply))
    };
    for _ in 0..MAX_PAGES {
        // Each page has a retry budget of its own: a fault on page 21 of a scan is retried
        // like one on page 1, not counted against the twenty pages read before it.
        job.reads = 0;
        let reply = match call_until_decided(ctx, session, job, Call::List(&url)).await {
            Ended::Succeeded(reply) => reply,
            Ended::HandBack(step) => return Err(Unlisted::Step(step)),
            Ended::Failed(failure, reply) => {
                let response = reply.as_ref().and_then(Reply::response);
                let refused = filter.is_some()
                    && response.is_some_and(|r| r.status == 400 && r.error.is_some());
                // A 404 from the list is no verdict on a device.
                let kind = match failure.kind {
                    ErrorKind::DeviceNotFound => ErrorKind::GraphRejected,
                    kind => kind,
                };
                let failure = Failure {
                    kind,
                    message: format!("listing Autopilot devices: {}", failure.message),
                    ..failure
                };
                let step = lookup_failed(job, failure, reply.as_ref());
                return Err(match refused {
                    true => Unlisted::FilterRefused(step),
                    false => Unlisted::Step(step),
                });
            }
        };
        let body = reply.response().map_or(&[][..], |r| &r.body);
        let page = match lookup::parse_page(body) {
            Ok(page) => page,
            Err(message) => return Err(rejected(job, message, Some(&reply))),
        };
        matches.add(&page, lookup);
        let next = match page.next_link {
            Some(next) if !matches.too_many() => next,
            _ => return Ok(matches),
        };
        url = match lookup::next_link(base, &next) {
            Ok(url) => url,
            Err(message) => return Err(rejected(job, message, Some(&reply))),
        };
    }
    let message = format!("the device list ran past {MAX_PAGES} pages; not followed further");
    Err(rejected(job, message, None))
}

/// Unassigns each device in turn, skipping those done in an earlier delivery.
async fn unassign_each(
    ctx: &Context,
    session: &Session,
    mut job: Job<'_>,
    lookup: Lookup<'_>,
    ids: Vec<DeviceId>,
) -> Step {
    let mut results = Vec::with_capacity(ids.len());
    let mut last: Option<Reply> = None;
    let mut resumed = true;
    for id in &ids {
        if job.progress.is_done(id) {
            results.push(DeviceOutcome::new(id, None));
            continue;
        }
        // The first device attempted may be the one a hand-back interrupted: its calls so far
        // count. Every later one starts its own budget.
        if !resumed {
            job.base = job.state.attempts;
        }
        resumed = false;
        match call_until_decided(ctx, session, &mut job, Call::Unassign(id)).await {
            Ended::Succeeded(reply) => {
                job.progress.done.push(id.clone());
                results.push(DeviceOutcome::new(id, None));
                last = Some(reply);
            }
            Ended::Failed(failure, reply) => {
                tracing::warn!(device_id = %id, kind = failure.kind.as_str(), message = %failure.message, "device failed");
                results.push(DeviceOutcome::new(id, Some(failure)));
                last = reply.or(last);
            }
            Ended::HandBack(step) => return step,
        }
    }
    let (error, message) = verdict(lookup, &results);
    let device_id = match lookup {
        Lookup::Serial(_) => ids.first().cloned(),
        Lookup::User(_) => None,
    };
    Step::Done(Box::new(Outcome {
        device_id,
        devices: Some(results),
        message,
        ..job.outcome(error, last.as_ref())
    }))
}

/// The request's error (the first failed device's kind, every failure summarised) and a note.
fn verdict(lookup: Lookup<'_>, results: &[DeviceOutcome]) -> (Option<Failure>, Option<String>) {
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

/// The lookup itself failed: nothing was unassigned.
fn lookup_failed(job: &Job<'_>, failure: Failure, reply: Option<&Reply>) -> Step {
    Step::Done(Box::new(Outcome {
        devices: Some(Vec::new()),
        ..job.outcome(Some(failure), reply)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
    const B: &str = "8b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";

    fn device(id: &str, error: Option<Failure>) -> DeviceOutcome {
        DeviceOutcome::new(&DeviceId::parse(id).unwrap(), error)
    }

    #[test]
    fn a_user_with_nothing_assigned_succeeds_and_says_so() {
        let (error, note) = verdict(Lookup::User("u@x"), &[]);
        assert_eq!(error, None);
        assert!(note.unwrap().contains("nothing to unassign"));
        assert_eq!(
            verdict(Lookup::User("u@x"), &[device(A, None)]),
            (None, None)
        );
    }

    #[test]
    fn a_partial_failure_fails_with_the_first_kind_and_every_detail() {
        let failure = Failure {
            http_status: Some(400),
            ..Failure::new(ErrorKind::GraphRejected, "nope")
        };
        let results = [device(A, None), device(B, Some(failure))];
        let (error, note) = verdict(Lookup::User("u@x"), &results);
        let error = error.unwrap();
        assert_eq!(
            (error.kind, error.http_status),
            (ErrorKind::GraphRejected, Some(400))
        );
        assert!(
            error.message.starts_with("1 of 2 device(s) failed"),
            "{}",
            error.message
        );
        assert!(
            error
                .message
                .contains(&format!("{B}: graph_rejected (nope)"))
        );
        assert_eq!(note, None);
        let long = Failure::new(ErrorKind::GraphRejected, "x".repeat(5000));
        let (error, _) = verdict(Lookup::User("u@x"), &[device(B, Some(long))]);
        assert_eq!(error.unwrap().message.chars().count(), MAX_SUMMARY + 1);
    }
}
