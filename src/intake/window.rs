//! A map that forgets: entries older than a window, or beyond a capacity (oldest first), are
//! dropped. The intake's idempotency cache and its replay guard are both this, so neither can
//! grow without bound whatever clients send.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    time::{Duration, Instant},
};

pub struct WindowMap<K, V> {
    window: Duration,
    capacity: usize,
    entries: HashMap<K, Entry<V>>,
    /// Keys in insertion order, with the sequence number they were inserted under: an entry
    /// removed and inserted again leaves a stale pair here, skipped when it comes round.
    order: VecDeque<(K, u64)>,
    next_seq: u64,
}

struct Entry<V> {
    value: V,
    at: Instant,
    seq: u64,
}

impl<K: Hash + Eq + Clone, V> WindowMap<K, V> {
    /// `capacity` is at least 1.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The value of `key` if it was inserted within the window.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<&V> {
        self.expire(now);
        self.entries.get(key).map(|e| &e.value)
    }

    /// Inserts `key` unless it is present (within the window); `false` if it was. The oldest
    /// entry makes room when the map is full.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> bool {
        self.expire(now);
        if self.entries.contains_key(&key) {
            return false;
        }
        while self.entries.len() >= self.capacity {
            self.pop_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((key.clone(), seq));
        self.entries.insert(
            key,
            Entry {
                value,
                at: now,
                seq,
            },
        );
        // Removals leave stale pairs in `order`; compact before they outnumber the entries.
        if self.order.len() > 2 * self.capacity {
            let entries = &self.entries;
            self.order
                .retain(|(k, seq)| entries.get(k).is_some_and(|e| e.seq == *seq));
        }
        true
    }

    pub fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }

    fn expire(&mut self, now: Instant) {
        while let Some((key, seq)) = self.order.front() {
            match self.entries.get(key) {
                Some(e) if e.seq == *seq => {
                    if now.saturating_duration_since(e.at) < self.window {
                        return;
                    }
                    self.pop_oldest();
                }
                _ => {
                    self.order.pop_front();
                }
            }
        }
    }

    fn pop_oldest(&mut self) {
        while let Some((key, seq)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&key);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn remembers_within_the_window_only() {
        let t0 = Instant::now();
        let mut map = WindowMap::new(MINUTE, 10);
        assert!(map.insert("a", 1, t0));
        assert!(!map.insert("a", 2, t0 + Duration::from_secs(30)));
        assert_eq!(map.get(&"a", t0 + Duration::from_secs(59)), Some(&1));
        assert_eq!(map.get(&"a", t0 + MINUTE), None);
        assert!(map.insert("a", 3, t0 + MINUTE));
    }

    #[test]
    fn the_oldest_make_room_when_full() {
        let t0 = Instant::now();
        let mut map = WindowMap::new(MINUTE, 2);
        map.insert("a", (), t0);
        map.insert("b", (), t0);
        map.insert("c", (), t0);
        assert_eq!(map.len(), 2);
        assert!(map.get(&"a", t0).is_none());
        assert!(map.get(&"b", t0).is_some() && map.get(&"c", t0).is_some());
    }

    #[test]
    fn a_removed_key_can_come_back_and_its_old_place_is_forgotten() {
        let t0 = Instant::now();
        let mut map = WindowMap::new(MINUTE, 2);
        map.insert("a", 1, t0);
        map.remove(&"a");
        map.insert("b", 2, t0 + Duration::from_secs(10));
        map.insert("a", 3, t0 + Duration::from_secs(20));
        // "a"'s first, stale place must not expire its second life early.
        assert_eq!(map.get(&"a", t0 + Duration::from_secs(70)), Some(&3));
        assert_eq!(map.get(&"b", t0 + Duration::from_secs(70)), None);
    }

    proptest! {
        /// Whatever the sequence of operations, the map stays within its capacity, its order
        /// queue within twice that, and a key inserted last is found within the window.
        #[test]
        fn bounded_whatever_happens(ops in proptest::collection::vec((0u8..3, 0u16..50, 0u64..100), 1..400)) {
            let t0 = Instant::now();
            let mut map = WindowMap::new(Duration::from_secs(30), 8);
            let mut now = t0;
            for (op, key, step) in ops {
                now += Duration::from_millis(step * 100);
                match op {
                    0 => {
                        map.insert(key, (), now);
                        prop_assert!(map.get(&key, now).is_some());
                    }
                    1 => map.remove(&key),
                    _ => { let _ = map.get(&key, now); }
                }
                prop_assert!(map.len() <= 8);
                prop_assert!(map.order.len() <= 16 + 1);
            }
        }
    }
}
