//! How a tenant profile authenticates: the one credential source its keys configure, chosen by
//! one selector for `auth` and every `[tenants.<name>]` alike, and presented once at start.

use url::Url;

use super::{ConfigError, TenantName, TenantSettings, load::standard_var};
use crate::{
    contract::TenantId,
    credential::{ClientSecret, Credential},
};

/// Everything needed to ask the identity platform for a Graph token.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub authority_host: Url,
    pub tenant_id: TenantId,
    pub client_id: String,
    pub credential: Credential,
    pub scope: String,
}

impl Credentials {
    /// `{authority}/{tenant}/oauth2/v2.0/token`, also the audience of client assertions.
    pub fn token_url(&self) -> Url {
        let mut url = self.authority_host.clone();
        url.path_segments_mut()
            .expect("authority_host is an http(s) URL")
            .pop_if_empty()
            .extend([self.tenant_id.as_str(), "oauth2", "v2.0", "token"]);
        url
    }

    /// Presents the credential once, so an unreadable file or unusable certificate exits 2.
    pub(super) fn checked(self, key: &str) -> Result<Self, ConfigError> {
        let token_url = self.token_url();
        match self.credential.fields(&self.client_id, token_url.as_str()) {
            Ok(_) => Ok(self),
            Err(e) => Err(ConfigError::key(key, e)),
        }
    }
}

/// How a profile's keys are named in errors: `auth.<field>` with the standard variable that sets
/// it (what an operator of the default profile actually sets), or `tenants.<name>.<field>`.
pub(super) struct Keys<'a>(Option<&'a TenantName>);

impl<'a> Keys<'a> {
    pub(super) fn of(name: &'a TenantName) -> Self {
        Self((*name != TenantName::default_profile()).then_some(name))
    }

    pub(super) fn key(&self, field: &str) -> String {
        match self.0 {
            Some(name) => format!("tenants.{name}.{field}"),
            None => {
                let key = format!("auth.{field}");
                match standard_var(&key) {
                    Some(var) => format!("{key} ({var})"),
                    None => key,
                }
            }
        }
    }

    /// The one credential configured, with the key that set it. Two would leave the choice to
    /// an order of precedence nobody remembers, so that is refused as firmly as none.
    pub(super) fn credential(
        &self,
        t: &TenantSettings,
    ) -> Result<(String, Credential), ConfigError> {
        let password = match (
            &t.client_certificate_password,
            &t.client_certificate_password_file,
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::both(
                    self.key("client_certificate_password"),
                    self.key("client_certificate_password_file"),
                    "configure at most one",
                ));
            }
            (Some(value), None) => Some(ClientSecret::Value(value.clone())),
            (None, Some(file)) => Some(ClientSecret::File(file.clone())),
            (None, None) => None,
        };
        if password.is_some() && t.client_certificate_path.is_none() {
            return Err(ConfigError::key(
                self.key("client_certificate_password"),
                format!("is set without {}", self.key("client_certificate_path")),
            ));
        }
        let secret = |s: &secrecy::SecretString| Credential::Secret(ClientSecret::Value(s.clone()));
        let candidates = [
            ("client_secret", t.client_secret.as_ref().map(secret)),
            (
                "client_secret_file",
                t.client_secret_file
                    .clone()
                    .map(|p| Credential::Secret(ClientSecret::File(p))),
            ),
            (
                "client_certificate_path",
                t.client_certificate_path
                    .clone()
                    .map(|path| Credential::Certificate { path, password }),
            ),
            (
                "federated_token_file",
                t.federated_token_file
                    .clone()
                    .map(Credential::FederatedToken),
            ),
        ];
        let mut set = candidates
            .into_iter()
            .filter_map(|(field, c)| Some((self.key(field), c?)));
        match (set.next(), set.next()) {
            (Some(one), None) => Ok(one),
            (None, _) => Err(ConfigError::key(
                self.key("client_secret"),
                format!(
                    "or another credential is required: set one of {}, {}, {}",
                    self.key("client_secret_file"),
                    self.key("client_certificate_path"),
                    self.key("federated_token_file")
                ),
            )),
            (Some((first, _)), Some((second, _))) => Err(ConfigError::both(
                first,
                second,
                "configure exactly one credential",
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod tests {
    use figment::Jail;
    use secrecy::ExposeSecret;

    use super::*;
    use crate::config::{
        Settings,
        testing::{jailed, load},
    };

    /// The `auth` section's profile, resolved.
    fn default_credentials(s: &Settings) -> Result<Credentials, ConfigError> {
        s.tenant_profiles().map(|mut p| p.remove(0).credentials)
    }

    fn err_c(s: &Settings) -> String {
        default_credentials(s)
            .expect_err("credentials should be refused")
            .to_string()
    }

    #[test]
    fn credentials_are_checked_and_never_printed() {
        jailed(|jail| {
            let s = load();
            assert!(err_c(&s).contains("AZURE_TENANT_ID"));
            jail.set_env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47");
            jail.set_env("AZURE_CLIENT_ID", "app");
            assert!(err_c(&load()).contains("AZURE_CLIENT_SECRET"));
            jail.set_env("AZURE_CLIENT_SECRET", "hunter2-very-secret");
            let s = load();
            let creds = default_credentials(&s).unwrap();
            assert_eq!(creds.scope, "https://graph.microsoft.com/.default");
            for shown in [format!("{s:?}"), format!("{creds:?}")] {
                assert!(
                    !shown.contains("hunter2"),
                    "secret leaked into Debug: {shown}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn secret_from_file_and_scope_from_base_url() {
        jailed(|jail| {
            jail.create_file("secret", "from-file\n")?;
            jail.set_env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47");
            jail.set_env("AZURE_CLIENT_ID", "app");
            jail.set_env("AZURE_CLIENT_SECRET_FILE", "secret");
            jail.set_env(
                "UNASSIGN__GRAPH__BASE_URL",
                "https://graph.microsoft.us/beta",
            );
            let creds = default_credentials(&load()).unwrap();
            assert_eq!(
                creds.credential.fields("app", "u").unwrap()[0]
                    .1
                    .expose_secret(),
                "from-file"
            );
            assert_eq!(creds.scope, "https://graph.microsoft.us/.default");
            Ok(())
        });
    }

    /// The variables the Azure workload identity webhook injects.
    fn workload_identity(jail: &mut Jail) -> Result<(), figment::Error> {
        jail.create_file("token", "header.claims.signature\n")?;
        jail.set_env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47");
        jail.set_env("AZURE_CLIENT_ID", "app");
        jail.set_env("AZURE_FEDERATED_TOKEN_FILE", "token");
        jail.set_env("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/");
        Ok(())
    }

    #[test]
    fn workload_identity_is_a_credential() {
        jailed(|jail| {
            workload_identity(jail)?;
            let creds = default_credentials(&load()).unwrap();
            assert!(matches!(creds.credential, Credential::FederatedToken(_)));
            assert_eq!(
                creds.token_url().as_str(),
                "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token"
            );
            jail.create_file("token", "")?;
            assert!(err_c(&load()).contains("AZURE_FEDERATED_TOKEN_FILE"));
            Ok(())
        });
    }

    #[test]
    fn exactly_one_credential_source() {
        jailed(|jail| {
            workload_identity(jail)?;
            jail.set_env("AZURE_CLIENT_SECRET_FILE", "token");
            let e = err_c(&load());
            assert!(
                e.contains("AZURE_CLIENT_SECRET_FILE") && e.contains("AZURE_FEDERATED_TOKEN_FILE"),
                "{e}"
            );
            Ok(())
        });
        jailed(|jail| {
            workload_identity(jail)?;
            jail.set_env("AZURE_CLIENT_SECRET", "s");
            jail.set_env("AZURE_CLIENT_SECRET_FILE", "token");
            assert!(err_c(&load()).contains("exactly one"));
            Ok(())
        });
        jailed(|jail| {
            workload_identity(jail)?;
            jail.set_env("AZURE_FEDERATED_TOKEN_FILE", "");
            jail.set_env("AZURE_CLIENT_CERTIFICATE_PASSWORD", "pw");
            let e = err_c(&load());
            assert!(e.contains("AZURE_CLIENT_CERTIFICATE_PASSWORD"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn a_certificate_is_checked_at_start() {
        jailed(|jail| {
            workload_identity(jail)?;
            jail.set_env("AZURE_FEDERATED_TOKEN_FILE", "");
            jail.create_file(
                "cert.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            )?;
            jail.set_env("AZURE_CLIENT_CERTIFICATE_PATH", "cert.pem");
            let e = err_c(&load());
            assert!(
                e.contains("AZURE_CLIENT_CERTIFICATE_PATH") && e.contains("PRIVATE KEY"),
                "{e}"
            );
            let pki = test_support::pki::TestCertificate::generate();
            jail.create_file("cert.pem", &pki.pem())?;
            let creds = default_credentials(&load()).unwrap();
            assert!(format!("{creds:?}").contains("cert.pem"));
            assert!(!format!("{creds:?}").contains("PRIVATE"));
            Ok(())
        });
    }

    #[test]
    fn keys_of_the_default_profile_name_their_variable() {
        let contoso = TenantName::try_from("contoso".to_owned()).unwrap();
        assert_eq!(
            Keys::of(&TenantName::default_profile()).key("client_secret_file"),
            "auth.client_secret_file (AZURE_CLIENT_SECRET_FILE)"
        );
        assert_eq!(
            Keys::of(&TenantName::default_profile()).key("scope"),
            "auth.scope"
        );
        assert_eq!(
            Keys::of(&contoso).key("client_secret_file"),
            "tenants.contoso.client_secret_file"
        );
    }
}
