//! Message-ids being published by a post in progress. A concurrent post carrying the same ids
//! — typically a sender whose HTTP client gave up and retried while its first attempt was still
//! waiting for confirms — waits for that post to finish instead of publishing them a second
//! time, then finds them in the idempotency cache (or, if that post failed, publishes them
//! itself). Only ids of posts in progress are held, so the map stays as small as the load.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

use crate::ops::batch::Row;

#[derive(Default)]
pub struct InFlight {
    ids: Mutex<HashMap<String, Arc<Notify>>>,
}

/// The ids a post is publishing; released (and waiters woken) when dropped, however the post
/// ends — answered, failed, or abandoned by a client that hung up.
pub struct Claim<'a> {
    inflight: &'a InFlight,
    ids: Vec<String>,
    done: Arc<Notify>,
}

impl InFlight {
    /// Claims the message-id of every row, or returns the post in progress that holds one.
    pub fn claim<'a>(&'a self, rows: &[Row]) -> Result<Claim<'a>, Arc<Notify>> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(busy) = rows.iter().find_map(|r| ids.get(&r.message_id)) {
            return Err(busy.clone());
        }
        let done = Arc::new(Notify::new());
        for row in rows {
            ids.insert(row.message_id.clone(), done.clone());
        }
        Ok(Claim {
            inflight: self,
            ids: rows.iter().map(|r| r.message_id.clone()).collect(),
            done,
        })
    }

    /// Waits until the post holding `busy` is over: `false` if it still is after `limit`.
    pub async fn wait(&self, busy: Arc<Notify>, limit: Duration) -> bool {
        let notified = busy.notified();
        tokio::pin!(notified);
        // Registered before looking, so a release in between is not missed.
        notified.as_mut().enable();
        let held = {
            let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            ids.values().any(|n| Arc::ptr_eq(n, &busy))
        };
        !held || tokio::time::timeout(limit, notified).await.is_ok()
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut ids = self.inflight.ids.lock().unwrap_or_else(|e| e.into_inner());
        for id in &self.ids {
            ids.remove(id);
        }
        drop(ids);
        self.done.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(ids: &[&str]) -> Vec<Row> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| Row {
                line: i as u64 + 1,
                request_id: (*id).to_owned(),
                message_id: (*id).to_owned(),
                body: Vec::new(),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_post_with_an_id_in_flight_waits_for_the_one_holding_it() {
        let inflight = InFlight::default();
        let first = inflight.claim(&rows(&["a", "b"])).unwrap();
        assert!(inflight.claim(&rows(&["c"])).is_ok(), "other ids go ahead");
        let busy = inflight.claim(&rows(&["c", "b"])).err().unwrap();
        assert!(
            !inflight.wait(busy.clone(), Duration::from_millis(20)).await,
            "still held"
        );
        let waiter = {
            let busy = busy.clone();
            async { inflight.wait(busy, Duration::from_secs(5)).await }
        };
        let release = async {
            tokio::task::yield_now().await;
            drop(first);
        };
        let (woken, ()) = tokio::join!(waiter, release);
        assert!(woken);
        assert!(inflight.wait(busy, Duration::ZERO).await, "released");
        assert!(inflight.claim(&rows(&["a", "b"])).is_ok());
    }
}
