//! The job store: what the API reads and writes on behalf of a tenant. Every query that takes a
//! tenant filters by it, so another tenant's job is indistinguishable from a missing one.
//!
//! Writes a worker makes while it holds a job live in [`crate::queue`], fenced by its lease.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sidbooth_domain::{report::MaskSource, DescriptionCase, JobSpec, JobStatus, Stage};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::{
    columns::JOB_COLUMNS,
    error::{CoreError, Result},
    events::{self, JobEvent, Notifier},
};

/// Why a job failed (or the last transient error before a retry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// Stable, machine-readable cause, e.g. "vlm_unavailable", "description_invalid".
    pub code: String,
    pub message: String,
    /// The stage it happened in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
}

#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub spec: JobSpec,
    pub status: JobStatus,
    pub stage: Option<Stage>,
    pub progress: f32,
    pub stages_done: Vec<Stage>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    pub error: Option<JobError>,
    /// What the user should know that did not fail the job, one per code.
    pub warnings: Vec<JobWarning>,
    pub image_count: i32,
    pub run_after: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl JobRecord {
    /// The first stage of the spec that has not finished: where a (re)claimed job resumes.
    pub fn next_stage(&self) -> Option<Stage> {
        self.spec
            .ordered_stages()
            .into_iter()
            .find(|stage| !self.stages_done.contains(stage))
    }
}

/// Something a stage wants the user to know without failing the job (no masks could be made,
/// a description is longer than the text encoder reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobWarning {
    /// Stable, machine-readable, e.g. "masks_unavailable".
    pub code: String,
    pub message: String,
    pub stage: Stage,
}

/// A `jobs` row as queries return it, or as `to_jsonb` of one (a webhook message's snapshot).
#[derive(sqlx::FromRow, Deserialize)]
pub(crate) struct JobRow {
    pub(crate) id: Uuid,
    tenant_id: Uuid,
    spec: serde_json::Value,
    status: String,
    stage: Option<String>,
    progress: f32,
    stages_done: Vec<String>,
    attempts: i32,
    max_attempts: i32,
    cancel_requested: bool,
    error: Option<serde_json::Value>,
    warnings: serde_json::Value,
    image_count: i32,
    run_after: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

fn parse_stage(s: &str) -> Result<Stage> {
    Stage::parse(s).ok_or_else(|| CoreError::Corrupt(format!("unknown stage {s:?}")))
}

impl TryFrom<JobRow> for JobRecord {
    type Error = CoreError;

    fn try_from(row: JobRow) -> Result<Self> {
        Ok(JobRecord {
            id: row.id,
            tenant_id: row.tenant_id,
            spec: serde_json::from_value(row.spec)?,
            status: row
                .status
                .parse()
                .map_err(|e: sidbooth_domain::ParseStatusError| {
                    CoreError::Corrupt(e.to_string())
                })?,
            stage: row.stage.as_deref().map(parse_stage).transpose()?,
            progress: row.progress,
            stages_done: row
                .stages_done
                .iter()
                .map(|s| parse_stage(s))
                .collect::<Result<_>>()?,
            attempts: row.attempts,
            max_attempts: row.max_attempts,
            cancel_requested: row.cancel_requested,
            error: row.error.map(serde_json::from_value).transpose()?,
            warnings: serde_json::from_value(row.warnings)?,
            image_count: row.image_count,
            run_after: row.run_after,
            created_at: row.created_at,
            updated_at: row.updated_at,
            finished_at: row.finished_at,
        })
    }
}

/// An uploaded image, already stored under `object_key`.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub file_name: String,
    pub object_key: String,
    /// The subject mask uploaded beside the photo, already stored there.
    pub mask_object_key: Option<String>,
    pub content_type: String,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobImage {
    pub idx: i32,
    pub file_name: String,
    pub object_key: String,
    pub content_type: String,
    pub sha256: String,
    pub width: i32,
    pub height: i32,
    pub bytes: i64,
    /// The subject mask the user uploaded with the photo.
    pub mask_object_key: Option<String>,
}

/// The artifact name of photo `idx`'s subject mask.
pub fn mask_artifact_name(idx: i32) -> String {
    format!("masks/{idx:02}.png")
}

/// Where a photo's subject mask came from (its PNG is the artifact [`mask_artifact_name`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubjectMask {
    pub idx: i32,
    pub source: MaskSource,
    /// The box SAM was prompted with, in pixels of the photo.
    pub prompt_box: Option<[f32; 4]>,
    /// Share of the photo the mask covers.
    pub coverage: f32,
    pub updated_at: DateTime<Utc>,
}

pub(crate) fn mask_source_str(source: MaskSource) -> &'static str {
    match source {
        MaskSource::Uploaded => "uploaded",
        MaskSource::SamVlmBox => "sam_vlm_box",
        MaskSource::SamClipRanked => "sam_clip_ranked",
    }
}

#[derive(sqlx::FromRow)]
struct MaskRow {
    idx: i32,
    source: String,
    prompt_box: Option<serde_json::Value>,
    coverage: f32,
    updated_at: DateTime<Utc>,
}

impl TryFrom<MaskRow> for SubjectMask {
    type Error = CoreError;
    fn try_from(r: MaskRow) -> Result<Self> {
        Ok(SubjectMask {
            idx: r.idx,
            source: serde_json::from_value(serde_json::Value::String(r.source))?,
            prompt_box: r.prompt_box.map(serde_json::from_value).transpose()?,
            coverage: r.coverage,
            updated_at: r.updated_at,
        })
    }
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub spec: JobSpec,
    pub images: Vec<NewImage>,
    pub idempotency_key: Option<String>,
    /// Hash of the whole request, to tell a retried request from a different one under the same
    /// idempotency key.
    pub request_hash: Vec<u8>,
    pub max_attempts: i32,
}

/// What a create did: a new job, or the job an earlier request with the same idempotency key made.
#[derive(Debug, Clone)]
pub enum Created {
    New(JobRecord),
    Existing(JobRecord),
}

#[derive(Debug, Clone, Serialize)]
pub struct Description {
    pub idx: i32,
    pub text: String,
    pub case: DescriptionCase,
    pub model: String,
    pub instruction: String,
    pub instruction_version: String,
    pub problem: Option<serde_json::Value>,
    pub edited: bool,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct DescriptionRow {
    idx: i32,
    text: String,
    description_case: String,
    model: String,
    instruction: String,
    instruction_version: String,
    problem: Option<serde_json::Value>,
    edited: bool,
    updated_at: DateTime<Utc>,
}

impl TryFrom<DescriptionRow> for Description {
    type Error = CoreError;
    fn try_from(r: DescriptionRow) -> Result<Self> {
        Ok(Description {
            idx: r.idx,
            text: r.text,
            case: serde_json::from_value(serde_json::Value::String(r.description_case))?,
            model: r.model,
            instruction: r.instruction,
            instruction_version: r.instruction_version,
            problem: r.problem,
            edited: r.edited,
            updated_at: r.updated_at,
        })
    }
}

/// A description a worker wrote for one image.
#[derive(Debug, Clone)]
pub struct NewDescription {
    pub idx: i32,
    pub text: String,
    pub case: DescriptionCase,
    pub model: String,
    pub instruction: String,
    pub instruction_version: String,
    /// Set when validation failed and the text needs a reviewer.
    pub problem: Option<serde_json::Value>,
}

/// An artifact stored in storage, to be recorded.
#[derive(Debug, Clone, Serialize)]
pub struct NewArtifact {
    pub name: String,
    pub object_key: String,
    pub content_type: String,
    pub size: i64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Artifact {
    pub name: String,
    pub object_key: String,
    pub content_type: String,
    pub size: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
}

pub struct ListPage {
    pub jobs: Vec<JobRecord>,
    /// Pass as `before` to get the next (older) page; None on the last page.
    pub next_cursor: Option<Uuid>,
}

#[derive(Clone, Debug)]
pub struct JobStore {
    pool: PgPool,
    notifier: Notifier,
}

impl JobStore {
    pub fn new(pool: PgPool) -> Self {
        Self {
            notifier: Notifier::new(pool.clone()),
            pool,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The job an earlier request made under this idempotency key, with its request hash.
    pub async fn find_by_idempotency_key(
        &self,
        tenant: Uuid,
        key: &str,
    ) -> Result<Option<(JobRecord, Vec<u8>)>> {
        let row: Option<(Uuid, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT id, request_hash FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2",
        )
        .bind(tenant)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((id, hash)) => Ok(Some((
                self.get(tenant, id).await?,
                hash.unwrap_or_default(),
            ))),
            None => Ok(None),
        }
    }

    /// Inserts a job and its images in one transaction, queued, and wakes a worker. When another
    /// request with the same idempotency key won a race, returns that job instead.
    #[tracing::instrument(skip_all, fields(job_id = %job.id))]
    pub async fn create(&self, job: NewJob) -> Result<Created> {
        let mut tx = self.pool.begin().await?;
        let first_stage = job.spec.ordered_stages().first().map(|s| s.as_str());
        let inserted: Option<JobRow> = sqlx::query_as(&format!(
            "INSERT INTO jobs (id, tenant_id, spec, status, stage, max_attempts, idempotency_key,
                               request_hash, image_count)
             VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8)
             ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(job.id)
        .bind(job.tenant_id)
        .bind(serde_json::to_value(&job.spec)?)
        .bind(first_stage)
        .bind(job.max_attempts)
        .bind(&job.idempotency_key)
        .bind(&job.request_hash)
        .bind(job.images.len() as i32)
        .fetch_optional(&mut *tx)
        .await?;

        let Some(row) = inserted else {
            tx.rollback().await?;
            let key = job.idempotency_key.as_deref().unwrap_or_default();
            return match self.find_by_idempotency_key(job.tenant_id, key).await? {
                Some((existing, hash)) if hash == job.request_hash => {
                    Ok(Created::Existing(existing))
                }
                Some(_) => Err(CoreError::IdempotencyMismatch),
                None => Err(CoreError::Conflict(
                    "concurrent request with the same key".into(),
                )),
            };
        };

        for (idx, image) in job.images.iter().enumerate() {
            sqlx::query(
                "INSERT INTO job_images (job_id, idx, file_name, object_key, content_type, sha256,
                                         width, height, bytes, mask_object_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(job.id)
            .bind(idx as i32)
            .bind(&image.file_name)
            .bind(&image.object_key)
            .bind(&image.content_type)
            .bind(&image.sha256)
            .bind(image.width as i32)
            .bind(image.height as i32)
            .bind(image.bytes as i64)
            .bind(&image.mask_object_key)
            .execute(&mut *tx)
            .await?;
        }
        let record = JobRecord::try_from(row)?;
        let wake = events::record_status(&mut *tx, &record).await?;
        tx.commit().await?;
        self.notifier.wake(wake.with_queue());
        Ok(Created::New(record))
    }

    pub async fn get(&self, tenant: Uuid, id: Uuid) -> Result<JobRecord> {
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND tenant_id = $2"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or(CoreError::NotFound)?.try_into()
    }

    /// A job with the file names of its images, in one round trip (the API's most frequent read).
    pub async fn get_with_image_names(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<(JobRecord, Vec<String>)> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            job: JobRow,
            image_names: Vec<String>,
        }
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS},
                    ARRAY(SELECT file_name FROM job_images i WHERE i.job_id = jobs.id
                          ORDER BY i.idx) AS image_names
             FROM jobs WHERE id = $1 AND tenant_id = $2"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        let row = row.ok_or(CoreError::NotFound)?;
        Ok((row.job.try_into()?, row.image_names))
    }

    /// Newest first. `before` is the cursor of the previous page.
    pub async fn list(
        &self,
        tenant: Uuid,
        status: Option<JobStatus>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<ListPage> {
        let limit = limit.clamp(1, 200) as i64;
        let rows: Vec<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE tenant_id = $1
               AND ($2::text IS NULL OR status = $2)
               AND ($3::uuid IS NULL OR id < $3)
             ORDER BY id DESC
             LIMIT $4"
        ))
        .bind(tenant)
        .bind(status.map(|s| s.as_str()))
        .bind(before)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut jobs = rows
            .into_iter()
            .map(JobRecord::try_from)
            .collect::<Result<Vec<_>>>()?;
        let next_cursor = if jobs.len() as i64 > limit {
            jobs.truncate(limit as usize);
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Ok(ListPage { jobs, next_cursor })
    }

    pub async fn images(&self, job_id: Uuid) -> Result<Vec<JobImage>> {
        Ok(sqlx::query_as(
            "SELECT idx, file_name, object_key, content_type, sha256, width, height, bytes,
                    mask_object_key
             FROM job_images WHERE job_id = $1 ORDER BY idx",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// File names of the images of several jobs, each in upload order (for listings).
    pub async fn image_names(
        &self,
        job_ids: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, Vec<String>>> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT job_id, file_name FROM job_images WHERE job_id = ANY($1) ORDER BY job_id, idx",
        )
        .bind(job_ids)
        .fetch_all(&self.pool)
        .await?;
        let mut names = std::collections::HashMap::<Uuid, Vec<String>>::new();
        for (job, name) in rows {
            names.entry(job).or_default().push(name);
        }
        Ok(names)
    }

    pub async fn descriptions(&self, job_id: Uuid) -> Result<Vec<Description>> {
        let rows: Vec<DescriptionRow> = sqlx::query_as(
            "SELECT idx, text, description_case, model, instruction, instruction_version, problem,
                    edited, updated_at
             FROM descriptions WHERE job_id = $1 ORDER BY idx",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Description::try_from).collect()
    }

    /// The subject masks made (or uploaded) so far, by image index.
    pub async fn masks(&self, job_id: Uuid) -> Result<Vec<SubjectMask>> {
        let rows: Vec<MaskRow> = sqlx::query_as(
            "SELECT idx, source, prompt_box, coverage, updated_at
             FROM subject_masks WHERE job_id = $1 ORDER BY idx",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(SubjectMask::try_from).collect()
    }

    /// Replaces photo `idx`'s subject mask with one the user uploaded while the job awaits
    /// review: the artifact now points at `artifact`'s object (already stored) and the mask's
    /// source becomes `uploaded`. Returns the object key it replaced, for the caller to delete.
    #[tracing::instrument(skip(self, artifact))]
    pub async fn replace_mask(
        &self,
        tenant: Uuid,
        id: Uuid,
        idx: i32,
        coverage: f32,
        artifact: &NewArtifact,
    ) -> Result<Option<String>> {
        let mut tx = self.pool.begin().await?;
        let job = Self::lock(&mut tx, tenant, id).await?;
        if job.status != JobStatus::AwaitingReview {
            return refuse(
                tx,
                CoreError::Conflict(format!(
                    "masks can be replaced only while the job is awaiting_review; it is {}",
                    job.status
                )),
            )
            .await;
        }
        if idx < 0 || idx >= job.image_count {
            return refuse(
                tx,
                CoreError::Conflict(format!("the job has no image with index {idx}")),
            )
            .await;
        }
        let previous: Option<String> =
            sqlx::query_scalar("SELECT object_key FROM artifacts WHERE job_id = $1 AND name = $2")
                .bind(id)
                .bind(&artifact.name)
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO artifacts (job_id, name, object_key, content_type, size, sha256)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (job_id, name) DO UPDATE SET
                 object_key = EXCLUDED.object_key, content_type = EXCLUDED.content_type,
                 size = EXCLUDED.size, sha256 = EXCLUDED.sha256, created_at = now()",
        )
        .bind(id)
        .bind(&artifact.name)
        .bind(&artifact.object_key)
        .bind(&artifact.content_type)
        .bind(artifact.size)
        .bind(&artifact.sha256)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO subject_masks (job_id, idx, source, prompt_box, coverage)
             VALUES ($1, $2, 'uploaded', NULL, $3)
             ON CONFLICT (job_id, idx) DO UPDATE SET
                 source = 'uploaded', prompt_box = NULL, coverage = EXCLUDED.coverage, updated_at = now()",
        )
        .bind(id)
        .bind(idx)
        .bind(coverage)
        .execute(&mut *tx)
        .await?;
        let wake = events::record(
            &mut *tx,
            id,
            "mask_replaced",
            serde_json::json!({ "index": idx, "artifact": artifact.name }),
        )
        .await?;
        tx.commit().await?;
        self.notifier.wake(wake);
        Ok(previous.filter(|k| *k != artifact.object_key))
    }

    /// Locks a tenant's job for a state change made by the API.
    async fn lock(tx: &mut Transaction<'_, Postgres>, tenant: Uuid, id: Uuid) -> Result<JobRecord> {
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND tenant_id = $2 FOR UPDATE"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&mut **tx)
        .await?;
        row.ok_or(CoreError::NotFound)?.try_into()
    }

    /// Replaces the texts of some descriptions while the job awaits review. The caller has
    /// validated the texts; an edit clears the problem the worker recorded.
    #[tracing::instrument(skip(self, edits))]
    pub async fn edit_descriptions(
        &self,
        tenant: Uuid,
        id: Uuid,
        edits: &[(i32, String)],
    ) -> Result<Vec<Description>> {
        let mut tx = self.pool.begin().await?;
        let job = Self::lock(&mut tx, tenant, id).await?;
        if job.status != JobStatus::AwaitingReview {
            return refuse(
                tx,
                CoreError::Conflict(format!(
                    "descriptions can be edited only while the job is awaiting_review; it is {}",
                    job.status
                )),
            )
            .await;
        }
        for (idx, text) in edits {
            let done = sqlx::query(
                "UPDATE descriptions SET text = $3, edited = true, problem = NULL, updated_at = now()
                 WHERE job_id = $1 AND idx = $2",
            )
            .bind(id)
            .bind(idx)
            .bind(text)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return refuse(
                    tx,
                    CoreError::Conflict(format!("the job has no image with index {idx}")),
                )
                .await;
            }
        }
        let wake = events::record(
            &mut *tx,
            id,
            "descriptions_edited",
            serde_json::json!({ "indexes": edits.iter().map(|(i, _)| i).collect::<Vec<_>>() }),
        )
        .await?;
        tx.commit().await?;
        self.notifier.wake(wake);
        self.descriptions(id).await
    }

    /// Continues a job that awaits review. Refused while any description still has a problem.
    #[tracing::instrument(skip(self))]
    pub async fn approve(&self, tenant: Uuid, id: Uuid) -> Result<JobRecord> {
        let mut tx = self.pool.begin().await?;
        let job = Self::lock(&mut tx, tenant, id).await?;
        if job.status != JobStatus::AwaitingReview {
            return refuse(
                tx,
                CoreError::Conflict(format!(
                    "only a job awaiting_review can be approved; it is {}",
                    job.status
                )),
            )
            .await;
        }
        let (written, with_problem): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE problem IS NOT NULL)
             FROM descriptions WHERE job_id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if written != job.image_count as i64 || with_problem > 0 {
            return refuse(
                tx,
                CoreError::Conflict(format!(
                "{with_problem} description(s) still have a problem; edit them before approving"
            )),
            )
            .await;
        }
        let row: JobRow = sqlx::query_as(&format!(
            "UPDATE jobs SET status = 'queued', run_after = now(), attempts = 0, updated_at = now()
             WHERE id = $1 RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let record = JobRecord::try_from(row)?;
        let wake = events::record_status(&mut *tx, &record).await?;
        tx.commit().await?;
        self.notifier.wake(wake.with_queue());
        Ok(record)
    }

    /// Cancels a job. A job no worker holds is canceled at once; a running one is flagged and its
    /// worker stops within a heartbeat. Canceling a finished job is a conflict.
    #[tracing::instrument(skip(self))]
    pub async fn cancel(&self, tenant: Uuid, id: Uuid) -> Result<JobRecord> {
        let mut tx = self.pool.begin().await?;
        let job = Self::lock(&mut tx, tenant, id).await?;
        if job.status.is_terminal() {
            return refuse(
                tx,
                CoreError::Conflict(format!("the job has already finished ({})", job.status)),
            )
            .await;
        }
        let row: JobRow = sqlx::query_as(&format!(
            "UPDATE jobs SET cancel_requested = true,
                    status = CASE WHEN status = 'running' THEN status ELSE 'canceled' END,
                    finished_at = CASE WHEN status = 'running' THEN NULL ELSE now() END,
                    lease_owner = CASE WHEN status = 'running' THEN lease_owner ELSE NULL END,
                    updated_at = now()
             WHERE id = $1 RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let record = JobRecord::try_from(row)?;
        let kind = if record.status == JobStatus::Canceled {
            "status"
        } else {
            "cancel_requested"
        };
        let wake = events::record_change(&mut *tx, id, kind).await?;
        tx.commit().await?;
        self.notifier.wake(wake);
        Ok(record)
    }

    /// Deletes a job's rows (images, descriptions, artifacts and events cascade) and returns the
    /// record so the caller can remove its objects from storage.
    #[tracing::instrument(skip(self))]
    pub async fn delete(&self, tenant: Uuid, id: Uuid) -> Result<JobRecord> {
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "DELETE FROM jobs WHERE id = $1 AND tenant_id = $2 RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or(CoreError::NotFound)?.try_into()
    }

    pub async fn artifacts(&self, job_id: Uuid) -> Result<Vec<Artifact>> {
        Ok(sqlx::query_as(
            "SELECT name, object_key, content_type, size, sha256, created_at
             FROM artifacts WHERE job_id = $1 ORDER BY name",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn events_since(&self, job_id: Uuid, after_id: i64) -> Result<Vec<JobEvent>> {
        events::since(&self.pool, job_id, after_id).await
    }

    /// Jobs per status, for metrics.
    pub async fn status_counts(&self) -> Result<Vec<(JobStatus, i64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(s, n)| {
                s.parse::<JobStatus>()
                    .map(|s| (s, n))
                    .map_err(|e| CoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// A cached VLM answer.
    pub async fn cached_description(&self, cache_key: &str) -> Result<Option<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT text, model FROM vlm_cache WHERE cache_key = $1")
                .bind(cache_key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn cache_description(&self, cache_key: &str, text: &str, model: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO vlm_cache (cache_key, text, model) VALUES ($1, $2, $3)
             ON CONFLICT (cache_key) DO UPDATE SET text = EXCLUDED.text, model = EXCLUDED.model",
        )
        .bind(cache_key)
        .bind(text)
        .bind(model)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Rolls `tx` back, then answers `refusal`. A transaction only dropped is rolled back when its
/// connection is next used, and holds its row locks until then: a worker's claim meanwhile
/// skips the locked job as if it were taken.
async fn refuse<T>(tx: Transaction<'_, Postgres>, refusal: CoreError) -> Result<T> {
    tx.rollback().await?;
    Err(refusal)
}
