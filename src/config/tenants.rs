//! `[auth]` and `[tenants.<name>]`: the tenants the worker serves. `auth` is simply the tenant
//! profile `default` (for requests without a `tenant_id`); a `[tenants.<name>]` table has the
//! same keys and is resolved the same way, its unset keys falling back to `auth`'s and
//! `[graph]`'s. Resolving happens apart from loading ([`Settings::tenant_profiles`]), so that
//! `check` still checks the broker when a tenant's settings are wrong.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use secrecy::SecretString;
use serde::Deserialize;

use super::{
    ConfigError, Settings,
    credentials::{Credentials, Keys},
    units::{Rate, SecureUrl},
};
use crate::{
    contract::TenantId,
    throttle::{Budget, GateConfig},
};

/// One tenant profile as configured. Inline secrets of a `[tenants.<name>]` table only from the
/// environment (`UNASSIGN__TENANTS__<NAME>__CLIENT_SECRET`), never from a file: a config file is
/// not a secret store.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Requests with this `tenant_id` use this profile; required, checked when resolved.
    #[serde(default)]
    pub tenant_id: String,
    #[serde(default)]
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_certificate_path: Option<PathBuf>,
    #[serde(default)]
    pub client_certificate_password: Option<SecretString>,
    #[serde(default)]
    pub client_certificate_password_file: Option<PathBuf>,
    #[serde(default)]
    pub federated_token_file: Option<PathBuf>,
    /// A tenant's defaults to `auth.authority_host`.
    #[serde(default)]
    pub authority_host: Option<SecureUrl>,
    /// A tenant's defaults to `auth.scope`, that one to Graph's origin + `/.default`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Defaults to `graph.max_requests_per_second`.
    #[serde(default)]
    pub max_requests_per_second: Option<Rate>,
    /// Defaults to `graph.max_reads_per_second`.
    #[serde(default)]
    pub max_reads_per_second: Option<Rate>,
    /// Defaults to `graph.adaptive_throttling`.
    #[serde(default)]
    pub adaptive_throttling: Option<bool>,
}

/// A tenant profile's name: `default` (the `auth` section) or a `[tenants.<name>]` key. The only
/// values the `tenant` metric label takes, with [`TenantName::unknown`] — never a tenant id from
/// a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct TenantName(Arc<str>);

/// Why a `[tenants.<name>]` key is no profile name.
#[derive(Debug, thiserror::Error)]
pub enum BadTenantName {
    #[error("`tenants.{0}` must be named with 1-32 of a-z 0-9 _ - (no `__`)")]
    Spelling(String),
    #[error("`tenants.{0}` is a reserved name")]
    Reserved(String),
}

impl TenantName {
    /// The profile of the `auth` section: requests without a `tenant_id`.
    pub fn default_profile() -> Self {
        Self("default".into())
    }

    /// Requests that selected no profile (unparseable, or naming an unknown tenant).
    pub fn unknown() -> Self {
        Self("unknown".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lower case, so that `UNASSIGN__TENANTS__<NAME>__…` (which figment lower-cases) reaches the
/// same profile; no `__`, which would split the variable name.
impl TryFrom<String> for TenantName {
    type Error = BadTenantName;

    fn try_from(name: String) -> Result<Self, BadTenantName> {
        let valid = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
            && !name.contains("__");
        if !valid {
            return Err(BadTenantName::Spelling(name));
        }
        if ["default", "unknown"].contains(&name.as_str()) {
            return Err(BadTenantName::Reserved(name));
        }
        Ok(Self(name.into()))
    }
}

/// So that a profile is found by its name as written (`tenants.get("contoso")`).
impl std::borrow::Borrow<str> for TenantName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant profile, resolved: who it is, how it authenticates, how fast it may be called.
#[derive(Debug, Clone)]
pub struct TenantProfile {
    pub name: TenantName,
    pub credentials: Credentials,
    /// For writes (the unassign action)…
    pub gate: GateConfig,
    /// …and for reads (lookups).
    pub read_gate: GateConfig,
}

impl Settings {
    /// Every tenant the worker serves, `default` (the `auth` section) first, each resolved and
    /// its credential read once now, so a mistake in any of them exits 2 at start.
    pub fn tenant_profiles(&self) -> Result<Vec<TenantProfile>, ConfigError> {
        let named = std::iter::once((TenantName::default_profile(), &self.auth))
            .chain(self.tenants.iter().map(|(n, t)| (n.clone(), t)));
        let mut profiles: Vec<TenantProfile> = Vec::new();
        for (name, tenant) in named {
            let profile = tenant.profile(name, self)?;
            let id = &profile.credentials.tenant_id;
            if let Some(other) = profiles.iter().find(|p| p.credentials.tenant_id == *id) {
                return Err(ConfigError::key(
                    Keys::of(&profile.name).key("tenant_id"),
                    format!("is already the tenant of profile `{}`", other.name),
                ));
            }
            profiles.push(profile);
        }
        Ok(profiles)
    }
}

impl TenantSettings {
    fn profile(&self, name: TenantName, settings: &Settings) -> Result<TenantProfile, ConfigError> {
        let keys = Keys::of(&name);
        let required = |field: &str, value: &str| match value {
            "" => Err(ConfigError::key(keys.key(field), "is required")),
            _ => Ok(()),
        };
        required("tenant_id", &self.tenant_id)?;
        let tenant_id = TenantId::parse(&self.tenant_id)
            .map_err(|e| ConfigError::key(keys.key("tenant_id"), e))?;
        required("client_id", &self.client_id)?;
        let auth = &settings.auth;
        let authority_host = self
            .authority_host
            .as_ref()
            .or(auth.authority_host.as_ref())
            .ok_or_else(|| ConfigError::key(keys.key("authority_host"), "is required"))?
            .url()
            .clone();
        let scope = self
            .scope
            .clone()
            .or_else(|| auth.scope.clone())
            .unwrap_or_else(|| settings.graph.default_scope());
        let (key, credential) = keys.credential(self)?;
        let credentials = Credentials {
            authority_host,
            tenant_id,
            client_id: self.client_id.clone(),
            credential,
            scope,
        }
        .checked(&key)?;
        let gate = |budget, own: Option<Rate>| {
            let mut gate = settings.graph.gate_config(budget);
            if let Some(rate) = own {
                gate.max_per_second = rate.get();
            }
            gate.adaptive = self.adaptive_throttling.unwrap_or(gate.adaptive);
            gate
        };
        Ok(TenantProfile {
            name,
            credentials,
            gate: gate(Budget::Writes, self.max_requests_per_second),
            read_gate: gate(Budget::Reads, self.max_reads_per_second),
        })
    }
}

/// The tenants' inline secrets a config file must not hold, by key.
pub(super) fn inline_secrets(
    tenants: &BTreeMap<TenantName, TenantSettings>,
) -> impl Iterator<Item = (&TenantName, &'static str)> {
    tenants.iter().flat_map(|(name, t)| {
        [
            ("client_secret", t.client_secret.is_some()),
            (
                "client_certificate_password",
                t.client_certificate_password.is_some(),
            ),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(move |(field, _)| (name, field))
    })
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod tests {
    use figment::Jail;
    use secrecy::ExposeSecret;

    use super::*;
    use crate::config::testing::{err, jailed, load};

    const CONTOSO: &str = "0a1b2c3d-0000-4000-8000-00000000c0de";

    /// The default tenant from the standard variables, and a `contoso` profile from a file.
    fn two_tenants(jail: &mut Jail, contoso: &str) -> Result<(), figment::Error> {
        jail.set_env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47");
        jail.set_env("AZURE_CLIENT_ID", "app");
        jail.set_env("AZURE_CLIENT_SECRET", "default-secret");
        jail.create_file("contoso.secret", "contoso-secret\n")?;
        jail.create_file("c.toml", &format!("[tenants.contoso]\n{contoso}"))?;
        jail.set_env("UNASSIGN_CONFIG", "c.toml");
        Ok(())
    }

    fn profiles_err(s: &Settings) -> String {
        s.tenant_profiles()
            .expect_err("tenant profiles should be refused")
            .to_string()
    }

    #[test]
    fn tenant_profiles_have_their_own_credentials_and_limits() {
        jailed(|jail| {
            let contoso = format!(
                "tenant_id = \"{CONTOSO}\"\nclient_id = \"contoso-app\"\n\
                 client_secret_file = \"contoso.secret\"\nauthority_host = \"https://login.microsoftonline.us\"\n"
            );
            two_tenants(jail, &contoso)?;
            jail.set_env("UNASSIGN__TENANTS__CONTOSO__MAX_REQUESTS_PER_SECOND", "2");
            let s = load();
            let profiles = s.tenant_profiles().unwrap();
            let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["default", "contoso"]);
            let contoso = &profiles[1];
            assert_eq!(contoso.credentials.client_id, "contoso-app");
            assert_eq!(contoso.gate.max_per_second, 2.0, "the variable wins");
            assert_eq!(
                profiles[0].gate.max_per_second, 5.0,
                "default keeps graph's"
            );
            assert_eq!(
                contoso.credentials.token_url().as_str(),
                format!("https://login.microsoftonline.us/{CONTOSO}/oauth2/v2.0/token")
            );
            let fields = contoso.credentials.credential.fields("a", "u").unwrap();
            assert_eq!(fields[0].1.expose_secret(), "contoso-secret");
            for shown in [format!("{s:?}"), format!("{profiles:?}")] {
                assert!(!shown.contains("-secret\""), "secret in Debug: {shown}");
                assert!(
                    !shown.contains("default-secret"),
                    "secret in Debug: {shown}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn an_inline_tenant_secret_comes_from_the_environment_only() {
        jailed(|jail| {
            let contoso = format!(
                "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret = \"in-a-file\"\n"
            );
            two_tenants(jail, &contoso)?;
            let e = err(Settings::load(None));
            assert!(e.contains("tenants.contoso.client_secret"), "{e}");
            assert!(!e.contains("in-a-file"), "{e}");
            jail.create_file(
                "c.toml",
                &format!("[tenants.contoso]\ntenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\n"),
            )?;
            jail.set_env("UNASSIGN__TENANTS__CONTOSO__CLIENT_SECRET", "from-env");
            let profiles = load().tenant_profiles().unwrap();
            let fields = profiles[1].credentials.credential.fields("c", "u").unwrap();
            assert_eq!(fields[0].1.expose_secret(), "from-env");
            Ok(())
        });
    }

    #[test]
    fn tenant_profile_errors_name_the_key() {
        let cases = [
            (
                "tenant_id = \"contoso\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"",
                "tenants.contoso.tenant_id",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"\"\nclient_secret_file = \"contoso.secret\""
                ),
                "tenants.contoso.client_id",
            ),
            (
                &format!("tenant_id = \"{CONTOSO}\"\nclient_id = \"c\""),
                "tenants.contoso.client_secret_file",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"missing\""
                ),
                "tenants.contoso.client_secret_file",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"\nfederated_token_file = \"contoso.secret\""
                ),
                "tenants.contoso.federated_token_file",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"\nclient_certificate_password_file = \"contoso.secret\""
                ),
                "tenants.contoso.client_certificate_path",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"\nmax_requests_per_second = -1"
                ),
                "tenants.contoso.max_requests_per_second",
            ),
            (
                &format!(
                    "tenant_id = \"{CONTOSO}\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"\nauthority_host = \"http://login.example.com\""
                ),
                "tenants.contoso.authority_host",
            ),
            (
                "tenant_id = \"72F988BF-86F1-41AF-91AB-2D7CD011DB47\"\nclient_id = \"c\"\nclient_secret_file = \"contoso.secret\"",
                "tenants.contoso.tenant_id",
            ),
        ];
        for (contoso, key) in cases {
            jailed(|jail| {
                two_tenants(jail, contoso)?;
                // A rate or a URL is refused as the file is read, the rest as the profile is
                // resolved; either names the key.
                let e = match Settings::load(None) {
                    Ok(s) => profiles_err(&s),
                    Err(e) => e.to_string(),
                };
                assert!(e.contains(key), "{key} not named in: {e}");
                Ok(())
            });
        }
        for name in ["Contoso", "default", "unknown", "a__b", ""] {
            assert!(
                TenantName::try_from(name.to_owned()).is_err(),
                "{name:?} accepted"
            );
        }
        assert!(TenantName::try_from("contoso-eu_2".to_owned()).is_ok());
        jailed(|jail| {
            two_tenants(jail, "")?;
            jail.create_file(
                "c.toml",
                "[tenants.Contoso]
",
            )?;
            let e = err(Settings::load(None));
            assert!(e.contains("tenants.contoso") && e.contains("a-z"), "{e}");
            Ok(())
        });
    }
}
