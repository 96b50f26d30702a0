//! `[amqp]`: the broker's nodes, the topology's names, and how deliveries are held and retried
//! (CONTRACT sections 2 and 3).

use std::{str::FromStr, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::units::secs;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// The broker nodes; they hold the password, hence secret: log [`AmqpSettings::redacted_url`].
    pub url: BrokerUrls,
    pub prefetch: u16,
    /// The AMQP heartbeat in whole seconds, as the protocol negotiates it.
    pub heartbeat_secs: u16,
    pub declare_topology: bool,
    #[serde(rename = "reconnect_max_delay_secs", deserialize_with = "secs")]
    pub reconnect_max_delay: Duration,
    /// How often the request and dead-letter queue depths are read for `/metrics`.
    #[serde(rename = "queue_poll_secs", deserialize_with = "secs")]
    pub queue_poll: Duration,
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub events_exchange: String,
    pub outcomes_queue: String,
    pub delivery_limit: u32,
    pub delay_tiers_secs: DelayTiers,
    /// `x-quorum-initial-group-size` of every queue; 0 leaves it to the broker.
    pub quorum_initial_group_size: u32,
}

/// The delay queues' TTLs in whole seconds: at least one, each ≥ 1, strictly increasing — so
/// "the longest tier that fits" and "the shortest of at least" are well defined.
#[derive(Clone, Deserialize)]
#[serde(try_from = "Vec<u64>")]
pub struct DelayTiers(Vec<u64>);

#[derive(Debug, thiserror::Error)]
#[error("must list increasing whole seconds ≥ 1")]
pub struct NotIncreasing;

impl TryFrom<Vec<u64>> for DelayTiers {
    type Error = NotIncreasing;

    fn try_from(tiers: Vec<u64>) -> Result<Self, NotIncreasing> {
        let increasing = tiers.windows(2).all(|w| w[0] < w[1]);
        match tiers.first() {
            Some(&first) if first >= 1 && increasing => Ok(Self(tiers)),
            _ => Err(NotIncreasing),
        }
    }
}

impl std::ops::Deref for DelayTiers {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        &self.0
    }
}

impl<'a> IntoIterator for &'a DelayTiers {
    type Item = &'a u64;
    type IntoIter = std::slice::Iter<'a, u64>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// As the list it is written as (`[4, 8]`), which `UNASSIGN__AMQP__DELAY_TIERS_SECS` reads back.
impl std::fmt::Debug for DelayTiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The broker's nodes in order of preference: `amqp.url` as one URI, a comma-separated list
/// (how `AMQP_URL` carries several) or an array. Each entry is an `amqp://` or `amqps://` URL
/// with a host.
#[derive(Clone, Deserialize)]
#[serde(try_from = "UrlList")]
pub struct BrokerUrls(Vec<SecretString>);

#[derive(Deserialize)]
#[serde(untagged)]
enum UrlList {
    One(String),
    Many(Vec<String>),
}

/// An entry of `amqp.url` that is no broker URL, named by position and never shown (it may
/// hold a password).
#[derive(Debug, thiserror::Error)]
pub enum BadBrokerUrl {
    #[error("lists no broker")]
    Empty,
    #[error("(entry {entry} of {of}) must start with amqp:// or amqps://")]
    Scheme { entry: usize, of: usize },
    #[error("(entry {entry} of {of}) has no host")]
    NoHost { entry: usize, of: usize },
    #[error("(entry {entry} of {of}) is not a URL: {why}")]
    NotAUrl {
        entry: usize,
        of: usize,
        why: url::ParseError,
    },
}

impl TryFrom<UrlList> for BrokerUrls {
    type Error = BadBrokerUrl;

    fn try_from(list: UrlList) -> Result<Self, BadBrokerUrl> {
        let entries = match list {
            UrlList::One(s) => vec![s],
            UrlList::Many(v) => v,
        };
        let urls: Vec<&str> = entries
            .iter()
            .flat_map(|e| e.split(','))
            .map(str::trim)
            .collect();
        let of = urls.len();
        for (i, url) in urls.iter().enumerate() {
            let entry = i + 1;
            match Url::parse(url) {
                Ok(u) if !matches!(u.scheme(), "amqp" | "amqps") => {
                    return Err(BadBrokerUrl::Scheme { entry, of });
                }
                Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {}
                Ok(_) => return Err(BadBrokerUrl::NoHost { entry, of }),
                Err(why) => return Err(BadBrokerUrl::NotAUrl { entry, of, why }),
            }
        }
        if urls.is_empty() {
            return Err(BadBrokerUrl::Empty);
        }
        Ok(Self(
            urls.into_iter()
                .map(|u| SecretString::from(u.to_owned()))
                .collect(),
        ))
    }
}

/// A URL or a comma-separated list of them, as `AMQP_URL` carries it.
impl FromStr for BrokerUrls {
    type Err = BadBrokerUrl;

    fn from_str(urls: &str) -> Result<Self, BadBrokerUrl> {
        UrlList::One(urls.to_owned()).try_into()
    }
}

impl std::fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|u| redact_url(u.expose_secret())))
            .finish()
    }
}

impl BrokerUrls {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Node `i`'s URL. Secret: never log it.
    pub fn get(&self, i: usize) -> &SecretString {
        &self.0[i]
    }

    /// What the default state key is derived from: the broker user, password and vhost of the
    /// first entry (lapin's defaults where the URL leaves them out), which every replica of a
    /// deployment shares and producers with broker users of their own do not know.
    pub fn state_key_material(&self) -> Vec<u8> {
        let Some(url) = self
            .0
            .first()
            .and_then(|u| Url::parse(u.expose_secret()).ok())
        else {
            return b"guest:guest@/".to_vec();
        };
        let user = match url.username() {
            "" => "guest",
            user => user,
        };
        let vhost = match url.path().trim_start_matches('/') {
            "" => "%2f",
            vhost => vhost,
        };
        let password = url.password().unwrap_or("guest");
        format!("{user}:{password}@{vhost}").into_bytes()
    }

    /// `host:port` of every node, in order: what logs and the `node` metric label show.
    pub fn labels(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|u| node_label(u.expose_secret()))
            .collect()
    }
}

/// `host:port` of a broker URL, the port defaulted by scheme.
fn node_label(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => {
            let port = u
                .port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
            format!("{}:{port}", u.host_str().unwrap_or_default())
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

impl AmqpSettings {
    /// Whether `name` is one of the queues the worker declares: the requests, the dead
    /// letters, the outcomes and each delay tier.
    pub fn is_own_queue(&self, name: &str) -> bool {
        [&self.queue, &self.dead_letter_queue, &self.outcomes_queue]
            .iter()
            .any(|q| q.as_str() == name)
            || self
                .delay_tiers_secs
                .iter()
                .any(|&secs| self.tier_queue(secs) == name)
    }

    /// The name of the delay queue of `secs`.
    pub fn tier_queue(&self, secs: u64) -> String {
        format!("{}.delay.{secs}s", self.queue)
    }

    /// Deliveries held at once: configured, or twice the Graph concurrency.
    pub fn effective_prefetch(&self, concurrency: usize) -> u16 {
        match self.prefetch {
            0 => u16::try_from(concurrency.saturating_mul(2)).unwrap_or(u16::MAX),
            n => n,
        }
    }

    /// Node `i`'s URL with the heartbeat set, for connecting. Secret: never log it.
    pub fn connect_url(&self, i: usize) -> String {
        let url = self.url.get(i).expose_secret();
        if url.contains("heartbeat=") {
            return url.to_owned();
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}heartbeat={}", self.heartbeat_secs)
    }

    /// The broker URLs without their passwords, comma-separated, for logs and `check`.
    pub fn redacted_url(&self) -> String {
        let urls: Vec<String> = (0..self.url.len())
            .map(|i| redact_url(self.url.get(i).expose_secret()))
            .collect();
        urls.join(",")
    }
}

/// `scheme://user:***@host…`: the password never leaves the process.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail dictates the closures' error type
mod tests {
    use super::*;
    use crate::config::{
        Settings,
        testing::{err, jailed, load},
    };

    #[test]
    fn amqp_url_is_redacted_and_gets_a_heartbeat() {
        jailed(|jail| {
            jail.set_env("AMQP_URL", "amqp://user:pa55word@broker:5672/%2f");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.amqp.redacted_url(), "amqp://user:***@broker:5672/%2f");
            assert!(s.amqp.connect_url(0).ends_with("?heartbeat=10"));
            assert!(!format!("{s:?}").contains("pa55word"));
            Ok(())
        });
    }

    #[test]
    fn amqp_url_lists_several_nodes() {
        jailed(|jail| {
            jail.set_env(
                "AMQP_URL",
                "amqp://u:pa55word@n1:5701/%2f, amqps://u:pa55word@n2/%2f,amqp://n3",
            );
            let s = Settings::load(None).unwrap();
            assert_eq!(s.amqp.url.labels(), ["n1:5701", "n2:5671", "n3:5672"]);
            assert_eq!(
                s.amqp.connect_url(1),
                "amqps://u:pa55word@n2/%2f?heartbeat=10"
            );
            let shown = format!("{s:?} {}", s.amqp.redacted_url());
            assert!(!shown.contains("pa55word"), "password leaked: {shown}");
            assert!(shown.contains("amqp://u:***@n1:5701/%2f,amqps://u:***@n2/%2f,amqp://n3"));
            Ok(())
        });
        jailed(|jail| {
            jail.create_file(
                "c.toml",
                "[amqp]\nurl = [\"amqp://a:5701\", \"amqp://b:5702,amqp://c\"]",
            )?;
            let s = Settings::load(Some("c.toml".into())).unwrap();
            assert_eq!(s.amqp.url.labels(), ["a:5701", "b:5702", "c:5672"]);
            Ok(())
        });
    }

    #[test]
    fn bad_amqp_urls_name_the_entry_and_hide_it() {
        for (bad, why) in [
            ("amqp://u:pa55word@n1,http://u:pa55word@n2", "entry 2 of 2"),
            ("amqp://u:pa55word@n1,", "entry 2 of 2"),
            ("amqp://u:pa55word@n1,not a url", "entry 2 of 2"),
            ("amqp://u:pa55word@n1,amqp://", "entry 2 of 2"),
            ("localhost:5672", "entry 1 of 1"),
        ] {
            jailed(|jail| {
                jail.set_env("AMQP_URL", bad);
                let e = err(Settings::load(None));
                assert!(e.contains("amqp.url") && e.contains(why), "{bad}: {e}");
                assert!(!e.contains("pa55word"), "{bad}: password in {e}");
                Ok(())
            });
        }
        jailed(|jail| {
            jail.create_file("c.toml", "[amqp]\nurl = 5")?;
            let e = err(Settings::load(Some("c.toml".into())));
            assert!(e.contains("amqp.url"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn delay_tiers_increase_from_one_second() {
        assert!(DelayTiers::try_from(vec![1, 2, 60]).is_ok());
        for bad in [vec![], vec![0, 4], vec![8, 4], vec![4, 4]] {
            assert!(DelayTiers::try_from(bad.clone()).is_err(), "{bad:?}");
        }
        jailed(|jail| {
            jail.set_env("UNASSIGN__AMQP__DELAY_TIERS_SECS", "[8, 4]");
            assert!(err(Settings::load(None)).contains("amqp.delay_tiers_secs"));
            jail.set_env("UNASSIGN__AMQP__DELAY_TIERS_SECS", "[2, 4]");
            let s = load();
            assert_eq!(format!("{:?}", s.amqp.delay_tiers_secs), "[2, 4]");
            assert!(s.amqp.is_own_queue(&s.amqp.tier_queue(4)));
            assert!(!s.amqp.is_own_queue(&s.amqp.tier_queue(8)));
            Ok(())
        });
    }
}
