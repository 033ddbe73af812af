//! Retention: jobs that finished (or were left awaiting review) longer ago than the retention
//! time are deleted with everything they own, objects first, then rows.
//!
//! Each job is swept under its row lock (`FOR UPDATE SKIP LOCKED`), so an approve or a second
//! sweeper cannot act on a half-deleted job, and a sweep that dies midway is simply repeated:
//! deleting objects that are gone already is not an error.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{error::Result, keys, storage::ArtifactStore};

/// Jobs swept per transaction batch.
const BATCH: i64 = 20;

/// Which jobs have expired, `$1` being the retention in seconds.
const EXPIRED: &str = "(status IN ('succeeded', 'failed', 'canceled')
        AND finished_at < now() - make_interval(secs => $1))
     OR (status = 'awaiting_review' AND updated_at < now() - make_interval(secs => $1))";

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub jobs: usize,
    pub objects: usize,
}

#[derive(Clone)]
pub struct Sweeper {
    pool: PgPool,
    storage: ArtifactStore,
    retention: Duration,
}

impl Sweeper {
    pub fn new(pool: PgPool, storage: ArtifactStore, retention: Duration) -> Self {
        Self {
            pool,
            storage,
            retention,
        }
    }

    /// Deletes every expired job; returns what went.
    pub async fn sweep(&self) -> Result<Swept> {
        let mut swept = Swept::default();
        loop {
            let batch = self.sweep_batch().await?;
            swept.jobs += batch.jobs;
            swept.objects += batch.objects;
            if batch.jobs < BATCH as usize {
                return Ok(swept);
            }
        }
    }

    async fn sweep_batch(&self) -> Result<Swept> {
        let mut tx = self.pool.begin().await?;
        let expired: Vec<(Uuid, Uuid)> = sqlx::query_as(&format!(
            "SELECT id, tenant_id FROM jobs WHERE {EXPIRED}
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED"
        ))
        .bind(self.retention.as_secs_f64())
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let mut swept = Swept::default();
        for (id, tenant) in &expired {
            swept.objects += self
                .storage
                .delete_prefix(&keys::job_prefix(*tenant, *id))
                .await?;
        }
        let ids: Vec<Uuid> = expired.iter().map(|(id, _)| *id).collect();
        // Images, descriptions, masks, artifacts, events and webhook messages cascade.
        let deleted = sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        swept.jobs = deleted.rows_affected() as usize;
        if swept.jobs > 0 {
            tracing::info!(
                jobs = swept.jobs,
                objects = swept.objects,
                "expired jobs deleted"
            );
        }
        Ok(swept)
    }

    /// Sweeps every `interval` until `shutdown`; a failed sweep is logged and tried again.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "retention sweep failed; trying again later");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
