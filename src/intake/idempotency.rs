//! The idempotency cache (CONTRACT section 9): every message-id the broker confirmed, with a
//! digest of the body it was confirmed with, for `intake.idempotency_window_secs` and at most
//! `intake.idempotency_capacity` of them. A repeat of a confirmed message is not published again;
//! the same message-id with another body is a conflict (a key reused for another request).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{auth::sha256, window::WindowMap};
use crate::ops::batch::Row;

pub struct Confirmed {
    ids: Mutex<WindowMap<String, [u8; 32]>>,
}

/// A row whose message-id was confirmed with a different body.
#[derive(Debug, PartialEq, Eq)]
pub struct Conflict {
    pub line: u64,
    pub message_id: String,
}

impl Confirmed {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            ids: Mutex::new(WindowMap::new(window, capacity)),
        }
    }

    /// The rows not confirmed within the window, or every conflict among them.
    pub fn unconfirmed(&self, rows: &[Row], now: Instant) -> Result<Vec<Row>, Vec<Conflict>> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let mut fresh = Vec::new();
        let mut conflicts = Vec::new();
        for row in rows {
            match ids.get(&row.message_id, now) {
                None => fresh.push(row.clone()),
                Some(digest) if *digest == sha256(&row.body) => {}
                Some(_) => conflicts.push(Conflict {
                    line: row.line,
                    message_id: row.message_id.clone(),
                }),
            }
        }
        if conflicts.is_empty() {
            Ok(fresh)
        } else {
            Err(conflicts)
        }
    }

    /// `row` was confirmed by the broker.
    pub fn remember(&self, row: &Row, now: Instant) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.insert(row.message_id.clone(), sha256(&row.body), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: u64, message_id: &str, body: &str) -> Row {
        Row {
            line,
            request_id: message_id.to_owned(),
            message_id: message_id.to_owned(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn repeats_are_skipped_conflicts_named_and_the_window_forgets() {
        let cache = Confirmed::new(Duration::from_secs(60), 100);
        let t0 = Instant::now();
        let (a, b) = (row(1, "k:1", "{a}"), row(2, "k:2", "{b}"));
        let both = [a.clone(), b.clone()];
        assert_eq!(cache.unconfirmed(&both, t0).unwrap(), both);
        cache.remember(&a, t0);
        assert_eq!(
            cache.unconfirmed(&both, t0).unwrap(),
            std::slice::from_ref(&b),
            "a is a repeat"
        );
        let changed = [row(1, "k:1", "{other}"), row(2, "k:2", "{b}")];
        assert_eq!(
            cache.unconfirmed(&changed, t0).unwrap_err(),
            [Conflict {
                line: 1,
                message_id: "k:1".to_owned()
            }]
        );
        let later = t0 + Duration::from_secs(60);
        assert_eq!(cache.unconfirmed(&both, later).unwrap(), both, "forgotten");
    }
}
