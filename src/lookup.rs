//! Resolving a serial number or a user to Autopilot identity ids: the OData filters, the list
//! URLs, which `@odata.nextLink` may be followed, and matching on the client. Pure, no I/O; the
//! lookups' planner (`job::listing`) drives them.
//!
//! Nothing here is cached: every request lists afresh, so a device that changed hands since
//! is never unassigned on stale knowledge.

use serde::Deserialize;
use url::Url;

use crate::contract::{DeviceId, MAX_USER_DEVICES};

/// The collection listed, under `graph.base_url`.
const COLLECTION: [&str; 2] = ["deviceManagement", "windowsAutopilotDeviceIdentities"];
/// Pages one lookup follows at most: a loop of nextLinks, or a tenant far beyond any real
/// Autopilot inventory at Graph's page size, ends the lookup rather than spinning.
pub const MAX_PAGES: u32 = 10_000;
/// Candidate ids an `ambiguous_device` message names.
const MAX_CANDIDATES_SHOWN: usize = 20;

/// What is being looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    Serial(&'a str),
    User(&'a str),
}

/// An OData string literal: single quotes around, a quote inside doubled. The URL builder
/// percent-encodes the whole query value on top, so nothing in the value can end the literal,
/// the filter or the query.
pub fn odata_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The server-side `$filter` for a lookup. A serial is searched with `contains` on its longest
/// hyphen-free run (Graph rejects `serialNumber eq`, and `contains` is reported to fail on
/// hyphens); the client then matches the whole serial exactly.
pub fn filter(lookup: Lookup<'_>) -> String {
    match lookup {
        Lookup::Serial(serial) => {
            let run = serial.split('-').max_by_key(|s| s.len()).unwrap_or("");
            format!("contains(serialNumber,{})", odata_literal(run))
        }
        Lookup::User(upn) => format!("userPrincipalName eq {}", odata_literal(upn)),
    }
}

/// The list URL, with `$filter` when given (`None`: every identity, for a scan).
pub fn list_url(base: &Url, filter: Option<&str>) -> Url {
    let mut url = base.clone();
    url.path_segments_mut()
        .expect("graph.base_url is an http(s) URL")
        .pop_if_empty()
        .extend(COLLECTION);
    if let Some(filter) = filter {
        url.query_pairs_mut().append_pair("$filter", filter);
    }
    url
}

/// An `@odata.nextLink`, if it may be followed: the same origin as `graph.base_url` and a path
/// under it. Anything else would carry the bearer token to another host.
pub fn next_link(base: &Url, link: &str) -> Result<Url, String> {
    let refuse = || {
        format!("Graph's @odata.nextLink {link:?} is not under graph.base_url {base}; not followed")
    };
    let url = Url::parse(link).map_err(|_| refuse())?;
    let prefix = base.path().trim_end_matches('/');
    let under = url.path() == prefix || url.path().starts_with(&format!("{prefix}/"));
    let clean = url.username().is_empty() && url.password().is_none() && url.fragment().is_none();
    (url.origin() == base.origin() && under && clean)
        .then_some(url)
        .ok_or_else(refuse)
}

/// One page of the list, as much of it as matching needs.
#[derive(Debug, Deserialize)]
pub struct Page {
    pub value: Vec<Identity>,
    #[serde(rename = "@odata.nextLink")]
    pub next_link: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub id: String,
    #[serde(default)]
    pub serial_number: Option<String>,
    #[serde(default)]
    pub user_principal_name: Option<String>,
}

impl Identity {
    /// Exact, case-insensitive.
    fn matches(&self, lookup: Lookup<'_>) -> bool {
        let (have, want) = match lookup {
            Lookup::Serial(serial) => (self.serial_number.as_deref(), serial),
            Lookup::User(upn) => (self.user_principal_name.as_deref(), upn),
        };
        have.is_some_and(|have| have.to_lowercase() == want.to_lowercase())
    }
}

/// Parses a page; an identity whose id is not a GUID makes the page unusable, since its id
/// could never be used in a URL and a silent skip could hide a second match.
pub fn parse_page(body: &[u8]) -> Result<Page, String> {
    let page: Page = serde_json::from_slice(body)
        .map_err(|e| format!("Graph's device list could not be read: {e}"))?;
    match page.value.iter().find(|d| DeviceId::parse(&d.id).is_none()) {
        Some(bad) => Err(format!(
            "Graph listed an identity whose id {:?} is not a GUID",
            bad.id.chars().take(64).collect::<String>()
        )),
        None => Ok(page),
    }
}

/// The matches found so far, without duplicates, in the order Graph listed them.
#[derive(Debug, Clone, Default)]
pub struct Matches(Vec<DeviceId>);

impl Matches {
    pub fn add(&mut self, page: &Page, lookup: Lookup<'_>) {
        for identity in page.value.iter().filter(|d| d.matches(lookup)) {
            let id = DeviceId::parse(&identity.id).expect("parse_page checked every id");
            if !self
                .0
                .iter()
                .any(|d| d.as_str().eq_ignore_ascii_case(id.as_str()))
            {
                self.0.push(id);
            }
        }
    }

    /// More than a user request may unassign: stop listing, the request fails anyway.
    pub fn too_many(&self) -> bool {
        self.0.len() > MAX_USER_DEVICES
    }

    pub fn into_ids(self) -> Vec<DeviceId> {
        self.0
    }
}

/// What a lookup found, as the request's fate.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Unassign these (none at all is a success for a user).
    Devices(Vec<DeviceId>),
    NotFound(String),
    Ambiguous(String),
}

/// A serial must name exactly one identity; a user at most [`MAX_USER_DEVICES`].
pub fn resolve(lookup: Lookup<'_>, ids: Vec<DeviceId>) -> Resolved {
    match lookup {
        Lookup::Serial(serial) => match ids.len() {
            0 => Resolved::NotFound(format!("no Autopilot device has serial number {serial:?}")),
            1 => Resolved::Devices(ids),
            n => Resolved::Ambiguous(format!(
                "{n} Autopilot devices have serial number {serial:?}: {}; send device_id instead",
                candidates(&ids)
            )),
        },
        Lookup::User(_) if ids.len() > MAX_USER_DEVICES => Resolved::Ambiguous(format!(
            "the user has more than {MAX_USER_DEVICES} Autopilot devices assigned, more than one \
             request unassigns; nothing was unassigned: send device_id requests instead"
        )),
        Lookup::User(_) => Resolved::Devices(ids),
    }
}

fn candidates(ids: &[DeviceId]) -> String {
    let shown: Vec<&str> = ids
        .iter()
        .take(MAX_CANDIDATES_SHOWN)
        .map(DeviceId::as_str)
        .collect();
    match ids.len().saturating_sub(MAX_CANDIDATES_SHOWN) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
    const B: &str = "8b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";

    fn base() -> Url {
        Url::parse("https://graph.microsoft.com/beta").unwrap()
    }

    fn query_of(url: &Url) -> String {
        url.query_pairs()
            .find(|(k, _)| k == "$filter")
            .unwrap()
            .1
            .into_owned()
    }

    #[test]
    fn quotes_are_doubled_and_the_value_is_percent_encoded() {
        assert_eq!(odata_literal("O'Brien"), "'O''Brien'");
        let f = filter(Lookup::Serial("AB'C) or true or contains(serialNumber,'"));
        assert_eq!(
            f,
            "contains(serialNumber,'AB''C) or true or contains(serialNumber,''')"
        );
        let url = list_url(&base(), Some(&f));
        let raw = url.query().unwrap();
        for c in ['\'', ' ', '(', ')', ',', '&', '#'] {
            assert!(!raw.contains(c), "{c:?} unencoded in {raw}");
        }
        assert_eq!(query_of(&url), f, "decodes back to exactly the filter");
        assert!(
            url.as_str().starts_with(
                "https://graph.microsoft.com/beta/deviceManagement/windowsAutopilotDeviceIdentities?%24filter="
            ),
            "{url}"
        );
        let url = list_url(&base(), Some(&filter(Lookup::Serial("A&$top=1#x"))));
        assert_eq!(url.query_pairs().count(), 1, "no second parameter: {url}");
    }

    #[test]
    fn serials_are_searched_by_their_longest_hyphen_free_run() {
        assert_eq!(
            filter(Lookup::Serial("PF-3ABCDE-12")),
            "contains(serialNumber,'3ABCDE')"
        );
        assert_eq!(
            filter(Lookup::Serial("SN42")),
            "contains(serialNumber,'SN42')"
        );
        assert_eq!(filter(Lookup::Serial("---")), "contains(serialNumber,'')");
        assert_eq!(
            filter(Lookup::User("ann.o'neil@contoso.com")),
            "userPrincipalName eq 'ann.o''neil@contoso.com'"
        );
    }

    #[test]
    fn next_links_only_under_the_base_url() {
        let ok = "https://graph.microsoft.com/beta/deviceManagement/windowsAutopilotDeviceIdentities?$skiptoken=x";
        assert!(next_link(&base(), ok).is_ok());
        for bad in [
            "https://evil.example/beta/deviceManagement/windowsAutopilotDeviceIdentities?$skiptoken=x",
            "http://graph.microsoft.com/beta/deviceManagement/windowsAutopilotDeviceIdentities",
            "https://graph.microsoft.com:8443/beta/deviceManagement/windowsAutopilotDeviceIdentities",
            "https://graph.microsoft.com.evil.example/beta/x",
            "https://graph.microsoft.com/v1.0/users",
            "https://graph.microsoft.com/betax/users",
            "https://user@graph.microsoft.com/beta/x",
            "/beta/deviceManagement/windowsAutopilotDeviceIdentities",
            "not a url",
        ] {
            assert!(next_link(&base(), bad).is_err(), "{bad}");
        }
    }

    fn page(items: serde_json::Value) -> Page {
        parse_page(serde_json::json!({ "value": items }).to_string().as_bytes()).unwrap()
    }

    #[test]
    fn matching_is_exact_and_case_insensitive() {
        let p = page(serde_json::json!([
            {"id": A, "serialNumber": "ab-12", "userPrincipalName": "Ann@Contoso.com"},
            {"id": B, "serialNumber": "AB-123", "userPrincipalName": "bob@contoso.com"},
        ]));
        let found = |lookup| {
            let mut m = Matches::default();
            m.add(&p, lookup);
            m.add(&p, lookup); // a page seen twice does not double
            m.into_ids()
        };
        assert_eq!(
            found(Lookup::Serial("AB-12")),
            [DeviceId::parse(A).unwrap()]
        );
        assert_eq!(found(Lookup::Serial("B-12")), []);
        assert_eq!(
            found(Lookup::User("ann@contoso.COM")),
            [DeviceId::parse(A).unwrap()]
        );
        assert_eq!(found(Lookup::User("ann")), []);
    }

    #[test]
    fn a_non_guid_id_spoils_the_page() {
        let body = serde_json::json!({"value": [{"id": "../../me", "serialNumber": "X"}]});
        assert!(parse_page(body.to_string().as_bytes()).is_err());
        assert!(parse_page(b"<html>").is_err());
        let p = parse_page(br#"{"value":[],"@odata.nextLink":"n"}"#).unwrap();
        assert_eq!(p.next_link.as_deref(), Some("n"));
    }

    #[test]
    fn resolution() {
        let ids = |n: usize| -> Vec<DeviceId> {
            (0..n)
                .map(|i| DeviceId::parse(&format!("7b7c4c1e-6f5a-4c39-9a43-{i:012}")).unwrap())
                .collect()
        };
        assert!(matches!(
            resolve(Lookup::Serial("X"), ids(0)),
            Resolved::NotFound(_)
        ));
        assert_eq!(
            resolve(Lookup::Serial("X"), ids(1)),
            Resolved::Devices(ids(1))
        );
        let Resolved::Ambiguous(m) = resolve(Lookup::Serial("X"), ids(2)) else {
            panic!()
        };
        assert!(
            m.contains(ids(2)[0].as_str()) && m.contains(ids(2)[1].as_str()),
            "{m}"
        );
        let Resolved::Ambiguous(m) = resolve(Lookup::Serial("X"), ids(25)) else {
            panic!()
        };
        assert!(m.contains("and 5 more"), "{m}");
        assert_eq!(
            resolve(Lookup::User("u@x"), ids(0)),
            Resolved::Devices(vec![])
        );
        assert_eq!(
            resolve(Lookup::User("u@x"), ids(MAX_USER_DEVICES)),
            Resolved::Devices(ids(MAX_USER_DEVICES))
        );
        assert!(matches!(
            resolve(Lookup::User("u@x"), ids(MAX_USER_DEVICES + 1)),
            Resolved::Ambiguous(_)
        ));
    }
}
