//! Job events: status changes and progress, stored (so an SSE client that reconnects gets what
//! it missed) and announced with NOTIFY (so it gets them at once).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::{columns::JOB_COLUMNS, error::Result, JobRecord};

/// NOTIFY channel carrying `job_id` for every new event.
pub const EVENTS_CHANNEL: &str = "sidbooth_job_events";
/// NOTIFY channel that wakes idle workers when a job becomes claimable.
pub const QUEUE_CHANNEL: &str = "sidbooth_jobs";
/// NOTIFY channel that wakes webhook dispatchers when a delivery is enqueued.
pub const WEBHOOKS_CHANNEL: &str = "sidbooth_webhooks";

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

/// One statement that changes a job and records the change: `head` yields the job's new row
/// (an `UPDATE … RETURNING`, or a `SELECT` inside the transaction that changed it) as `j`; the
/// statement also stores an event of `kind` with the job's standing and notifies listeners, and
/// for a `status` event enqueues a webhook message for every endpoint of the tenant subscribed
/// to `job.<status>`, with the row as it is now (the dispatcher renders it as
/// `GET /v1/jobs/{id}` shows the job). It returns `j`'s columns.
///
/// Being one statement, it is atomic without a transaction and costs one round trip: a change
/// that rolls back leaves no event and no message, one that commits cannot lose them.
pub(crate) fn status_change(head: &str, kind: &'static str) -> String {
    let webhooks = if kind == "status" { WEBHOOK_CTES } else { "" };
    let notify_webhooks = if kind == "status" {
        format!(
            ", (SELECT count(*) FROM (SELECT pg_notify('{}', '') FROM d LIMIT 1) AS w)
                 AS webhooks_notified",
            WEBHOOKS_CHANNEL
        )
    } else {
        String::new()
    };
    format!(
        "WITH j AS ({head}),
         e AS (
             INSERT INTO job_events (job_id, kind, data)
             SELECT id, '{kind}', jsonb_build_object(
                 'status', status, 'stage', stage, 'progress', progress,
                 'stages_done', to_jsonb(stages_done), 'attempts', attempts, 'error', error)
             FROM j
             RETURNING job_id){webhooks}
         SELECT j.*,
                (SELECT count(*) FROM (SELECT pg_notify('{EVENTS_CHANNEL}', job_id::text) FROM e)
                     AS n) AS events_notified{notify_webhooks}
         FROM j"
    )
}

/// The webhook part of [`status_change`]: the tenant's subscribed endpoints, one message with
/// the row as it is now, one delivery per endpoint.
const WEBHOOK_CTES: &str = ", targets AS (
                 SELECT w.id AS endpoint_id, j.id AS job_id
                 FROM webhook_endpoints w JOIN j ON w.tenant_id = j.tenant_id
                 WHERE 'job.' || j.status = ANY(w.events)),
             m AS (
                 INSERT INTO webhook_messages (id, tenant_id, job_id, event_type, payload)
                 SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), j.tenant_id, j.id,
                        'job.' || j.status,
                        jsonb_build_object(
                            'timestamp', now(),
                            'row', to_jsonb(j),
                            'images', (SELECT coalesce(jsonb_agg(file_name ORDER BY idx), '[]')
                                       FROM job_images WHERE job_id = j.id))
                 FROM j WHERE EXISTS (SELECT 1 FROM targets t WHERE t.job_id = j.id)
                 RETURNING id, job_id),
             d AS (
                 INSERT INTO webhook_deliveries (message_id, endpoint_id)
                 SELECT m.id, t.endpoint_id FROM m JOIN targets t ON t.job_id = m.job_id
                 RETURNING 1)";

/// Stores an event of `kind` for the job as it stands inside the current transaction (which
/// made the change), with its webhook messages for a `status` event; see [`status_change`].
pub async fn record_change<'e>(
    exec: impl PgExecutor<'e>,
    job_id: Uuid,
    kind: &'static str,
) -> Result<()> {
    let sql = status_change(
        &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
        kind,
    );
    sqlx::query(&sql).bind(job_id).execute(exec).await?;
    Ok(())
}

/// [`record_change`] of a `status` event.
pub async fn record_status<'e>(exec: impl PgExecutor<'e>, record: &JobRecord) -> Result<()> {
    record_change(exec, record.id, "status").await
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
