//! The lookups' planner: which page of the Autopilot identities to read next, what a page or a
//! failed read means, and when the listing is complete. Each page read is a call the job plans
//! like any other (gate, retries, budgets); this only follows the pages.

use url::Url;

use super::outcome::failure_from;
use crate::{
    contract::{DeviceId, ErrorKind, Failure},
    lookup::{self, Lookup, MAX_PAGES, Matches},
    retry::Reply,
};

/// A listing in progress.
#[derive(Debug, Clone)]
pub(super) struct Listing {
    /// The page to read next.
    pub(super) url: Url,
    /// Through the server-side `$filter` (else a scan of every identity).
    filtered: bool,
    matches: Matches,
    /// Pages read so far.
    pages: u32,
}

/// What a page's final answer means for the listing. Lives for one step, so its size does not
/// matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(super) enum Listed {
    /// Read [`Listing::url`] next.
    More,
    /// Complete: every match, in a stable order.
    Found(Vec<DeviceId>),
    /// The lookup failed: nothing is unassigned.
    Failed(Failure, Option<Reply>),
}

impl Listing {
    pub(super) fn new(lookup: Lookup<'_>, base: &Url) -> Self {
        let filter = lookup::filter(lookup);
        Self::at(lookup::list_url(base, Some(&filter)), true)
    }

    fn at(url: Url, filtered: bool) -> Self {
        Self {
            url,
            filtered,
            matches: Matches::default(),
            pages: 0,
        }
    }

    /// A page was read: collect its matches and follow its nextLink, if it may be followed.
    pub(super) fn page(&mut self, lookup: Lookup<'_>, base: &Url, reply: &Reply) -> Listed {
        let rejected = |message: String| {
            let failure = Failure {
                message,
                ..failure_from(ErrorKind::GraphRejected, Some(reply))
            };
            Listed::Failed(failure, Some(reply.clone()))
        };
        let body = reply.response().map_or(&[][..], |r| &r.body);
        let page = match lookup::parse_page(body) {
            Ok(page) => page,
            Err(message) => return rejected(message),
        };
        self.matches.add(&page, lookup);
        self.pages = self.pages.saturating_add(1);
        let next = match page.next_link {
            Some(next) if !self.matches.too_many() => next,
            _ => {
                let mut ids = std::mem::take(&mut self.matches).into_ids();
                // A stable order, so a handed-back request resumes with the device it was on.
                ids.sort_by_key(|id| id.as_str().to_ascii_lowercase());
                return Listed::Found(ids);
            }
        };
        if self.pages >= MAX_PAGES {
            let message =
                format!("the device list ran past {MAX_PAGES} pages; not followed further");
            return Listed::Failed(Failure::new(ErrorKind::GraphRejected, message), None);
        }
        match lookup::next_link(base, &next) {
            Ok(url) => {
                self.url = url;
                Listed::More
            }
            Err(message) => rejected(message),
        }
    }

    /// A read failed for good. Graph answering 400 to the user filter itself is not the end:
    /// the user's devices are then found by a scan of every identity.
    pub(super) fn failed(
        &mut self,
        lookup: Lookup<'_>,
        base: &Url,
        failure: Failure,
        reply: Option<Reply>,
    ) -> Listed {
        let response = reply.as_ref().and_then(Reply::response);
        let refused =
            self.filtered && response.is_some_and(|r| r.status == 400 && r.error.is_some());
        if refused && matches!(lookup, Lookup::User(_)) {
            *self = Self::at(lookup::list_url(base, None), false);
            return Listed::More;
        }
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
        Listed::Failed(failure, reply)
    }
}
