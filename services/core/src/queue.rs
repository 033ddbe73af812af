//! The job queue on Postgres.
//!
//! * Claim: `FOR UPDATE SKIP LOCKED` picks one queued job whose `run_after` has come, or a running
//!   job whose lease lapsed (its worker died). Each claim bumps `lease_epoch`.
//! * Fencing: every write a worker makes carries its lease `(job id, epoch)` and matches only
//!   while the job is still running under that epoch. A worker whose lease was taken over gets
//!   [`CoreError::LeaseLost`] and must stop.
//! * Heartbeats renew the lease and report cancellation requests.
//! * Transient failures go back to `queued` with an exponential `run_after`, until
//!   `max_attempts` consecutive tries failed. A finished stage resets the count.
//! * Chaining: a job's success and the claim of the slot's next job are one statement, shared
//!   by the slots finishing together ([`chain`]); while jobs are quick, the next ones are
//!   claimed ahead.

mod chain;

use std::time::Duration;

use sidbooth_domain::{report::MaskSource, Stage};
use sqlx::{
    postgres::{PgArguments, PgListener},
    query::QueryAs,
    PgPool, Postgres, Transaction,
};
use uuid::Uuid;

use crate::{
    columns::JOB_COLUMNS,
    config::QueueSettings,
    error::{CoreError, Result},
    events::{self, ChangedRow, Notifier, Wake},
    jobs::{mask_source_str, JobError, JobRecord, JobRow, JobWarning, NewArtifact, NewDescription},
};

/// A worker's hold on a job. Cheap to clone; every write to the job goes through one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub job_id: Uuid,
    pub tenant_id: Uuid,
    pub epoch: i64,
}

#[derive(Debug, Clone)]
pub struct Claimed {
    pub lease: Lease,
    pub job: JobRecord,
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub cancel_requested: bool,
}

/// What happened to a job after a transient failure.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryDecision {
    RetryAfter(Duration),
    Failed,
}

#[derive(Clone, Debug)]
pub struct Queue {
    pool: PgPool,
    notifier: Notifier,
    /// The task that records successes and claims next jobs for all of this queue's clones
    /// together ([`Queue::succeed_and_claim`]); started with the first success.
    chain: std::sync::Arc<std::sync::OnceLock<chain::Sender>>,
    settings: QueueSettings,
    worker_id: Uuid,
}

/// A value bound after the error in a fenced update ([`Queue::transition_in`]).
enum SetArg<'a> {
    Text(Option<&'a str>),
    Seconds(f64),
}

/// The predicate of every fenced write: `$1` job id, `$2` epoch.
const FENCE: &str = "id = $1 AND lease_epoch = $2 AND status = 'running'";

/// A fenced update (`set`) and an event of `kind` with `data` in one statement, atomic without
/// a transaction: it affects one row when the lease holds, none when it was lost.
fn fenced_with_event(set: &str, kind: &str, data: &str) -> String {
    format!(
        "WITH u AS (UPDATE jobs SET {set}, updated_at = now() WHERE {FENCE} RETURNING id)
         INSERT INTO job_events (job_id, kind, data) SELECT id, '{kind}', {data} FROM u"
    )
}

/// A queued candidate `c` may start: its tenant runs fewer jobs than its limit
/// (`tenant_limits`, else the default bound as `limit`; 0 is none), not counting the jobs
/// `not_counted` matches (`r` is the running job). A taken-over job whose worker died is not
/// new work and is exempt.
fn under_running_limit(limit: &str, not_counted: &str) -> String {
    format!(
        "(coalesce((SELECT max_running_jobs FROM tenant_limits l WHERE l.tenant_id = c.tenant_id),
                   {limit}) = 0
          OR (SELECT count(*) FROM jobs r
              WHERE r.tenant_id = c.tenant_id AND r.status = 'running' {not_counted})
             < coalesce((SELECT max_running_jobs FROM tenant_limits l
                         WHERE l.tenant_id = c.tenant_id), {limit}))"
    )
}

/// The claim's update: the next claimable job (or the next `how_many`) becomes `worker`'s for
/// `lease_secs` under a new epoch. `skip` is a predicate (ending in `AND`) on the candidate
/// `c`; `not_counted` is passed to [`under_running_limit`].
fn claim_update(
    worker: &str,
    lease_secs: &str,
    limit: &str,
    how_many: Option<&str>,
    skip: &str,
    not_counted: &str,
) -> String {
    let under_limit = under_running_limit(limit, not_counted);
    // `= ANY(ARRAY(…))` for several: the planner then looks the picked ids up by key, where
    // `IN (…)` had it hash-join them against a scan of the whole table.
    let (pick, close, count) = match how_many {
        None => ("= (", ")", "1"),
        Some(n) => ("= ANY(ARRAY(", "))", n),
    };
    format!(
        "UPDATE jobs SET status = 'running', lease_owner = {worker},
                lease_expires_at = now() + make_interval(secs => {lease_secs}),
                lease_epoch = lease_epoch + 1, attempts = attempts + 1, updated_at = now()
         WHERE id {pick}
             SELECT id FROM jobs c
             WHERE {skip} ((status = 'queued' AND run_after <= now() AND {under_limit})
                           OR (status = 'running' AND lease_expires_at < now()))
             ORDER BY run_after, id
             FOR UPDATE SKIP LOCKED
             LIMIT {count}{close}
         RETURNING {JOB_COLUMNS}, lease_epoch"
    )
}

/// What a succeeded job's row is set to (`$3` is the fenced update's error slot, NULL here).
const SUCCEEDED: &str = "status = 'succeeded', stage = NULL, progress = 1, lease_owner = NULL,
     lease_expires_at = NULL, finished_at = now(), error = COALESCE($3, NULL)";

/// The claim with its status event and webhook messages (`$1` worker, `$2` lease seconds, `$3`
/// the default running limit), built once: it is the queue's hottest statement.
fn claim_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        events::status_change(&claim_update("$1", "$2", "$3", None, "", ""), "status")
    })
}

/// Jobs' successes and the claims of as many next jobs in one statement (`$1` job ids, `$2`
/// their epochs, `$3` NULL, `$4` worker, `$5` lease seconds, `$6` the default running limit,
/// `$7` how many to claim ahead): one round trip and one commit where there were two per job.
/// Each success is fenced by its own lease (`done` holds those that matched); one job is
/// claimed per matched success, `$7` more when at least one matched, so a fenced-out worker
/// claims nothing; the finishing jobs, still running in the statement's
/// snapshot, do not count against their tenants' running limits. Every row gets its status
/// event and webhook messages; `claimed` tells the two kinds apart.
fn succeed_and_claim_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let done = format!(
            "UPDATE jobs SET {SUCCEEDED}, updated_at = now()
             WHERE id = ANY($1::uuid[]) AND status = 'running'
               AND lease_epoch = ($2::bigint[])[array_position($1::uuid[], id)]
             RETURNING {JOB_COLUMNS}"
        );
        let next = claim_update(
            "$4",
            "$5",
            "$6",
            Some("(SELECT CASE WHEN count(*) = 0 THEN 0 ELSE count(*) + $7 END FROM done)"),
            "c.id <> ALL($1) AND",
            "AND r.id <> ALL($1)",
        );
        events::status_change_after(
            &format!("done AS ({done}), next AS ({next}),"),
            "SELECT *, NULL::bigint AS lease_epoch, false AS claimed FROM done
             UNION ALL SELECT *, true AS claimed FROM next",
            "status",
        )
    })
}

impl Queue {
    pub fn new(pool: PgPool, settings: QueueSettings) -> Self {
        Self {
            notifier: Notifier::new(pool.clone()),
            chain: Default::default(),
            pool,
            settings,
            worker_id: Uuid::now_v7(),
        }
    }

    pub fn worker_id(&self) -> Uuid {
        self.worker_id
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A listener on the queue channel; idle workers wait on it with a polling fallback.
    pub async fn listen(&self) -> Result<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(events::QUEUE_CHANNEL).await?;
        Ok(listener)
    }

    /// Claims the next job, or None when there is nothing to do.
    #[tracing::instrument(skip(self), fields(worker = %self.worker_id))]
    pub async fn claim(&self) -> Result<Option<Claimed>> {
        // One statement claims the job and records its status event and webhook messages: no
        // transaction to open and commit around it.
        let row: Option<ChangedRow<ClaimRow>> = sqlx::query_as(claim_sql())
            .bind(self.worker_id)
            .bind(self.settings.lease_secs)
            .bind(self.settings.max_running_jobs as i32)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        self.notifier.wake(row.wake(row.row.job.id));
        Ok(Some(Claimed::try_from(row.row)?))
    }

    /// Marks the job succeeded and, in the same statement, claims this worker's next job (None:
    /// nothing to do); answers after the commit. A worker that runs job after job pays one
    /// round trip and one commit between two jobs instead of two; slots of this queue (and its
    /// clones) finishing at the same moment share one statement. A stale lease gets
    /// [`CoreError::LeaseLost`] and claims nothing.
    #[tracing::instrument(skip(self), fields(worker = %self.worker_id))]
    pub async fn succeed_and_claim(&self, lease: &Lease) -> Result<(JobRecord, Option<Claimed>)> {
        let lease = *lease;
        if let Some(result) = self
            .ask_chain(|reply| chain::Request::Succeed { lease, reply })
            .await
        {
            return result;
        }
        // The batching task has stopped (its runtime is shutting down): record it here.
        let mut conn = self.pool.acquire().await?;
        let mut batch = self.chain_statement(&mut conn, &[lease], 0).await?;
        let record = batch.successes.remove(0)?;
        Ok((record, batch.claimed.pop()))
    }

    /// Hands over this worker's next job and records the finished job's success, sooner or
    /// later: where the worker claimed ahead ([`chain`]: only while its jobs are quick), the
    /// next job comes at once and the success is recorded by the next statement, fenced by its
    /// lease like any other write. A success that cannot be recorded is logged; the job's lease
    /// then runs out and the job runs again (at least once, as after a crash).
    /// [`Queue::flush`] waits for what is still to be recorded.
    #[tracing::instrument(skip(self), fields(worker = %self.worker_id))]
    pub async fn finish_and_claim(&self, lease: &Lease) -> Result<Option<Claimed>> {
        let finished = *lease;
        if let Some(result) = self
            .ask_chain(|reply| chain::Request::Finish {
                lease: finished,
                reply,
            })
            .await
        {
            return result;
        }
        Ok(self.succeed_and_claim(lease).await?.1)
    }

    /// Sends the batching task the request `make` builds around a reply channel and waits for
    /// the answer; None when the task has stopped (its runtime is shutting down).
    async fn ask_chain<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> chain::Request,
    ) -> Option<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.chain().send(make(reply)).ok()?;
        answer.await.ok()
    }

    /// Returns once every success handed to [`Queue::finish_and_claim`] before is recorded, and
    /// the jobs claimed ahead and not handed out are given back (a worker's last step before it
    /// exits).
    pub async fn flush(&self) {
        // A queue that never chained has nothing to flush: do not start the task for it.
        if self.chain.get().is_some() {
            self.ask_chain(|reply| chain::Request::Flush { reply })
                .await;
        }
    }

    /// The batching task's sender, started on first use.
    fn chain(&self) -> &chain::Sender {
        self.chain.get_or_init(|| {
            // The task's queue has a chain of its own, never started, so the task does not keep
            // its own channel open: it ends when the last clone of this queue is dropped.
            chain::start(Queue {
                chain: Default::default(),
                ..self.clone()
            })
        })
    }

    /// One statement ([`succeed_and_claim_sql`]) for `leases` on `conn`, claiming `ahead` jobs
    /// more than the successes that matched (none when none matched).
    async fn chain_statement(
        &self,
        conn: &mut sqlx::PgConnection,
        leases: &[Lease],
        ahead: usize,
    ) -> Result<chain::Batch> {
        let ids: Vec<Uuid> = leases.iter().map(|l| l.job_id).collect();
        let epochs: Vec<i64> = leases.iter().map(|l| l.epoch).collect();
        let rows: Vec<ChangedRow<ChainRow>> = sqlx::query_as(succeed_and_claim_sql())
            .bind(&ids)
            .bind(&epochs)
            .bind(None::<serde_json::Value>)
            .bind(self.worker_id)
            .bind(self.settings.lease_secs)
            .bind(self.settings.max_running_jobs as i32)
            .bind(ahead as i64)
            .fetch_all(&mut *conn)
            .await?;
        let mut wake = Wake::default();
        let mut done = std::collections::HashMap::new();
        let mut claimed = Vec::new();
        for row in rows {
            wake = wake.and(row.wake(row.row.job.id));
            match row.row {
                ChainRow {
                    job,
                    lease_epoch: Some(lease_epoch),
                    claimed: true,
                } => claimed.push(Claimed::try_from(ClaimRow { job, lease_epoch })?),
                ChainRow { job, .. } => {
                    done.insert(job.id, job);
                }
            }
        }
        self.notifier.wake(wake);
        let successes = leases
            .iter()
            .map(|lease| {
                let job = done.remove(&lease.job_id).ok_or(CoreError::LeaseLost)?;
                JobRecord::try_from(job)
            })
            .collect();
        Ok(chain::Batch { successes, claimed })
    }

    /// Renews the lease. Fails with LeaseLost when another worker took the job over, or when it
    /// was deleted or finished.
    pub async fn heartbeat(&self, lease: &Lease) -> Result<Heartbeat> {
        let cancel: Option<bool> = sqlx::query_scalar(&format!(
            "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
             WHERE {FENCE} RETURNING cancel_requested"
        ))
        .bind(lease.job_id)
        .bind(lease.epoch)
        .bind(self.settings.lease_secs)
        .fetch_optional(&self.pool)
        .await?;
        cancel
            .map(|cancel_requested| Heartbeat { cancel_requested })
            .ok_or(CoreError::LeaseLost)
    }

    /// Runs a fenced update of the job row and records the resulting event, in one statement.
    async fn transition(
        &self,
        lease: &Lease,
        set: &'static str,
        bind_error: Option<&JobError>,
        args: &[SetArg<'_>],
        event_kind: &'static str,
    ) -> Result<JobRecord> {
        let sql = events::status_change(&Self::fenced_update(set), event_kind);
        let row: Option<ChangedRow<JobRow>> =
            Self::bind_transition(sqlx::query_as(&sql), lease, bind_error, args)?
                .fetch_optional(&self.pool)
                .await?;
        let row = row.ok_or(CoreError::LeaseLost)?;
        self.notifier.wake(row.wake(lease.job_id));
        row.row.try_into()
    }

    /// `set` is a fixed SQL fragment: `$1`, `$2` are the fence's, `$3` the error, `$4`… the
    /// `args` in order; every value is bound, none is spliced into the text.
    fn fenced_update(set: &str) -> String {
        format!("UPDATE jobs SET {set}, updated_at = now() WHERE {FENCE} RETURNING {JOB_COLUMNS}")
    }

    fn bind_transition<'q, R>(
        query: QueryAs<'q, Postgres, R, PgArguments>,
        lease: &Lease,
        bind_error: Option<&JobError>,
        args: &[SetArg<'q>],
    ) -> Result<QueryAs<'q, Postgres, R, PgArguments>> {
        let mut query = query
            .bind(lease.job_id)
            .bind(lease.epoch)
            .bind(bind_error.map(serde_json::to_value).transpose()?);
        for arg in args {
            query = match *arg {
                SetArg::Text(t) => query.bind(t),
                SetArg::Seconds(secs) => query.bind(secs),
            };
        }
        Ok(query)
    }

    /// A fenced update inside a transaction that records its own event.
    async fn transition_in(
        tx: &mut Transaction<'_, Postgres>,
        lease: &Lease,
        set: &'static str,
        bind_error: Option<&JobError>,
        args: &[SetArg<'_>],
    ) -> Result<JobRecord> {
        let sql = Self::fenced_update(set);
        let row: Option<JobRow> =
            Self::bind_transition(sqlx::query_as(&sql), lease, bind_error, args)?
                .fetch_optional(&mut **tx)
                .await?;
        row.ok_or(CoreError::LeaseLost)?.try_into()
    }

    /// Reports progress within a stage. `detail` carries stage-specific fields (image index,
    /// training step and loss...) into the event.
    pub async fn progress(
        &self,
        lease: &Lease,
        stage: Stage,
        progress: f32,
        detail: serde_json::Value,
    ) -> Result<()> {
        let mut data = serde_json::json!({ "stage": stage, "progress": progress });
        if let (Some(data), serde_json::Value::Object(extra)) = (data.as_object_mut(), detail) {
            data.extend(extra);
        }
        let done = sqlx::query(&fenced_with_event(
            "stage = $3, progress = $4",
            "progress",
            "$5",
        ))
        .bind(lease.job_id)
        .bind(lease.epoch)
        .bind(stage.as_str())
        .bind(progress.clamp(0.0, 1.0))
        .bind(data)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Err(CoreError::LeaseLost);
        }
        self.notifier.wake(Wake::job(lease.job_id));
        Ok(())
    }

    /// Marks a stage finished and moves to `next` (None: the last stage is done). A finished
    /// stage resets the failure count, so retries count per stage.
    pub async fn complete_stage(
        &self,
        lease: &Lease,
        stage: Stage,
        next: Option<Stage>,
    ) -> Result<JobRecord> {
        self.transition(
            lease,
            "stages_done = array_append(array_remove(stages_done, $4), $4),
             stage = $5, progress = 0, attempts = 0, error = COALESCE($3, error)",
            None,
            &[
                SetArg::Text(Some(stage.as_str())),
                SetArg::Text(next.map(|n| n.as_str())),
            ],
            "stage_completed",
        )
        .await
    }

    /// Parks the job for the user's review; the lease ends.
    pub async fn await_review(&self, lease: &Lease) -> Result<JobRecord> {
        self.transition(
            lease,
            "status = 'awaiting_review', lease_owner = NULL, lease_expires_at = NULL,
             error = COALESCE($3, error)",
            None,
            &[],
            "status",
        )
        .await
    }

    /// Marks `stage` finished and parks the job for review in one transaction, so that a worker
    /// dying between the two cannot leave a finished stage that skips the review.
    pub async fn complete_stage_for_review(
        &self,
        lease: &Lease,
        stage: Stage,
        next: Option<Stage>,
    ) -> Result<JobRecord> {
        self.transition(
            lease,
            "stages_done = array_append(array_remove(stages_done, $4), $4),
             stage = $5, progress = 0, attempts = 0, status = 'awaiting_review',
             lease_owner = NULL, lease_expires_at = NULL, error = COALESCE($3, error)",
            None,
            &[
                SetArg::Text(Some(stage.as_str())),
                SetArg::Text(next.map(|n| n.as_str())),
            ],
            "status",
        )
        .await
    }

    pub async fn succeed(&self, lease: &Lease) -> Result<JobRecord> {
        self.transition(lease, SUCCEEDED, None, &[], "status").await
    }

    /// Fails the job for good, recording why.
    pub async fn fail(&self, lease: &Lease, error: &JobError) -> Result<JobRecord> {
        self.transition(
            lease,
            "status = 'failed', lease_owner = NULL, lease_expires_at = NULL,
             finished_at = now(), error = $3",
            Some(error),
            &[],
            "status",
        )
        .await
    }

    /// Marks a job whose cancellation the worker observed as canceled.
    pub async fn mark_canceled(&self, lease: &Lease) -> Result<JobRecord> {
        self.transition(
            lease,
            "status = 'canceled', lease_owner = NULL, lease_expires_at = NULL,
             finished_at = now(), error = COALESCE($3, error)",
            None,
            &[],
            "status",
        )
        .await
    }

    /// After a transient failure: back to the queue with exponential backoff, or failed when the
    /// job has used its attempts.
    pub async fn retry_later(&self, lease: &Lease, error: &JobError) -> Result<RetryDecision> {
        let mut tx = self.pool.begin().await?;
        let (attempts, max_attempts): (i32, i32) = sqlx::query_as(&format!(
            "SELECT attempts, max_attempts FROM jobs WHERE {FENCE} FOR UPDATE"
        ))
        .bind(lease.job_id)
        .bind(lease.epoch)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(CoreError::LeaseLost)?;
        if attempts >= max_attempts {
            tx.rollback().await?;
            self.fail(lease, error).await?;
            return Ok(RetryDecision::Failed);
        }
        let delay = self.settings.backoff(attempts);
        let record = Self::transition_in(
            &mut tx,
            lease,
            "status = 'queued', lease_owner = NULL, lease_expires_at = NULL, error = $3,
             run_after = now() + make_interval(secs => $4)",
            Some(error),
            &[SetArg::Seconds(delay.as_secs_f64())],
        )
        .await?;
        let wake = events::record_status(&mut *tx, &record).await?;
        tx.commit().await?;
        self.notifier.wake(wake);
        Ok(RetryDecision::RetryAfter(delay))
    }

    /// Adds a stage's accelerator seconds to the tenant's daily count (quotas).
    pub async fn add_gpu_seconds(&self, lease: &Lease, seconds: f64) -> Result<()> {
        crate::quotas::QuotaStore::new(self.pool.clone())
            .add_gpu_seconds(lease.tenant_id, seconds)
            .await
    }

    /// Gives a job back without counting a failed try (graceful shutdown): another worker can
    /// claim it at once.
    pub async fn release(&self, lease: &Lease) -> Result<JobRecord> {
        let record = self
            .transition(
                lease,
                "status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
                 run_after = now(), attempts = greatest(attempts - 1, 0),
                 error = COALESCE($3, error)",
                None,
                &[],
                "status",
            )
            .await?;
        // Idle workers may claim it at once.
        self.notifier.wake(Wake::default().with_queue());
        Ok(record)
    }

    /// Stores one image's description, replacing an earlier one for the same image (a resumed
    /// stage rewrites rather than duplicates).
    pub async fn save_description(&self, lease: &Lease, d: &NewDescription) -> Result<()> {
        let done = sqlx::query(&format!(
            "INSERT INTO descriptions (job_id, idx, text, description_case, model, instruction,
                                       instruction_version, problem)
             SELECT $1, $3, $4, $5, $6, $7, $8, $9 FROM jobs WHERE {FENCE}
             ON CONFLICT (job_id, idx) DO UPDATE SET
                 text = EXCLUDED.text, description_case = EXCLUDED.description_case,
                 model = EXCLUDED.model, instruction = EXCLUDED.instruction,
                 instruction_version = EXCLUDED.instruction_version, problem = EXCLUDED.problem,
                 edited = false, updated_at = now()"
        ))
        .bind(lease.job_id)
        .bind(lease.epoch)
        .bind(d.idx)
        .bind(&d.text)
        .bind(d.case.as_str())
        .bind(&d.model)
        .bind(&d.instruction)
        .bind(&d.instruction_version)
        .bind(&d.problem)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Err(CoreError::LeaseLost);
        }
        Ok(())
    }

    /// Records where photo `idx`'s subject mask came from (its PNG is recorded as an artifact
    /// beside it), replacing an earlier record.
    pub async fn save_mask(
        &self,
        lease: &Lease,
        idx: i32,
        source: MaskSource,
        prompt_box: Option<[f32; 4]>,
        coverage: f32,
    ) -> Result<()> {
        let done = sqlx::query(&format!(
            "INSERT INTO subject_masks (job_id, idx, source, prompt_box, coverage)
             SELECT $1, $3, $4, $5, $6 FROM jobs WHERE {FENCE}
             ON CONFLICT (job_id, idx) DO UPDATE SET
                 source = EXCLUDED.source, prompt_box = EXCLUDED.prompt_box,
                 coverage = EXCLUDED.coverage, updated_at = now()"
        ))
        .bind(lease.job_id)
        .bind(lease.epoch)
        .bind(idx)
        .bind(mask_source_str(source))
        .bind(prompt_box.map(|b| serde_json::json!(b)))
        .bind(coverage)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Err(CoreError::LeaseLost);
        }
        Ok(())
    }

    /// Adds a warning to the job (replacing an earlier one with the same code) and records it as
    /// an event.
    pub async fn warn(&self, lease: &Lease, warning: &JobWarning) -> Result<()> {
        let done = sqlx::query(&fenced_with_event(
            "warnings = (
                 SELECT coalesce(jsonb_agg(w), '[]'::jsonb) FROM jsonb_array_elements(warnings) w
                 WHERE w->>'code' <> $3
             ) || jsonb_build_array($4::jsonb)",
            "warning",
            "$4",
        ))
        .bind(lease.job_id)
        .bind(lease.epoch)
        .bind(&warning.code)
        .bind(serde_json::to_value(warning)?)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Err(CoreError::LeaseLost);
        }
        self.notifier.wake(Wake::job(lease.job_id));
        Ok(())
    }

    /// Records an artifact the worker has stored.
    pub async fn record_artifact(&self, lease: &Lease, a: &NewArtifact) -> Result<()> {
        let done = sqlx::query(&format!(
            "INSERT INTO artifacts (job_id, name, object_key, content_type, size, sha256)
             SELECT $1, $3, $4, $5, $6, $7 FROM jobs WHERE {FENCE}
             ON CONFLICT (job_id, name) DO UPDATE SET
                 object_key = EXCLUDED.object_key, content_type = EXCLUDED.content_type,
                 size = EXCLUDED.size, sha256 = EXCLUDED.sha256, created_at = now()"
        ))
        .bind(lease.job_id)
        .bind(lease.epoch)
        .bind(&a.name)
        .bind(&a.object_key)
        .bind(&a.content_type)
        .bind(a.size)
        .bind(&a.sha256)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Err(CoreError::LeaseLost);
        }
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    #[sqlx(flatten)]
    job: JobRow,
    lease_epoch: i64,
}

impl TryFrom<ClaimRow> for Claimed {
    type Error = CoreError;

    fn try_from(row: ClaimRow) -> Result<Self> {
        let job = JobRecord::try_from(row.job)?;
        Ok(Claimed {
            lease: Lease {
                job_id: job.id,
                tenant_id: job.tenant_id,
                epoch: row.lease_epoch,
            },
            job,
        })
    }
}

/// A row of [`succeed_and_claim_sql`]: the finished job (`claimed` false, no epoch) or the
/// claimed one.
#[derive(sqlx::FromRow)]
struct ChainRow {
    #[sqlx(flatten)]
    job: JobRow,
    lease_epoch: Option<i64>,
    claimed: bool,
}
