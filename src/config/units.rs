//! The value types of the settings, each holding its invariant: a value that breaks it fails
//! deserialization, and figment names the key it came from. Durations are deserialized from the
//! documented whole-number keys (`*_secs`, `*_ms`) with `#[serde(deserialize_with)]`.

use std::{num::NonZeroU64, time::Duration};

use serde::{Deserialize, Deserializer};
use url::Url;

/// `*_secs`: whole seconds, 0 allowed.
pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

/// `*_secs` where 0 would mean "never" or "at once" and neither makes sense: at least 1.
pub fn nonzero_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    NonZeroU64::deserialize(d).map(|s| Duration::from_secs(s.get()))
}

/// `*_ms`: whole milliseconds.
pub fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// Calls or posts per second: a finite number ≥ 0, where 0 means no cap.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Rate(f64);

#[derive(Debug, thiserror::Error)]
#[error("must be a finite number ≥ 0")]
pub struct NotARate;

impl Rate {
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Rate {
    type Error = NotARate;

    fn try_from(rate: f64) -> Result<Self, NotARate> {
        if rate >= 0.0 && rate.is_finite() {
            Ok(Self(rate))
        } else {
            Err(NotARate)
        }
    }
}

/// An `http(s)` URL that a client secret or bearer token may be sent to: `https://`, or plain
/// `http://` to a loopback host (the simulator, a local proxy), never in clear text across a
/// network.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Url")]
pub struct SecureUrl(Url);

#[derive(Debug, thiserror::Error)]
pub enum NotSecure {
    #[error("is not a URL: {0}")]
    NotAUrl(#[from] url::ParseError),
    #[error("must use https:// unless the host is loopback")]
    PlainHttp,
    #[error("has unsupported scheme {0}")]
    Scheme(String),
}

impl TryFrom<Url> for SecureUrl {
    type Error = NotSecure;

    fn try_from(url: Url) -> Result<Self, NotSecure> {
        match url.scheme() {
            "https" => Ok(Self(url)),
            "http" if is_loopback(&url) => Ok(Self(url)),
            "http" => Err(NotSecure::PlainHttp),
            other => Err(NotSecure::Scheme(other.to_owned())),
        }
    }
}

impl std::str::FromStr for SecureUrl {
    type Err = NotSecure;

    fn from_str(s: &str) -> Result<Self, NotSecure> {
        Url::parse(s)?.try_into()
    }
}

impl SecureUrl {
    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl std::ops::Deref for SecureUrl {
    type Target = Url;

    fn deref(&self) -> &Url {
        &self.0
    }
}

impl std::fmt::Display for SecureUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_finite_and_not_negative() {
        for ok in [0.0, 0.5, 100.0] {
            assert_eq!(Rate::try_from(ok).unwrap().get(), ok);
        }
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(Rate::try_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        let secure = |u: &str| u.parse::<SecureUrl>();
        for ok in [
            "https://login.example.com",
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
        ] {
            assert!(secure(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://login.example.com",
            "http://10.0.0.1",
            "ftp://127.0.0.1",
            "not a url",
        ] {
            assert!(secure(bad).is_err(), "{bad}");
        }
    }
}
