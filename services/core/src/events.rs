//! Job events: status changes and progress, stored (so an SSE client that reconnects gets what
//! it missed) and announced with NOTIFY (so it gets them at once).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool, Row};
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

/// Whom to wake once a change has committed: SSE followers of some jobs, webhook dispatchers,
/// idle workers.
///
/// The notifications go out after the commit, not inside the writing transaction: a
/// transaction that has sent NOTIFY holds a cluster-wide lock from its commit record until
/// the commit's WAL flush ends, so every writer that notifies would commit one at a time.
/// Every listener also polls, so a wake lost to a crash between commit and send costs latency,
/// never an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "a change's listeners are woken only by Wake::send after the commit"]
pub struct Wake {
    jobs: Vec<Uuid>,
    webhooks: bool,
    queue: bool,
}

impl Wake {
    /// Followers of `job_id`'s events.
    pub fn job(job_id: Uuid) -> Self {
        Self {
            jobs: vec![job_id],
            ..Self::default()
        }
    }

    /// Also the webhook dispatchers, when `enqueued` deliveries were written.
    pub fn with_webhooks(mut self, enqueued: bool) -> Self {
        self.webhooks |= enqueued;
        self
    }

    /// Also the idle workers (a job became claimable).
    pub fn with_queue(mut self) -> Self {
        self.queue = true;
        self
    }

    /// Both wakes' listeners. A job named twice is notified once (Postgres folds identical
    /// notifications of one transaction).
    pub fn and(mut self, other: Wake) -> Self {
        self.jobs.extend(other.jobs);
        self.webhooks |= other.webhooks;
        self.queue |= other.queue;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && !self.webhooks && !self.queue
    }

    fn notifications(&self) -> (Vec<&'static str>, Vec<String>) {
        let mut channels = Vec::with_capacity(self.jobs.len() + 2);
        let mut payloads = Vec::with_capacity(self.jobs.len() + 2);
        for job in &self.jobs {
            channels.push(EVENTS_CHANNEL);
            payloads.push(job.to_string());
        }
        if self.webhooks {
            channels.push(WEBHOOKS_CHANNEL);
            payloads.push(String::new());
        }
        if self.queue {
            channels.push(QUEUE_CHANNEL);
            payloads.push(String::new());
        }
        (channels, payloads)
    }

    /// Sends every notification in one statement, outside any transaction. A failure is logged,
    /// not returned: the change has committed and the listeners' polling finds it.
    pub(crate) async fn send(self, pool: &PgPool) {
        if self.is_empty() {
            return;
        }
        let (channels, payloads) = self.notifications();
        let sent =
            sqlx::query("SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)")
                .bind(channels)
                .bind(payloads)
                .execute(pool)
                .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not notify listeners; they will find the change by polling");
        }
    }
}

/// Sends the wakes of committed changes from a background task, folding those that arrive
/// while a send is in flight into the next statement: a worker does not wait a round trip for
/// its listeners, and a busy queue sends one notifying statement for many changes. Clones share
/// the task, which starts with the first wake and ends when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Notifier {
    pool: PgPool,
    sender: std::sync::Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Wake>>>,
}

impl Notifier {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sender: Default::default(),
        }
    }

    /// Queues `wake` to be sent as soon as possible; call it once the change has committed,
    /// inside the runtime.
    pub fn wake(&self, wake: Wake) {
        if wake.is_empty() {
            return;
        }
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(Self::send_all(self.pool.clone(), receiver));
            sender
        });
        if let Err(unsent) = sender.send(wake) {
            // The task is gone only when its runtime is shutting down: nobody is left to wait.
            tracing::debug!(wake = ?unsent.0, "not notified: the notifier has stopped");
        }
    }

    async fn send_all(pool: PgPool, mut wakes: tokio::sync::mpsc::UnboundedReceiver<Wake>) {
        while let Some(mut wake) = wakes.recv().await {
            while let Ok(more) = wakes.try_recv() {
                wake = wake.and(more);
            }
            wake.send(&pool).await;
        }
    }
}

/// Stores an event. Its listeners are woken by the returned [`Wake`], sent after the commit.
pub async fn record<'e>(
    exec: impl PgExecutor<'e>,
    job_id: Uuid,
    kind: &str,
    data: serde_json::Value,
) -> Result<Wake> {
    sqlx::query("INSERT INTO job_events (job_id, kind, data) VALUES ($1, $2, $3)")
        .bind(job_id)
        .bind(kind)
        .bind(data)
        .execute(exec)
        .await?;
    Ok(Wake::job(job_id))
}

/// One statement that changes a job and records the change: `head` yields the job's new row
/// (an `UPDATE … RETURNING`, or a `SELECT` inside the transaction that changed it) as `j`; the
/// statement also stores an event of `kind` with the job's standing, and for a `status` event
/// enqueues a webhook message for every endpoint of the tenant subscribed to `job.<status>`,
/// with the row as it is now (the dispatcher renders it as `GET /v1/jobs/{id}` shows the job).
/// It returns `j`'s columns and `webhooks_enqueued`, the deliveries written ([`ChangedRow`]).
///
/// Being one statement, it is atomic without a transaction and costs one round trip: a change
/// that rolls back leaves no event and no message, one that commits cannot lose them.
pub(crate) fn status_change(head: &str, kind: &'static str) -> String {
    status_change_after("", head, kind)
}

/// [`status_change`] with more common table expressions before `j` (`ctes` ends in a comma),
/// which `head` may read.
pub(crate) fn status_change_after(ctes: &str, head: &str, kind: &'static str) -> String {
    let (webhooks, enqueued) = if kind == "status" {
        (WEBHOOK_CTES, "(SELECT count(*) FROM d)")
    } else {
        ("", "0::bigint")
    };
    format!(
        "WITH {ctes} j AS ({head}),
         e AS (
             INSERT INTO job_events (job_id, kind, data)
             SELECT id, '{kind}', jsonb_build_object(
                 'status', status, 'stage', stage, 'progress', progress,
                 'stages_done', to_jsonb(stages_done), 'attempts', attempts, 'error', error)
             FROM j){webhooks}
         SELECT j.*, {enqueued} AS webhooks_enqueued
         FROM j"
    )
}

/// A row of a [`status_change`] statement: the job and whom to wake.
#[derive(sqlx::FromRow)]
pub(crate) struct ChangedRow<T> {
    #[sqlx(flatten)]
    pub row: T,
    pub webhooks_enqueued: i64,
}

impl<T> ChangedRow<T> {
    pub fn wake(&self, job_id: Uuid) -> Wake {
        Wake::job(job_id).with_webhooks(self.webhooks_enqueued > 0)
    }
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
) -> Result<Wake> {
    let sql = status_change(
        &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
        kind,
    );
    let row = sqlx::query(&sql).bind(job_id).fetch_optional(exec).await?;
    let enqueued: i64 = match row {
        Some(row) => row.try_get("webhooks_enqueued")?,
        None => 0,
    };
    Ok(Wake::job(job_id).with_webhooks(enqueued > 0))
}

/// [`record_change`] of a `status` event.
pub async fn record_status<'e>(exec: impl PgExecutor<'e>, record: &JobRecord) -> Result<Wake> {
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
