//! The GUIDs of the contract: a device's Autopilot identity id (section 4) and a tenant id
//! (a request's `tenant_id`, a tenant profile's). Parsed once, so that whatever reaches a Graph
//! URL or a token URL is a GUID and cannot inject a path or query.

use std::fmt;

use serde::Deserialize;

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

/// A tenant id (a GUID). Entra ID compares tenant ids without regard to case, and so does
/// `==`; the id keeps the spelling it was configured with, for the token URL and `check`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct TenantId(String);

/// Why a string is not a [`TenantId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be a GUID (8-4-4-4-12 hex digits)")]
pub struct NotAGuid;

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, NotAGuid> {
        is_guid(s).then(|| Self(s.to_owned())).ok_or(NotAGuid)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a request's `tenant_id` (already a GUID, any case) names this tenant.
    pub fn is(&self, id: &str) -> bool {
        self.0.eq_ignore_ascii_case(id)
    }
}

impl TryFrom<String> for TenantId {
    type Error = NotAGuid;

    fn try_from(s: String) -> Result<Self, NotAGuid> {
        Self::parse(&s)
    }
}

impl PartialEq for TenantId {
    fn eq(&self, other: &Self) -> bool {
        self.is(&other.0)
    }
}

impl Eq for TenantId {}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const GUID: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";

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
            assert!(TenantId::parse(bad).is_err());
        }
    }

    #[test]
    fn tenant_ids_compare_without_case_and_keep_their_spelling() {
        let upper = TenantId::parse(&GUID.to_uppercase()).unwrap();
        assert_eq!(upper, TenantId::parse(GUID).unwrap());
        assert!(upper.is(GUID));
        assert_eq!(upper.to_string(), GUID.to_uppercase());
        let parsed: Result<TenantId, _> = serde_json::from_str("\"contoso\"");
        assert!(parsed.unwrap_err().to_string().contains("GUID"));
    }
}
