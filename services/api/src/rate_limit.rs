//! Token buckets: each key (a client address, a tenant) may spend `per_minute` tokens a minute,
//! refilled continuously, with a burst of the same size. Used for failed authentication per
//! client address, so keys cannot be guessed at line rate, and for job submissions per tenant,
//! whose rate can differ per tenant (so the rate comes with each call).

use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

/// More keys than this drops the buckets that are full again (they hold no information).
const CAPACITY: usize = 10_000;

/// A bucket's size and refill: `per_minute` tokens a minute, a burst of as many.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    /// `None` when `per_minute` is 0 (no limit).
    pub(crate) fn per_minute(per_minute: u32) -> Option<Self> {
        (per_minute > 0).then(|| Self {
            per_sec: per_minute as f64 / 60.0,
            burst: per_minute as f64,
        })
    }

    fn level(&self, tokens: f64, at: Instant, now: Instant) -> f64 {
        (tokens + now.duration_since(at).as_secs_f64() * self.per_sec).min(self.burst)
    }
}

pub(crate) struct Buckets<K> {
    map: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// How long until `key` has a token again; `None` if it has one now. Spends nothing.
    pub(crate) fn wait(&self, key: &K, rate: Rate) -> Option<Duration> {
        let now = Instant::now();
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = *map.get(key)?;
        let level = rate.level(tokens, at, now);
        (level < 1.0).then(|| Duration::from_secs_f64((1.0 - level) / rate.per_sec))
    }

    /// Spends one token of `key` (an empty bucket stays empty).
    pub(crate) fn spend(&self, key: &K, rate: Rate) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CAPACITY && !map.contains_key(key) {
            // A full bucket holds no information; the ones still draining are kept.
            map.retain(|_, (tokens, at)| rate.level(*tokens, *at, now) < rate.burst);
        }
        let level = match map.get(key) {
            Some(&(tokens, at)) => rate.level(tokens, at, now),
            None => rate.burst,
        };
        map.insert(key.clone(), ((level - 1.0).max(0.0), now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_wait_per_key() {
        let b = Buckets::new();
        let rate = Rate::per_minute(3).unwrap();
        for _ in 0..3 {
            assert_eq!(b.wait(&"a", rate), None);
            b.spend(&"a", rate);
        }
        let wait = b.wait(&"a", rate).unwrap();
        // One token comes back every 20 s.
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(b.wait(&"b", rate), None, "another key has its own bucket");
        let faster = Rate::per_minute(60).unwrap();
        assert!(
            b.wait(&"a", faster).unwrap() < Duration::from_secs(2),
            "the rate is per call"
        );
        assert!(Rate::per_minute(0).is_none(), "0 is no limit");
    }
}
