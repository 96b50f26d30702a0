//! How the worker proves who it is to Entra ID: a client secret, a certificate (a signed JWT
//! client assertion) or a Kubernetes workload-identity token. Every file is read again for every
//! token request, so a rotated Secret, certificate or projected token needs no restart.

mod certificate;

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

pub use certificate::{ClientCertificate, rsa_public_key, thumbprint_s256};

/// `client_assertion_type` for both certificate and federated assertions (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// One credential source; a tenant profile holds exactly one. `Debug` never shows a secret.
#[derive(Debug, Clone)]
pub enum Credential {
    Secret(ClientSecret),
    /// PEM with the RSA private key and its certificate (`AZURE_CLIENT_CERTIFICATE_PATH`),
    /// the key optionally encrypted (`AZURE_CLIENT_CERTIFICATE_PASSWORD`, or a tenant profile's
    /// password file, read again with the certificate).
    Certificate {
        path: PathBuf,
        password: Option<ClientSecret>,
    },
    /// The projected service-account token (`AZURE_FEDERATED_TOKEN_FILE`); kubelet rotates it.
    FederatedToken(PathBuf),
}

/// The client secret, or the file that holds it (a mounted Kubernetes Secret).
#[derive(Debug, Clone)]
pub enum ClientSecret {
    Value(SecretString),
    File(PathBuf),
}

/// Why no credential could be presented; names the file, never its contents.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CredentialError(pub String);

/// The form fields that authenticate a token request (values are secret).
pub type AuthFields = Vec<(&'static str, SecretString)>;

impl Credential {
    /// Reads the source now and returns the fields for one token request to `token_url`.
    pub fn fields(&self, client_id: &str, token_url: &str) -> Result<AuthFields, CredentialError> {
        Ok(match self {
            Self::Secret(secret) => vec![("client_secret", secret.current()?)],
            Self::Certificate { path, password } => {
                let pem = read(path)?;
                let password = password.as_ref().map(ClientSecret::current).transpose()?;
                let certificate = ClientCertificate::from_pem(&pem, password.as_ref())
                    .map_err(|e| CredentialError(format!("{}: {e}", path.display())))?;
                assertion_fields(certificate.assertion(client_id, token_url)?)
            }
            Self::FederatedToken(path) => assertion_fields(read_trimmed(path)?),
        })
    }

    /// What kind of credential this is, for `check` and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Secret(ClientSecret::Value(_)) => "client secret".to_owned(),
            Self::Secret(ClientSecret::File(p)) => format!("client secret from {}", p.display()),
            Self::Certificate { path, .. } => format!("certificate {}", path.display()),
            Self::FederatedToken(p) => format!("workload identity token {}", p.display()),
        }
    }
}

impl ClientSecret {
    pub fn current(&self) -> Result<SecretString, CredentialError> {
        match self {
            Self::Value(secret) if secret.expose_secret().is_empty() => {
                Err(CredentialError("is empty".to_owned()))
            }
            Self::Value(secret) => Ok(secret.clone()),
            Self::File(path) => read_trimmed(path),
        }
    }
}

fn assertion_fields(assertion: SecretString) -> AuthFields {
    vec![
        ("client_assertion_type", SecretString::from(JWT_BEARER)),
        ("client_assertion", assertion),
    ]
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, CredentialError> {
    std::fs::read(path).map_err(|e| CredentialError(format!("cannot read {}: {e}", path.display())))
}

/// A file holding one secret value; trailing newlines are not part of it, an empty file is wrong.
fn read_trimmed(path: &std::path::Path) -> Result<SecretString, CredentialError> {
    let bytes = read(path)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| CredentialError(format!("{} is not UTF-8 text", path.display())))?;
    let value = text.trim_end();
    if value.is_empty() {
        return Err(CredentialError(format!("{} is empty", path.display())));
    }
    Ok(SecretString::from(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("cred-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_federated_token_is_sent_as_a_jwt_bearer_assertion_read_each_time() {
        let path = temp("first.token.value\n");
        let credential = Credential::FederatedToken(path.clone());
        let fields = |c: &Credential| -> Vec<(&str, String)> {
            c.fields("app", "https://login/t/oauth2/v2.0/token")
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.expose_secret().to_owned()))
                .collect()
        };
        assert_eq!(
            fields(&credential),
            [
                ("client_assertion_type", JWT_BEARER.to_owned()),
                ("client_assertion", "first.token.value".to_owned())
            ]
        );
        std::fs::write(&path, "second.token.value").unwrap();
        assert_eq!(fields(&credential)[1].1, "second.token.value");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn empty_or_missing_files_name_the_file_not_the_contents() {
        let path = temp("\n");
        let err = Credential::FederatedToken(path.clone())
            .fields("app", "u")
            .unwrap_err();
        assert!(err.0.contains("is empty"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = Credential::Secret(ClientSecret::File(path.clone()))
            .fields("app", "u")
            .unwrap_err();
        assert!(err.0.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn debug_shows_no_secret() {
        let credentials = [
            Credential::Secret(ClientSecret::Value("hunter2".into())),
            Credential::Certificate {
                path: "/c.pem".into(),
                password: Some(ClientSecret::Value("hunter2".into())),
            },
        ];
        for c in credentials {
            assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
        }
    }
}
