//! Job events: status changes and progress, stored (so an SSE client that reconnects gets what
//! it missed) and announced with NOTIFY (so it gets them at once).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::error::Result;

/// NOTIFY channel carrying `job_id` for every new event.
pub const EVENTS_CHANNEL: &str = "sidbooth_job_events";
/// NOTIFY channel that wakes idle workers when a job becomes claimable.
pub const QUEUE_CHANNEL: &str = "sidbooth_jobs";

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobEvent {
    pub id: i64,
    pub job_id: Uuid,
    pub kind: String,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Stores an event and notifies listeners. Inside a transaction the notification goes out on
/// commit, so listeners never see an event before the state change it describes.
pub async fn record<'e>(
    exec: impl PgExecutor<'e>,
    job_id: Uuid,
    kind: &str,
    data: serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "WITH e AS (INSERT INTO job_events (job_id, kind, data) VALUES ($1, $2, $3) RETURNING job_id)
         SELECT pg_notify($4, job_id::text) FROM e",
    )
    .bind(job_id)
    .bind(kind)
    .bind(data)
    .bind(EVENTS_CHANNEL)
    .execute(exec)
    .await?;
    Ok(())
}

/// Events of a job after the given id, oldest first.
pub async fn since(pool: &PgPool, job_id: Uuid, after_id: i64) -> Result<Vec<JobEvent>> {
    let events = sqlx::query_as(
        "SELECT id, job_id, kind, data, created_at FROM job_events
         WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT 1000",
    )
    .bind(job_id)
    .bind(after_id)
    .fetch_all(pool)
    .await?;
    Ok(events)
}

/// Wakes idle workers.
pub async fn notify_queue<'e>(exec: impl PgExecutor<'e>) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(QUEUE_CHANNEL)
        .execute(exec)
        .await?;
    Ok(())
}
