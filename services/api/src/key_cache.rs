//! Keys that authenticated recently. A key is remembered for a few seconds
//! (`--auth-cache-secs`, 0 turns it off), which saves a database round trip on most requests;
//! a revoked key stops working within that time. Unknown keys are never cached. The cache holds
//! SHA-256 digests, not keys.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::ApiError;

/// Keys that authenticated recently, by digest.
pub(crate) struct KeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], (Uuid, Instant)>>,
}

/// More distinct keys than this within one TTL empties the cache rather than growing it.
const KEY_CACHE_CAPACITY: usize = 10_000;

impl KeyCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, digest: &[u8; 32]) -> Option<Uuid> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(digest)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(tenant, _)| *tenant)
    }

    fn insert(&self, digest: [u8; 32], tenant: Uuid) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= KEY_CACHE_CAPACITY {
            entries.clear();
        }
        entries.insert(digest, (tenant, Instant::now()));
    }

    /// The tenant of a key: from the cache, else from the database.
    pub(crate) async fn authenticate(
        &self,
        pool: &sqlx::PgPool,
        key: &str,
    ) -> Result<Option<Uuid>, ApiError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(tenant) = self.get(&digest) {
            return Ok(Some(tenant));
        }
        let tenant = sidbooth_core::tenants::authenticate(pool, key).await?;
        if let Some(tenant) = tenant {
            self.insert(digest, tenant);
        }
        Ok(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_keys_expire_and_a_zero_ttl_caches_nothing() {
        let digest = [7u8; 32];
        let tenant = Uuid::now_v7();
        let cache = KeyCache::new(Duration::from_millis(30));
        cache.insert(digest, tenant);
        assert_eq!(cache.get(&digest), Some(tenant));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get(&digest), None);

        let off = KeyCache::new(Duration::ZERO);
        off.insert(digest, tenant);
        assert_eq!(off.get(&digest), None);
    }
}
