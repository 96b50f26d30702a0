//! Who may post (CONTRACT section 9): a bearer token from `intake.bearer_token_file`, or an
//! HMAC-SHA256 signature over the raw body with a secret from `intake.hmac_secret_file`. Every
//! comparison is constant-time; files are read again when they change, so secrets rotate
//! without a restart; no secret is ever logged, printed or put in a `Debug` output.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aws_lc_rs::{constant_time::verify_slices_are_equal, digest, hmac};

use super::window::WindowMap;
use crate::config::{ConfigError, IntakeSettings};

/// A signature's `t` may be this far from our clock, either way.
pub const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);
/// Shorter lines are refused: a guessable token is no token.
const MIN_SECRET: usize = 16;
/// Accepted signatures remembered against replay; beyond this many within the tolerance
/// window, the oldest are forgotten (documented in docs/intake.md).
const REPLAY_CAPACITY: usize = 200_000;

/// Why a post was not authenticated; the label of `unassign_intake_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Neither header, or a mechanism that is not configured.
    Missing,
    /// A header we cannot read.
    Malformed,
    /// No configured token or secret matches.
    Mismatch,
    /// `t` is more than [`SIGNATURE_TOLERANCE`] away from now.
    Stale,
    /// This exact signature was already accepted.
    Replayed,
}

impl Rejected {
    pub const ALL: [Rejected; 5] = [
        Rejected::Missing,
        Rejected::Malformed,
        Rejected::Mismatch,
        Rejected::Stale,
        Rejected::Replayed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Missing => "missing",
            Rejected::Malformed => "malformed",
            Rejected::Mismatch => "mismatch",
            Rejected::Stale => "stale",
            Rejected::Replayed => "replayed",
        }
    }

    /// What the client is told: enough to fix a clock or a retry, nothing about our secrets.
    pub fn message(self) -> &'static str {
        match self {
            Rejected::Missing => {
                "send Authorization: Bearer <token> or X-Unassign-Signature: t=<unix>,v1=<hex>"
            }
            Rejected::Malformed => "the Authorization or X-Unassign-Signature header is malformed",
            Rejected::Mismatch => "the credentials were not accepted",
            Rejected::Stale => "the signature's t is more than 300 s away from the server's clock",
            Rejected::Replayed => "this signature was already used; sign each delivery afresh",
        }
    }
}

/// Who posted, for the rate limit: a fingerprint of the credential, never the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client([u8; 8]);

/// One line of a secrets file. No `Debug`: nothing here may be printed.
struct Secret {
    /// SHA-256 of the secret: a bearer token is compared digest to digest, so neither its
    /// content nor its length leaks through timing.
    digest: [u8; 32],
    hmac: hmac::Key,
}

impl Secret {
    fn new(text: &str) -> Self {
        Self {
            digest: sha256(text.as_bytes()),
            hmac: hmac::Key::new(hmac::HMAC_SHA256, text.as_bytes()),
        }
    }

    fn client(&self) -> Client {
        let mut id = [0; 8];
        id.copy_from_slice(&self.digest[..8]);
        Client(id)
    }
}

pub(super) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// A secrets file, read again whenever its modification time or length changes (Kubernetes
/// swaps a mounted Secret's symlink; an editor rewrites the file).
pub struct SecretFile {
    key: &'static str,
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    secrets: Arc<Vec<Secret>>,
}

impl SecretFile {
    /// Reads `path` now; unreadable, empty or weak exits 2 naming `key`.
    pub fn open(key: &'static str, path: &Path) -> Result<Self, ConfigError> {
        let stamp = stamp(path);
        let secrets = read(path).map_err(|why| ConfigError::key(key, why))?;
        Ok(Self {
            key,
            path: path.to_owned(),
            loaded: Mutex::new(Loaded {
                stamp,
                secrets: Arc::new(secrets),
            }),
        })
    }

    /// The current secrets. A file that changed is read again; if the new contents are
    /// unusable the previous secrets stay in force (and the operator is told once per change).
    fn current(&self) -> Arc<Vec<Secret>> {
        let now = stamp(&self.path);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_some() && now != loaded.stamp {
            loaded.stamp = now;
            match read(&self.path) {
                Ok(secrets) => {
                    tracing::info!(key = self.key, count = secrets.len(), "secrets reloaded");
                    loaded.secrets = Arc::new(secrets);
                }
                Err(why) => {
                    tracing::warn!(key = self.key, %why, "keeping the previous secrets")
                }
            }
        }
        loaded.secrets.clone()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// One secret a line; blank lines and `#` comments skipped. The error never quotes a line.
fn read(path: &Path) -> Result<Vec<Secret>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{} cannot be read: {e}", path.display()))?;
    let mut secrets = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.len() < MIN_SECRET {
            return Err(format!(
                "line {} of {} is shorter than {MIN_SECRET} characters; make one with \
                 `openssl rand -hex 32`",
                n + 1,
                path.display()
            ));
        }
        secrets.push(Secret::new(line));
    }
    if secrets.is_empty() {
        return Err(format!("{} holds no secret", path.display()));
    }
    Ok(secrets)
}

/// The parts of `X-Unassign-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…]`.
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    /// `t` as sent: the signed bytes are these digits, a dot and the body.
    pub t_text: &'a str,
    pub t: i64,
    pub v1: Vec<[u8; 32]>,
}

/// Parses the signature header. Other schemes than `v1` are ignored, so a sender may add a
/// future one; at most a handful of `v1` values are looked at, whatever the header holds.
pub fn parse_signature(header: &str) -> Option<SignatureHeader<'_>> {
    const MAX_V1: usize = 4;
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let (name, value) = part.trim().split_once('=')?;
        match name {
            "t" if t.is_none() => {
                if value.is_empty()
                    || value.len() > 12
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return None;
                }
                t = Some((value, value.parse().ok()?));
            }
            "t" => return None,
            "v1" if v1.len() < MAX_V1 => v1.push(hex32(value)?),
            _ => {}
        }
    }
    let (t_text, t) = t?;
    (!v1.is_empty()).then_some(SignatureHeader { t_text, t, v1 })
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// The bearer and HMAC checks, with the replay guard.
pub struct Authenticator {
    bearer: Option<SecretFile>,
    hmac: Option<SecretFile>,
    seen: Mutex<WindowMap<[u8; 32], ()>>,
}

impl Authenticator {
    pub fn from_settings(intake: &IntakeSettings) -> Result<Self, ConfigError> {
        let open = |key, path: &Option<PathBuf>| path.as_deref().map(|p| SecretFile::open(key, p));
        Ok(Self {
            bearer: open("intake.bearer_token_file", &intake.bearer_token_file).transpose()?,
            hmac: open("intake.hmac_secret_file", &intake.hmac_secret_file).transpose()?,
            // `t` may be up to the tolerance in the future as well as in the past.
            seen: Mutex::new(WindowMap::new(2 * SIGNATURE_TOLERANCE, REPLAY_CAPACITY)),
        })
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(&self, authorization: &[u8]) -> Result<Client, Rejected> {
        let file = self.bearer.as_ref().ok_or(Rejected::Missing)?;
        let token = authorization
            .strip_prefix(b"Bearer ")
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .ok_or(Rejected::Malformed)?;
        let presented = sha256(token);
        let secrets = file.current();
        // Every token is compared, so the time taken says nothing about which one matched.
        let mut matched = None;
        for secret in secrets.iter() {
            if verify_slices_are_equal(&secret.digest, &presented).is_ok() {
                matched = Some(secret.client());
            }
        }
        matched.ok_or(Rejected::Mismatch)
    }

    /// `X-Unassign-Signature` over `body`, at `now` (unix seconds). An accepted signature is
    /// remembered: the same one again is a replay. [`Authenticator::forget`] releases it when
    /// the post it came with was not accepted, so the sender's identical retry still works.
    pub fn signature(&self, header: &[u8], body: &[u8], now: i64) -> Result<Verified, Rejected> {
        let file = self.hmac.as_ref().ok_or(Rejected::Missing)?;
        let header = std::str::from_utf8(header).map_err(|_| Rejected::Malformed)?;
        let signature = parse_signature(header).ok_or(Rejected::Malformed)?;
        if now.abs_diff(signature.t) > SIGNATURE_TOLERANCE.as_secs() {
            return Err(Rejected::Stale);
        }
        let secrets = file.current();
        let (client, v1) = check_signature(&secrets, &signature, body).ok_or(Rejected::Mismatch)?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.insert(v1, (), Instant::now()) {
            return Err(Rejected::Replayed);
        }
        Ok(Verified { client, v1 })
    }

    /// Releases an accepted signature whose post was then refused (400, 503, …).
    pub fn forget(&self, verified: &Verified) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.remove(&verified.v1);
    }
}

/// An accepted signature: who sent it, and the signature itself for the replay guard.
#[derive(Debug, Clone, Copy)]
pub struct Verified {
    pub client: Client,
    v1: [u8; 32],
}

/// The client whose secret signed `<t>.<body>`, and the matching `v1`. Every secret and every
/// `v1` is tried, each comparison constant-time.
fn check_signature(
    secrets: &[Secret],
    signature: &SignatureHeader,
    body: &[u8],
) -> Option<(Client, [u8; 32])> {
    let mut matched = None;
    for secret in secrets {
        let mut ctx = hmac::Context::with_key(&secret.hmac);
        ctx.update(signature.t_text.as_bytes());
        ctx.update(b".");
        ctx.update(body);
        let tag = ctx.sign();
        for v1 in &signature.v1 {
            if verify_slices_are_equal(tag.as_ref(), v1).is_ok() {
                matched = Some((secret.client(), *v1));
            }
        }
    }
    matched
}

/// The signature header for `body` at `t` under `secret` (the docs' openssl recipe, in Rust:
/// the load generator and the tests sign with it).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let hex: String = ctx
        .sign()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

#[cfg(test)]
impl Client {
    pub fn test(n: u8) -> Self {
        Client([n; 8])
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SECRET: &str = "0123456789abcdef-rotating";
    const OLD: &str = "fedcba9876543210-retiring";

    fn file(contents: &str) -> (tempfile_path::Path, Authenticator) {
        let path = tempfile_path::Path::new(contents);
        let settings = IntakeSettings {
            hmac_secret_file: Some(path.0.clone()),
            bearer_token_file: Some(path.0.clone()),
            ..crate::config::Settings::load(None).unwrap().intake
        };
        let auth = Authenticator::from_settings(&settings).unwrap();
        (path, auth)
    }

    /// A file in the temp directory, removed on drop.
    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Path {
            pub fn new(contents: &str) -> Self {
                let p = std::env::temp_dir().join(format!("uw-auth-{}", uuid::Uuid::new_v4()));
                std::fs::write(&p, contents).unwrap();
                Self(p)
            }
        }
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn signatures_verify_with_any_secret_within_the_window_once() {
        let (_f, auth) = file(&format!("# comment\n{SECRET}\n\n{OLD}\n"));
        let body = br#"{"request_id":"a","device_id":"x"}"#;
        let now = 1_800_000_000;
        for secret in [SECRET, OLD] {
            let header = sign(secret, now - 299, body);
            assert!(auth.signature(header.as_bytes(), body, now).is_ok());
            assert_eq!(
                auth.signature(header.as_bytes(), body, now).unwrap_err(),
                Rejected::Replayed
            );
        }
        let stale = sign(SECRET, now - 301, body);
        assert_eq!(
            auth.signature(stale.as_bytes(), body, now).unwrap_err(),
            Rejected::Stale
        );
        let future = sign(SECRET, now + 301, body);
        assert_eq!(
            auth.signature(future.as_bytes(), body, now).unwrap_err(),
            Rejected::Stale
        );
        let other = sign("not-the-secret-at-all", now, body);
        assert_eq!(
            auth.signature(other.as_bytes(), body, now).unwrap_err(),
            Rejected::Mismatch
        );
        let tampered = sign(SECRET, now, body);
        assert_eq!(
            auth.signature(tampered.as_bytes(), b"{}", now).unwrap_err(),
            Rejected::Mismatch
        );
    }

    #[test]
    fn a_refused_post_releases_its_signature() {
        let (_f, auth) = file(SECRET);
        let header = sign(SECRET, 100, b"x");
        let verified = auth.signature(header.as_bytes(), b"x", 100).unwrap();
        auth.forget(&verified);
        assert!(auth.signature(header.as_bytes(), b"x", 100).is_ok());
    }

    #[test]
    fn bearer_tokens_compare_whole_and_reload_when_the_file_changes() {
        let (f, auth) = file(SECRET);
        let bearer = |t: &str| auth.bearer(format!("Bearer {t}").as_bytes());
        assert!(bearer(SECRET).is_ok());
        assert_eq!(bearer(&SECRET[..20]).unwrap_err(), Rejected::Mismatch);
        assert_eq!(
            bearer(&format!("{SECRET}x")).unwrap_err(),
            Rejected::Mismatch
        );
        assert_eq!(auth.bearer(b"Basic abc").unwrap_err(), Rejected::Malformed);
        assert_eq!(auth.bearer(b"Bearer ").unwrap_err(), Rejected::Malformed);
        std::fs::write(&f.0, format!("{OLD}\n{SECRET}-and-a-longer-one\n")).unwrap();
        assert!(bearer(OLD).is_ok(), "the new file is read");
        assert_eq!(bearer(SECRET).unwrap_err(), Rejected::Mismatch);
        std::fs::write(&f.0, "short\n").unwrap();
        assert!(
            bearer(OLD).is_ok(),
            "an unusable file keeps the previous tokens"
        );
    }

    #[test]
    fn unusable_files_exit_2_naming_the_key_and_never_quote_a_secret() {
        let weak = tempfile_path::Path::new("hunter2\n");
        let e = SecretFile::open("intake.hmac_secret_file", &weak.0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("`intake.hmac_secret_file`") && e.contains("line 1"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let empty = tempfile_path::Path::new("# nothing\n\n");
        let e = SecretFile::open("intake.bearer_token_file", &empty.0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("holds no secret"), "{e}");
    }

    #[test]
    fn signature_headers() {
        let v = "ab".repeat(32);
        let header = format!("t=12, v1={v},v0=zz");
        let parsed = parse_signature(&header).unwrap();
        assert_eq!((parsed.t_text, parsed.t, parsed.v1.len()), ("12", 12, 1));
        for bad in [
            String::new(),
            format!("v1={v}"),
            "t=12".to_owned(),
            format!("t=-1,v1={v}"),
            format!("t=1,t=2,v1={v}"),
            format!("t=1,v1={}", &v[..62]),
            format!("t=1,v1={}zz", &v[..62]),
            format!("t=1234567890123,v1={v}"),
            format!("t=1;v1={v}"),
        ] {
            assert!(parse_signature(&bad).is_none(), "{bad}");
        }
    }

    proptest! {
        /// Hostile headers never panic, and whatever parses carries 1–4 well-formed v1 values.
        #[test]
        fn any_header_parses_or_is_refused(header in ".{0,300}") {
            if let Some(s) = parse_signature(&header) {
                prop_assert!((1..=4).contains(&s.v1.len()));
                prop_assert!(s.t >= 0);
            }
        }

        /// A signature made with the secret verifies; one flipped bit anywhere does not.
        #[test]
        fn one_bit_breaks_a_signature(body in proptest::collection::vec(any::<u8>(), 0..200), bit in 0usize..256) {
            let (_f, auth) = file(SECRET);
            let good = sign(SECRET, 1000, &body);
            let parsed = parse_signature(&good).unwrap();
            let mut v1 = parsed.v1[0];
            v1[bit / 8] ^= 1 << (bit % 8);
            let hex: String = v1.iter().map(|b| format!("{b:02x}")).collect();
            let bad = format!("t=1000,v1={hex}");
            prop_assert_eq!(auth.signature(bad.as_bytes(), &body, 1000).unwrap_err(), Rejected::Mismatch);
            prop_assert!(auth.signature(good.as_bytes(), &body, 1000).is_ok());
        }
    }
}
