//! Bearer-key authentication for every `/v1` route.
//!
//! A key that authenticated is remembered for a few seconds (`--auth-cache-secs`, 0 turns it
//! off), which saves a database round trip on most requests; a revoked key stops working within
//! that time. Unknown keys are never cached. The cache holds SHA-256 digests, not keys.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::Response,
};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{error::ApiError, state::AppState};

/// The tenant a request acts for; handlers read it from the request extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenant(pub Uuid);

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

/// The key of `Authorization: Bearer <key>`, or why there is none.
fn bearer(request: &Request) -> Result<&str, ApiError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized(
            "the Authorization header is missing",
        ))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("the Authorization header is malformed"))?;
    let (scheme, key) = value.split_once(' ').ok_or(ApiError::Unauthorized(
        "the Authorization header is malformed",
    ))?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return Err(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <key>`",
        ));
    }
    Ok(key)
}

/// Middleware: resolves the key to its tenant or answers 401.
pub async fn require_tenant(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = bearer(&request)?;
    let tenant = state
        .key_cache()
        .authenticate(state.pool(), key)
        .await?
        .ok_or(ApiError::Unauthorized("the API key is unknown or revoked"))?;
    tracing::Span::current().record("tenant_id", tracing::field::display(tenant));
    request.extensions_mut().insert(Tenant(tenant));
    Ok(next.run(request).await)
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
