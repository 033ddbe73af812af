//! Webhook endpoints, their outbox and delivery log on Postgres.
//!
//! A job's status change enqueues its message in the same statement or transaction
//! ([`crate::events::status_change`]), as a snapshot of the job's row; a dispatcher (the `sidbooth-webhooks` crate) claims due
//! deliveries with `FOR UPDATE SKIP LOCKED`, sends them and records each try here. A delivery's
//! `attempts` count fences its writes: a dispatcher whose hold lapsed and was taken over cannot
//! overwrite the newer try's result.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sidbooth_domain::JobStatus;
use sqlx::{postgres::PgListener, PgPool};
use uuid::Uuid;

use crate::{
    error::{CoreError, Result},
    jobs::JobRow,
    view::Job,
    JobRecord,
};

pub use crate::events::WEBHOOKS_CHANNEL;

/// The event type of a job entering `status`: `job.<status>`.
pub fn event_type(status: JobStatus) -> String {
    format!("job.{status}")
}

/// Every event type an endpoint can subscribe to.
pub fn event_types() -> Vec<String> {
    JobStatus::ALL.into_iter().map(event_type).collect()
}

/// A registered endpoint, without its secret.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// An endpoint to register; the caller has checked the URL and made the secret.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => DeliveryStatus::Pending,
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            other => return Err(CoreError::Corrupt(format!("delivery status {other:?}"))),
        })
    }
}

/// One try of a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Attempt {
    #[serde(skip)]
    pub delivery_id: i64,
    pub attempted_at: DateTime<Utc>,
    /// The endpoint's HTTP status; null when there was no answer.
    pub response_status: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// One message for one endpoint, with its tries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub id: i64,
    /// The `webhook-id` header: the same on every try.
    pub message_id: String,
    pub event_type: String,
    pub job_id: Uuid,
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// When the next try is due, while pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub tries: Vec<Attempt>,
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: i64,
    message_id: String,
    event_type: String,
    job_id: Uuid,
    status: String,
    attempts: i32,
    next_attempt_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

/// A delivery a dispatcher claimed: what to send where, and the try's number.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: i64,
    /// The try this claim makes, 1-based; it fences [`WebhookStore::record_attempt`].
    pub attempt: i32,
    pub message_id: String,
    /// `{"type", "timestamp", "data"}`, rendered the same on every try; an error when the
    /// stored snapshot cannot be read.
    pub body: std::result::Result<serde_json::Value, String>,
    pub url: String,
    pub secret: String,
    /// When the message was enqueued: retries stop a retry window after it.
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct DueRow {
    id: i64,
    attempt: i32,
    message_id: String,
    event_type: String,
    payload: serde_json::Value,
    url: String,
    secret: String,
    created_at: DateTime<Utc>,
}

/// What a message snapshot holds: the job's row when it changed, its file names, and when.
#[derive(Deserialize)]
struct Snapshot {
    timestamp: DateTime<Utc>,
    row: JobRow,
    images: Vec<String>,
}

/// The body of a message: the job as `GET /v1/jobs/{id}` shows it, from the snapshot the
/// status change stored ([`crate::events::status_change`]).
fn render(event_type: &str, snapshot: serde_json::Value) -> Result<serde_json::Value> {
    let snapshot: Snapshot = serde_json::from_value(snapshot)?;
    let job = Job::new(JobRecord::try_from(snapshot.row)?, snapshot.images);
    Ok(serde_json::json!({
        "type": event_type,
        "timestamp": snapshot.timestamp,
        "data": job,
    }))
}

/// The result of one try, as the dispatcher decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct TryResult {
    pub response_status: Option<u16>,
    pub error: Option<String>,
    pub duration: Duration,
    pub next: NextStep,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NextStep {
    Delivered,
    RetryAfter(Duration),
    /// The retry window is over.
    GiveUp,
}

#[derive(Clone, Debug)]
pub struct WebhookStore {
    pool: PgPool,
}

impl WebhookStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Registers an endpoint, refused with a conflict when the tenant has `max_per_tenant`.
    pub async fn create(
        &self,
        tenant: Uuid,
        new: &NewEndpoint,
        max_per_tenant: usize,
    ) -> Result<Endpoint> {
        let mut tx = self.pool.begin().await?;
        // The tenant's row serialises concurrent registrations, so the count holds.
        sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_one(&mut *tx)
                .await?;
        if count as usize >= max_per_tenant {
            return Err(CoreError::Conflict(format!(
                "a tenant can register at most {max_per_tenant} webhook endpoints; delete one first"
            )));
        }
        let endpoint: Endpoint = sqlx::query_as(
            "INSERT INTO webhook_endpoints (id, tenant_id, url, events, secret)
             VALUES ($1, $2, $3, $4, $5) RETURNING id, url, events, created_at",
        )
        .bind(Uuid::now_v7())
        .bind(tenant)
        .bind(&new.url)
        .bind(&new.events)
        .bind(&new.secret)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(endpoint)
    }

    /// The tenant's endpoints, oldest first.
    pub async fn list(&self, tenant: Uuid) -> Result<Vec<Endpoint>> {
        Ok(sqlx::query_as(
            "SELECT id, url, events, created_at FROM webhook_endpoints
             WHERE tenant_id = $1 ORDER BY id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn get(&self, tenant: Uuid, id: Uuid) -> Result<Endpoint> {
        sqlx::query_as(
            "SELECT id, url, events, created_at FROM webhook_endpoints
             WHERE id = $1 AND tenant_id = $2",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(CoreError::NotFound)
    }

    /// Removes an endpoint; its pending deliveries go with it.
    pub async fn delete(&self, tenant: Uuid, id: Uuid) -> Result<()> {
        let done = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2")
            .bind(id)
            .bind(tenant)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(CoreError::NotFound);
        }
        Ok(())
    }

    /// An endpoint's deliveries, newest first, each with its tries.
    pub async fn deliveries(
        &self,
        tenant: Uuid,
        endpoint: Uuid,
        limit: i64,
    ) -> Result<Vec<Delivery>> {
        self.get(tenant, endpoint).await?;
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "SELECT d.id, d.message_id, m.event_type, m.job_id, d.status, d.attempts,
                    d.next_attempt_at, d.created_at, d.finished_at
             FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id
             WHERE d.endpoint_id = $1 ORDER BY d.id DESC LIMIT $2",
        )
        .bind(endpoint)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let attempts: Vec<Attempt> = sqlx::query_as(
            "SELECT delivery_id, attempted_at, response_status, error, duration_ms
             FROM webhook_attempts WHERE delivery_id = ANY($1) ORDER BY id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut by_delivery: HashMap<i64, Vec<Attempt>> = HashMap::new();
        for attempt in attempts {
            by_delivery
                .entry(attempt.delivery_id)
                .or_default()
                .push(attempt);
        }
        rows.into_iter()
            .map(|r| {
                let status = DeliveryStatus::parse(&r.status)?;
                Ok(Delivery {
                    tries: by_delivery.remove(&r.id).unwrap_or_default(),
                    id: r.id,
                    message_id: r.message_id,
                    event_type: r.event_type,
                    job_id: r.job_id,
                    status,
                    attempts: r.attempts,
                    next_attempt_at: (status == DeliveryStatus::Pending)
                        .then_some(r.next_attempt_at),
                    created_at: r.created_at,
                    finished_at: r.finished_at,
                })
            })
            .collect()
    }

    /// A listener on the webhooks channel; dispatchers wait on it with a polling fallback.
    pub async fn listen(&self) -> Result<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(WEBHOOKS_CHANNEL).await?;
        Ok(listener)
    }

    /// Claims up to `limit` due deliveries for `hold`, counting the try each claim makes.
    pub async fn claim_due(&self, limit: i64, hold: Duration) -> Result<Vec<DueDelivery>> {
        let rows: Vec<DueRow> = sqlx::query_as(
            "WITH claimed AS (
                 UPDATE webhook_deliveries
                 SET attempts = attempts + 1, locked_until = now() + make_interval(secs => $2)
                 WHERE id IN (
                     SELECT id FROM webhook_deliveries
                     WHERE status = 'pending' AND next_attempt_at <= now()
                       AND (locked_until IS NULL OR locked_until < now())
                     ORDER BY next_attempt_at
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED)
                 RETURNING id, attempts, message_id, endpoint_id)
             SELECT c.id, c.attempts AS attempt, c.message_id, m.event_type, m.payload, e.url,
                    e.secret, m.created_at
             FROM claimed c
             JOIN webhook_messages m ON m.id = c.message_id
             JOIN webhook_endpoints e ON e.id = c.endpoint_id",
        )
        .bind(limit)
        .bind(hold.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| DueDelivery {
                body: render(&r.event_type, r.payload)
                    .map_err(|e| format!("the stored message cannot be read: {e}")),
                id: r.id,
                attempt: r.attempt,
                message_id: r.message_id,
                url: r.url,
                secret: r.secret,
                created_at: r.created_at,
            })
            .collect())
    }

    /// Logs a try and moves the delivery on. False when the claim was taken over meanwhile (the
    /// newer try's result stands; this one is still logged).
    pub async fn record_attempt(&self, due: &DueDelivery, result: &TryResult) -> Result<bool> {
        let (status, retry_after): (&str, Option<f64>) = match result.next {
            NextStep::Delivered => ("delivered", None),
            NextStep::RetryAfter(after) => ("pending", Some(after.as_secs_f64())),
            NextStep::GiveUp => ("failed", None),
        };
        let updated: Option<i64> = sqlx::query_scalar(
            "WITH logged AS (
                 INSERT INTO webhook_attempts (delivery_id, response_status, error, duration_ms)
                 VALUES ($1, $3, $4, $5) RETURNING delivery_id)
             UPDATE webhook_deliveries SET
                 status = $6, locked_until = NULL,
                 next_attempt_at = CASE WHEN $7::float8 IS NULL THEN next_attempt_at
                                        ELSE now() + make_interval(secs => $7::float8) END,
                 last_response_status = $3, last_error = $4,
                 finished_at = CASE WHEN $6 = 'pending' THEN NULL ELSE now() END
             WHERE id = (SELECT delivery_id FROM logged) AND attempts = $2 AND status = 'pending'
             RETURNING id",
        )
        .bind(due.id)
        .bind(due.attempt)
        .bind(result.response_status.map(i32::from))
        .bind(&result.error)
        .bind(i32::try_from(result.duration.as_millis()).unwrap_or(i32::MAX))
        .bind(status)
        .bind(retry_after)
        .fetch_optional(&self.pool)
        .await?;
        Ok(updated.is_some())
    }
}
