//! Certificate credentials: a PS256-signed JWT client assertion whose header names the
//! certificate by `x5t#S256`, which Entra ID looks up among the app registration's keys.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, crypto};
use pkcs8::{EncryptedPrivateKeyInfo, ObjectIdentifier, PrivateKeyInfo, der::Decode};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::CredentialError;

/// How long an assertion is valid; MSAL uses ten minutes, and it is used within seconds.
const LIFETIME_SECS: u64 = 600;
/// PS256: RSASSA-PSS with SHA-256, what Entra ID recommends with `x5t#S256`.
const ALGORITHM: Algorithm = Algorithm::PS256;
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// A private key and the certificate it belongs to, ready to sign assertions. `Debug` shows
/// only the thumbprint.
pub struct ClientCertificate {
    key: EncodingKey,
    x5t_s256: String,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t#S256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

impl ClientCertificate {
    /// Reads an RSA private key (PKCS#8, encrypted PKCS#8 with `password`, or PKCS#1) and the
    /// certificate that matches it from one PEM; a chain may follow, in any order.
    pub fn from_pem(pem: &[u8], password: Option<&SecretString>) -> Result<Self, String> {
        let blocks = pem::parse_many(pem).map_err(|e| format!("is not PEM: {e}"))?;
        let key_block = blocks
            .iter()
            .find(|b| b.tag().ends_with("PRIVATE KEY"))
            .ok_or("holds no PRIVATE KEY block")?;
        let key = EncodingKey::from_rsa_der(&rsa_private_key(key_block, password)?);
        let certificates: Vec<&[u8]> = blocks
            .iter()
            .filter(|b| b.tag() == "CERTIFICATE")
            .map(pem::Pem::contents)
            .collect();
        if certificates.is_empty() {
            return Err("holds no CERTIFICATE block".to_owned());
        }
        let probe = crypto::sign(b"probe", &key, ALGORITHM)
            .map_err(|e| format!("private key cannot sign ({e})"))?;
        let certificate = certificates
            .into_iter()
            .find(|der| {
                rsa_public_key(der).is_ok_and(|public| {
                    let public = DecodingKey::from_rsa_der(&public);
                    crypto::verify(&probe, b"probe", &public, ALGORITHM).unwrap_or(false)
                })
            })
            .ok_or("holds no certificate for its private key")?;
        Ok(Self {
            key,
            x5t_s256: thumbprint_s256(certificate),
        })
    }

    /// A signed assertion for `client_id` at `token_url`, valid from now for ten minutes.
    pub fn assertion(
        &self,
        client_id: &str,
        token_url: &str,
    ) -> Result<SecretString, CredentialError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            aud: token_url,
            iss: client_id,
            sub: client_id,
            jti: uuid::Uuid::new_v4().to_string(),
            nbf: now,
            iat: now,
            exp: now + LIFETIME_SECS,
        };
        let header = Header {
            x5t_s256: Some(self.x5t_s256.clone()),
            ..Header::new(ALGORITHM)
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(SecretString::from)
            .map_err(|e| CredentialError(format!("cannot sign the client assertion: {e}")))
    }

    pub fn x5t_s256(&self) -> &str {
        &self.x5t_s256
    }
}

/// `x5t#S256`: base64url (unpadded) SHA-256 of the DER certificate (RFC 7515 section 4.1.8).
pub fn thumbprint_s256(certificate_der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(certificate_der))
}

/// The certificate's RSA public key (PKCS#1 `RSAPublicKey` DER), as signature checks take it.
pub fn rsa_public_key(certificate_der: &[u8]) -> Result<Vec<u8>, String> {
    let certificate = x509_cert::Certificate::from_der(certificate_der)
        .map_err(|e| format!("certificate is not valid DER X.509: {e}"))?;
    let spki = certificate.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err("certificate key is not RSA".to_owned());
    }
    spki.subject_public_key
        .as_bytes()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "certificate public key is malformed".to_owned())
}

/// The PKCS#1 `RSAPrivateKey` DER inside a key block; Entra ID takes RSA keys only.
fn rsa_private_key(block: &pem::Pem, password: Option<&SecretString>) -> Result<Vec<u8>, String> {
    match block.tag() {
        "RSA PRIVATE KEY" if block.headers().get("Proc-Type").is_some() => {
            Err("holds a legacy encrypted key: convert it with `openssl pkcs8 -topk8`".to_owned())
        }
        "RSA PRIVATE KEY" => Ok(block.contents().to_vec()),
        "PRIVATE KEY" => pkcs8_rsa(block.contents()),
        "ENCRYPTED PRIVATE KEY" => {
            let password = password
                .ok_or("holds an encrypted key but AZURE_CLIENT_CERTIFICATE_PASSWORD is not set")?;
            let info = EncryptedPrivateKeyInfo::from_der(block.contents())
                .map_err(|_| "encrypted private key is not valid PKCS#8")?;
            let decrypted = info
                .decrypt(password.expose_secret())
                .map_err(|_| "private key cannot be decrypted with the password given")?;
            pkcs8_rsa(decrypted.as_bytes())
        }
        other => Err(format!(
            "holds a {other}, but Entra ID takes RSA certificate keys only"
        )),
    }
}

fn pkcs8_rsa(der: &[u8]) -> Result<Vec<u8>, String> {
    let info = PrivateKeyInfo::from_der(der).map_err(|_| "private key is not valid PKCS#8")?;
    if info.algorithm.oid != RSA_ENCRYPTION {
        return Err("private key is not RSA; Entra ID takes RSA certificate keys only".to_owned());
    }
    Ok(info.private_key.to_vec())
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::Validation;
    use serde_json::Value;

    use super::*;
    use test_support::pki::TestCertificate;

    const URL: &str = "https://login.microsoftonline.com/t/oauth2/v2.0/token";

    fn err(pem: &str, password: Option<&str>) -> String {
        let password = password.map(SecretString::from);
        ClientCertificate::from_pem(pem.as_bytes(), password.as_ref()).unwrap_err()
    }

    #[test]
    fn the_assertion_is_signed_by_the_key_and_names_the_certificate() {
        let pki = TestCertificate::generate();
        let cert = ClientCertificate::from_pem(pki.pem().as_bytes(), None).unwrap();
        let assertion = cert.assertion("app-id", URL).unwrap();
        let header = jsonwebtoken::decode_header(assertion.expose_secret()).unwrap();
        assert_eq!(header.alg, Algorithm::PS256);
        assert_eq!(
            header.x5t_s256.as_deref(),
            Some(thumbprint_s256(&pki.cert_der).as_str())
        );
        let public = DecodingKey::from_rsa_der(&rsa_public_key(&pki.cert_der).unwrap());
        let mut rules = Validation::new(Algorithm::PS256);
        rules.set_audience(&[URL]);
        rules.set_issuer(&["app-id"]);
        rules.sub = Some("app-id".to_owned());
        let claims = jsonwebtoken::decode::<Value>(assertion.expose_secret(), &public, &rules)
            .unwrap()
            .claims;
        let (exp, nbf) = (
            claims["exp"].as_u64().unwrap(),
            claims["nbf"].as_u64().unwrap(),
        );
        assert_eq!(exp - nbf, LIFETIME_SECS);
        assert!(uuid::Uuid::parse_str(claims["jti"].as_str().unwrap()).is_ok());
        let again = cert.assertion("app-id", URL).unwrap();
        assert_ne!(
            again.expose_secret(),
            assertion.expose_secret(),
            "jti is unique"
        );
        assert!(!format!("{cert:?}").contains("PRIVATE"), "{cert:?}");
    }

    #[test]
    fn the_thumbprint_is_base64url_sha256_of_the_der() {
        // RFC 4648 test vector base: SHA-256("abc").
        assert_eq!(
            thumbprint_s256(b"abc"),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        );
    }

    #[test]
    fn order_and_chain_do_not_matter_but_the_key_must_match_a_certificate() {
        let pki = TestCertificate::generate();
        let other = TestCertificate::generate();
        let reordered = format!("{}{}{}", other.cert_pem, pki.cert_pem, pki.key_pem);
        let cert = ClientCertificate::from_pem(reordered.as_bytes(), None).unwrap();
        assert_eq!(cert.x5t_s256(), thumbprint_s256(&pki.cert_der));
        let mismatched = format!("{}{}", pki.key_pem, other.cert_pem);
        assert!(err(&mismatched, None).contains("no certificate for its private key"));
        assert!(err(&pki.key_pem, None).contains("no CERTIFICATE"));
        assert!(err(&pki.cert_pem, None).contains("no PRIVATE KEY"));
        assert!(err("not pem at all", None).contains("PRIVATE KEY"));
    }

    #[test]
    fn only_rsa_keys() {
        let ec = rcgen::KeyPair::generate().unwrap();
        let pki = TestCertificate::generate();
        let pem = format!("{}{}", ec.serialize_pem(), pki.cert_pem);
        assert!(err(&pem, None).contains("not RSA"), "{}", err(&pem, None));
    }

    #[test]
    fn an_encrypted_key_needs_its_password() {
        let pki = TestCertificate::generate();
        let pem = pki.encrypted_pem("s3cret-pw");
        let password = SecretString::from("s3cret-pw");
        let cert = ClientCertificate::from_pem(pem.as_bytes(), Some(&password)).unwrap();
        assert_eq!(cert.x5t_s256(), thumbprint_s256(&pki.cert_der));
        assert!(err(&pem, None).contains("AZURE_CLIENT_CERTIFICATE_PASSWORD"));
        let wrong = err(&pem, Some("wrong"));
        assert!(
            wrong.contains("cannot be decrypted") && !wrong.contains("wrong"),
            "{wrong}"
        );
    }
}
