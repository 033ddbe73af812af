//! The JSON bodies the API sends and accepts.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sidbooth_core::{Description, JobRecord};
use sidbooth_domain::{DescriptionCase, JobSpec, JobStatus, Stage};
use utoipa::ToSchema;
use uuid::Uuid;

/// The path of a job; its links hang below it.
pub fn job_path(id: Uuid) -> String {
    format!("/v1/jobs/{id}")
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub status: JobStatus,
    /// The stage running now, or the next to run while queued; null when finished.
    pub stage: Option<Stage>,
    /// Progress of the current stage, 0 to 1.
    pub progress: f32,
    pub stages_done: Vec<Stage>,
    /// Tries of the current stage so far.
    pub attempts: i32,
    pub error: Option<JobErrorBody>,
    /// The spec as accepted, normalised (defaults filled in, class lower-cased, manual texts
    /// repaired).
    pub spec: JobSpec,
    pub image_count: i32,
    /// File names of the uploaded images, in upload order.
    pub images: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub links: JobLinks,
}

impl Job {
    pub fn new(record: JobRecord, images: Vec<String>) -> Self {
        Self {
            links: JobLinks::for_job(record.id),
            id: record.id,
            status: record.status,
            stage: record.stage,
            progress: record.progress,
            stages_done: record.stages_done,
            attempts: record.attempts,
            error: record.error.map(|e| JobErrorBody {
                code: e.code,
                message: e.message,
                stage: e.stage,
            }),
            spec: record.spec,
            image_count: record.image_count,
            images,
            created_at: record.created_at,
            updated_at: record.updated_at,
            finished_at: record.finished_at,
        }
    }
}

/// Why a job failed, or the last transient error before a retry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobErrorBody {
    /// Stable machine-readable cause, e.g. `vlm_unavailable`.
    pub code: String,
    pub message: String,
    pub stage: Option<Stage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobLinks {
    #[serde(rename = "self")]
    pub self_: String,
    pub events: String,
    pub artifacts: String,
    pub descriptions: String,
}

impl JobLinks {
    pub fn for_job(id: Uuid) -> Self {
        let base = job_path(id);
        Self {
            events: format!("{base}/events"),
            artifacts: format!("{base}/artifacts"),
            descriptions: format!("{base}/descriptions"),
            self_: base,
        }
    }
}

/// One page of jobs, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The multipart body of `POST /v1/jobs` (for documentation; parts are read as a stream).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CreateJobForm {
    /// The job spec as JSON (`JobSpec`).
    #[schema(value_type = String, content_media_type = "application/json")]
    pub spec: String,
    /// 1 to 7 photos, JPEG, PNG or WebP, each at most 20 MiB.
    #[schema(value_type = Vec<String>, format = Binary, content_media_type = "application/octet-stream")]
    pub images: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DescriptionBody {
    /// The image's position in upload order.
    pub index: i32,
    pub file_name: String,
    pub text: String,
    pub case: DescriptionCase,
    /// The model that wrote it (`manual` or `fixed` when none did).
    pub model: String,
    pub instruction_version: String,
    /// A validation problem the worker could not repair: `{code, message}`. Edit the text to
    /// clear it.
    pub problem: Option<serde_json::Value>,
    /// Whether a user edited the text.
    pub edited: bool,
    pub updated_at: DateTime<Utc>,
}

impl DescriptionBody {
    pub fn new(d: Description, file_name: String) -> Self {
        Self {
            index: d.idx,
            file_name,
            text: d.text,
            case: d.case,
            model: d.model,
            instruction_version: d.instruction_version,
            problem: d.problem,
            edited: d.edited,
            updated_at: d.updated_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Descriptions {
    pub job_id: Uuid,
    pub status: JobStatus,
    pub descriptions: Vec<DescriptionBody>,
}

/// New texts for some of a job's descriptions.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditDescriptions {
    pub descriptions: Vec<DescriptionEdit>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DescriptionEdit {
    pub index: u32,
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ArtifactBody {
    pub name: String,
    /// Size in bytes.
    pub size: i64,
    pub content_type: String,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// A presigned GET URL; anyone holding it can download the artifact until `expires_at`.
    pub url: String,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Artifacts {
    pub artifacts: Vec<ArtifactBody>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    #[schema(example = "ready")]
    pub status: String,
    pub postgres: String,
    pub storage: String,
}
