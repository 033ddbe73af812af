//! Token buckets: each key (a client address, a tenant) may spend `per_minute` tokens a minute,
//! refilled continuously, with a burst of the same size. Used for failed authentication per
//! client address, so keys cannot be guessed at line rate.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

/// More keys than this drops the buckets that are full again (they hold no information).
const CAPACITY: usize = 10_000;

pub(crate) struct Buckets<K> {
    per_sec: f64,
    burst: f64,
    map: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// `None` when `per_minute` is 0 (no limit).
    pub(crate) fn new(per_minute: u32) -> Option<Self> {
        (per_minute > 0).then(|| Self {
            per_sec: per_minute as f64 / 60.0,
            burst: per_minute as f64,
            map: Mutex::new(HashMap::new()),
        })
    }

    fn level(&self, tokens: f64, at: Instant, now: Instant) -> f64 {
        (tokens + now.duration_since(at).as_secs_f64() * self.per_sec).min(self.burst)
    }

    /// How long until `key` has a token again; `None` if it has one now. Spends nothing.
    pub(crate) fn wait(&self, key: &K) -> Option<Duration> {
        let now = Instant::now();
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = *map.get(key)?;
        let level = self.level(tokens, at, now);
        (level < 1.0).then(|| Duration::from_secs_f64((1.0 - level) / self.per_sec))
    }

    /// Spends one token of `key` (an empty bucket stays empty).
    pub(crate) fn spend(&self, key: &K) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CAPACITY && !map.contains_key(key) {
            map.retain(|_, (tokens, at)| self.level(*tokens, *at, now) < self.burst);
        }
        let level = match map.get(key) {
            Some(&(tokens, at)) => self.level(tokens, at, now),
            None => self.burst,
        };
        map.insert(key.clone(), ((level - 1.0).max(0.0), now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_wait_per_key() {
        let b = Buckets::new(3).unwrap();
        for _ in 0..3 {
            assert_eq!(b.wait(&"a"), None);
            b.spend(&"a");
        }
        let wait = b.wait(&"a").unwrap();
        // One token comes back every 20 s.
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(b.wait(&"b"), None, "another key has its own bucket");
        assert!(Buckets::<&str>::new(0).is_none(), "0 is no limit");
    }
}
