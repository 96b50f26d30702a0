//! Client assertions, checked as Entra ID checks them. An assertion whose `iss` is the client id
//! is a certificate credential: `x5t#S256` must name a certificate registered on the app, whose
//! key must have signed it, with `aud` = the token URL, `sub` = the client id and a current
//! lifetime. Any other issuer is a federated (workload identity) token: its issuer, subject and
//! audience must match the app's federated identity credential, and the simulated cluster's
//! OIDC issuer must have signed it.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::http::StatusCode;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::Behaviour;
use crate::aad::{AadError, aad};

/// The client assertion type of RFC 7523, the only one Entra takes.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The issuer of the simulated cluster's service-account tokens.
pub const FEDERATED_ISSUER: &str = "https://oidc.graph-sim.local/cluster";
/// The audience Azure workload identity requests for its tokens.
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Clock skew Entra ID tolerates on `nbf` and `exp`.
const CLOCK_SKEW_SECS: u64 = 300;

/// Which credential authenticated a token request, for [`crate::Stats`].
pub(super) type Kind = &'static str;

/// The simulated cluster's OIDC issuer: an ES256 key made at start that signs service-account
/// tokens, as the Kubernetes API server does for projected tokens.
pub(super) struct Issuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Issuer {
    pub fn generate() -> anyhow::Result<Issuer> {
        let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("graph-sim: cannot generate the issuer key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("graph-sim: issuer key rejected"))?;
        Ok(Issuer {
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            decoding: DecodingKey::from_ec_der(pair.public_key().as_ref()),
        })
    }

    /// A service-account token for `subject`, expiring `valid_for_secs` from now (negative:
    /// already expired).
    pub fn token(&self, subject: &str, valid_for_secs: i64) -> String {
        let now = now();
        let claims = json!({
            "iss": FEDERATED_ISSUER,
            "sub": subject,
            "aud": [FEDERATED_AUDIENCE],
            "iat": now,
            "nbf": now,
            "exp": now.saturating_add_signed(valid_for_secs),
        });
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .expect("an ES256 key signs")
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    aud: Value,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    exp: Option<u64>,
}

impl Claims {
    fn audiences(&self) -> Vec<&str> {
        match &self.aud {
            Value::String(a) => vec![a.as_str()],
            Value::Array(all) => all.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// Checks `client_assertion` for `client_id` presented at `token_url`.
pub(super) fn verify(
    issuer: &Issuer,
    b: &Behaviour,
    client_id: &str,
    token_url: &str,
    assertion_type: Option<&str>,
    assertion: &str,
) -> Result<Kind, AadError> {
    if assertion_type != Some(JWT_BEARER) {
        return Err(aad(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            50027,
            format!("Invalid JWT token. Unsupported client_assertion_type; use '{JWT_BEARER}'."),
        ));
    }
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| malformed())?;
    let claims: Claims = jsonwebtoken::dangerous::insecure_decode(assertion)
        .map_err(|_| malformed())?
        .claims;
    if claims.iss.eq_ignore_ascii_case(client_id) {
        certificate(b, client_id, token_url, &header, &claims, assertion).map(|()| "certificate")
    } else {
        federated(issuer, b, &claims, assertion).map(|()| "federated")
    }
}

fn certificate(
    b: &Behaviour,
    client_id: &str,
    token_url: &str,
    header: &Header,
    claims: &Claims,
    assertion: &str,
) -> Result<(), AadError> {
    let x5t = header.x5t_s256.as_deref().ok_or_else(|| {
        aad(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            50027,
            "Invalid JWT token. No certificate thumbprint specified in token header.".into(),
        )
    })?;
    let key = registered_key(b, x5t)
        .ok_or_else(|| invalid_signature("The key was not found.", Some(x5t)))?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::PS256) {
        return Err(malformed());
    }
    let mut rules = rules(header.alg, token_url, client_id);
    rules.sub = Some(client_id.to_owned());
    jsonwebtoken::decode::<Value>(assertion, &key, &rules)
        .map(drop)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => invalid_signature(
                "The provided signature value did not match the expected signature value.",
                Some(x5t),
            ),
            ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => not_in_time(claims),
            ErrorKind::InvalidAudience => aad(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                50027,
                format!(
                    "Invalid JWT token. The audience {:?} is not the token endpoint '{token_url}'.",
                    claims.audiences()
                ),
            ),
            ErrorKind::InvalidIssuer | ErrorKind::InvalidSubject => aad(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter."
                    .into(),
            ),
            _ => malformed(),
        })
}

fn federated(
    issuer: &Issuer,
    b: &Behaviour,
    claims: &Claims,
    assertion: &str,
) -> Result<(), AadError> {
    let audiences = claims.audiences();
    let matches = claims.iss == FEDERATED_ISSUER
        && claims.sub == b.federated_subject
        && audiences.contains(&FEDERATED_AUDIENCE);
    if !matches {
        return Err(aad(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            70021,
            format!(
                "No matching federated identity record found for presented assertion. Assertion \
                 Issuer: '{}'. Assertion Subject: '{}'. Assertion Audience: '{}'.",
                claims.iss,
                claims.sub,
                audiences.join(",")
            ),
        ));
    }
    let rules = rules(Algorithm::ES256, FEDERATED_AUDIENCE, FEDERATED_ISSUER);
    jsonwebtoken::decode::<Value>(assertion, &issuer.decoding, &rules)
        .map(drop)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => not_in_time(claims),
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => invalid_signature(
                "The provided signature value did not match the expected signature value.",
                None,
            ),
            _ => malformed(),
        })
}

/// Signature, audience, issuer and lifetime (with Entra's skew); `exp` is required.
fn rules(alg: Algorithm, audience: &str, issuer: &str) -> Validation {
    let mut rules = Validation::new(alg);
    rules.leeway = CLOCK_SKEW_SECS;
    rules.validate_nbf = true;
    rules.set_audience(&[audience]);
    rules.set_issuer(&[issuer]);
    rules.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    rules
}

/// The RSA key of the registered certificate with this `x5t#S256`, if any.
fn registered_key(b: &Behaviour, x5t: &str) -> Option<DecodingKey> {
    b.client_certificates
        .iter()
        .filter_map(|text| pem::parse_many(text).ok())
        .flatten()
        .filter(|block| block.tag() == "CERTIFICATE")
        .find(|block| thumbprint(block.contents()) == x5t)
        .and_then(|block| rsa_key(block.contents()))
}

/// A certificate's `x5t#S256` (base64url of the SHA-256 of its DER), by which Entra finds the
/// registered certificate an assertion names. Computed here on its own, not borrowed from the
/// worker, so that the simulator checks the worker's thumbprint rather than repeating it.
pub(crate) fn thumbprint(certificate_der: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(certificate_der))
}

/// The certificate's public key when it is an RSA key (RS256 and PS256 are what Entra takes).
fn rsa_key(certificate_der: &[u8]) -> Option<DecodingKey> {
    use x509_cert::der::{Decode as _, oid::db::rfc5912::RSA_ENCRYPTION};
    let certificate = x509_cert::Certificate::from_der(certificate_der).ok()?;
    let spki = certificate.tbs_certificate.subject_public_key_info;
    let key = spki.subject_public_key.as_bytes()?;
    (spki.algorithm.oid == RSA_ENCRYPTION).then(|| DecodingKey::from_rsa_der(key))
}

fn malformed() -> AadError {
    aad(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        50027,
        "JWT token is invalid or malformed.".into(),
    )
}

fn invalid_signature(reason: &str, x5t: Option<&str>) -> AadError {
    let key = x5t.map_or_else(String::new, |t| {
        format!(", Thumbprint of key used by client: '{t}'")
    });
    aad(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        700027,
        format!("Client assertion contains an invalid signature. [Reason - {reason}{key}]"),
    )
}

fn not_in_time(claims: &Claims) -> AadError {
    let at = |secs: Option<u64>| {
        let secs = i64::try_from(secs.unwrap_or(0)).unwrap_or(0);
        OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default()
    };
    aad(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        700024,
        format!(
            "Client assertion is not within its valid time range. Current time: {}, assertion \
             valid from {}, expiry time of assertion {}.",
            at(Some(now())),
            at(claims.nbf),
            at(claims.exp)
        ),
    )
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::SimOptions;

    const CLIENT: &str = "00000000-0000-0000-0000-00000000c11e";
    const URL: &str = "http://127.0.0.1:1/t/oauth2/v2.0/token";
    const SUBJECT: &str = "system:serviceaccount:unassign-worker:unassign-worker";

    /// An RSA key (PEM) and its self-signed certificate (PEM and thumbprint).
    struct Pki {
        key_pem: String,
        cert_pem: String,
        x5t: String,
    }

    fn pki() -> Pki {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        let (key_pem, cert_pem) = (key.serialize_pem(), cert.pem());
        let x5t = thumbprint(cert.der());
        Pki {
            key_pem,
            cert_pem,
            x5t,
        }
    }

    struct Fixture {
        issuer: Issuer,
        behaviour: Behaviour,
        pki: Pki,
    }

    impl Fixture {
        /// A simulator whose app registration holds one certificate.
        fn new() -> Fixture {
            let pki = pki();
            let mut behaviour = Behaviour::from(&SimOptions::parse_from(["graph-sim"]));
            behaviour.client_certificates.push(pki.cert_pem.clone());
            Fixture {
                issuer: Issuer::generate().unwrap(),
                behaviour,
                pki,
            }
        }

        fn check(&self, assertion: &str) -> Result<Kind, AadError> {
            verify(
                &self.issuer,
                &self.behaviour,
                CLIENT,
                URL,
                Some(JWT_BEARER),
                assertion,
            )
        }

        fn verify(&self, assertion: &str) -> Result<Kind, u32> {
            self.check(assertion).map_err(|e| e.code)
        }

        /// An assertion with these claims, signed by `key_pem`, naming the registered certificate.
        fn signed(&self, key_pem: &str, claims: Value) -> String {
            signed(key_pem, &self.pki.x5t, claims)
        }
    }

    /// An assertion as the worker makes it (PS256, `x5t#S256`), signed by `key_pem`.
    fn signed(key_pem: &str, x5t: &str, claims: Value) -> String {
        let header = Header {
            x5t_s256: Some(x5t.to_owned()),
            ..Header::new(Algorithm::PS256)
        };
        let key = EncodingKey::from_rsa_pem(key_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    fn claims(aud: &str, sub: &str, exp_from_now: i64) -> Value {
        let now = now();
        json!({"aud": aud, "iss": CLIENT, "sub": sub, "jti": "1", "nbf": now,
               "exp": now.saturating_add_signed(exp_from_now)})
    }

    #[test]
    fn refuses_certificate_assertions_as_entra_does() {
        let f = Fixture::new();
        let key = &f.pki.key_pem;
        assert_eq!(
            f.verify(&f.signed(key, claims(URL, CLIENT, 600))),
            Ok("certificate")
        );
        let impostor = pki();
        let forged = f.signed(&impostor.key_pem, claims(URL, CLIENT, 600));
        assert_eq!(f.verify(&forged), Err(700027), "wrong signature");
        let expired = f.signed(key, claims(URL, CLIENT, -3600));
        assert_eq!(f.verify(&expired), Err(700024), "expired");
        let elsewhere = f.signed(key, claims("https://elsewhere/token", CLIENT, 600));
        assert_eq!(f.verify(&elsewhere), Err(50027), "wrong audience");
        let other_sub = f.signed(key, claims(URL, "someone-else", 600));
        assert_eq!(f.verify(&other_sub), Err(700021), "sub is not the client");
        assert_eq!(f.verify("not.a.jwt"), Err(50027));

        let unregistered = signed(&impostor.key_pem, &impostor.x5t, claims(URL, CLIENT, 600));
        let e = f.check(&unregistered).unwrap_err();
        assert_eq!((e.code, e.status.as_u16()), (700027, 401));
        assert!(
            e.description.contains("The key was not found"),
            "{}",
            e.description
        );
        assert!(e.description.contains(&impostor.x5t));

        let e = verify(&f.issuer, &f.behaviour, CLIENT, URL, Some("jwt"), "a.b.c").unwrap_err();
        assert_eq!(e.code, 50027, "wrong client_assertion_type");
    }

    #[test]
    fn checks_federated_tokens_against_the_federated_credential() {
        let f = Fixture::new();
        assert_eq!(f.verify(&f.issuer.token(SUBJECT, 3600)), Ok("federated"));
        assert_eq!(f.verify(&f.issuer.token(SUBJECT, -3600)), Err(700024));
        assert_eq!(
            f.verify(&f.issuer.token(SUBJECT, -60)),
            Ok("federated"),
            "clock skew"
        );
        let e = f
            .check(&f.issuer.token("system:serviceaccount:x:y", 3600))
            .unwrap_err();
        assert_eq!((e.code, e.status.as_u16()), (70021, 400));
        assert!(
            e.description.contains("system:serviceaccount:x:y"),
            "{}",
            e.description
        );
        let other_cluster = Issuer::generate().unwrap();
        assert_eq!(f.verify(&other_cluster.token(SUBJECT, 3600)), Err(700027));
    }
}
