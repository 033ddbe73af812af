//! Tenants and API keys. A key is `sb_` followed by 32 random bytes in hex; only its SHA-256 is
//! stored, so a database leak does not leak keys.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Result;

const KEY_PREFIX: &str = "sb_";

/// A key as shown to its owner once.
#[derive(Clone)]
pub struct IssuedKey {
    pub tenant_id: Uuid,
    pub key_id: Uuid,
    pub secret: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("tenant_id", &self.tenant_id)
            .field("key_id", &self.key_id)
            .field("secret", &"***")
            .finish()
    }
}

fn hash_key(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Creates the tenant if it does not exist yet and issues a new key for it.
#[tracing::instrument(skip(pool))]
pub async fn create_key(pool: &PgPool, tenant_name: &str) -> Result<IssuedKey> {
    let mut tx = pool.begin().await?;
    let tenant_id: Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (id, name) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(tenant_name)
    .fetch_one(&mut *tx)
    .await?;

    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let secret = format!("{KEY_PREFIX}{}", hex::encode(raw));
    let key_id = Uuid::now_v7();
    sqlx::query("INSERT INTO api_keys (id, tenant_id, key_hash, prefix) VALUES ($1, $2, $3, $4)")
        .bind(key_id)
        .bind(tenant_id)
        .bind(hash_key(&secret))
        .bind(&secret[..KEY_PREFIX.len() + 6])
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(IssuedKey {
        tenant_id,
        key_id,
        secret,
    })
}

/// The tenant a key belongs to, or None for an unknown or revoked key.
pub async fn authenticate(pool: &PgPool, secret: &str) -> Result<Option<Uuid>> {
    if !secret.starts_with(KEY_PREFIX) {
        return Ok(None);
    }
    let tenant = sqlx::query_scalar(
        "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash_key(secret))
    .fetch_optional(pool)
    .await?;
    Ok(tenant)
}

/// Revokes a key by id; returns whether a live key was revoked.
pub async fn revoke_key(pool: &PgPool, key_id: Uuid) -> Result<bool> {
    let done =
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(key_id)
            .execute(pool)
            .await?;
    Ok(done.rows_affected() == 1)
}
