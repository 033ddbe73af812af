//! The job as the API shows it (`GET /v1/jobs/{id}`), built from its record. Webhook
//! deliveries carry the same body, so it lives beside the store that writes both.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sidbooth_domain::{JobSpec, JobStatus, Stage};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{JobRecord, JobWarning};

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
    /// What the job wants you to know without failing: no subject masks could be made, a
    /// description is cut by the text encoder, ...
    pub warnings: Vec<WarningBody>,
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
            warnings: record.warnings.into_iter().map(WarningBody::from).collect(),
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

/// Something a stage wants the user to know without failing the job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WarningBody {
    /// Stable machine-readable code, e.g. `masks_unavailable`.
    pub code: String,
    pub message: String,
    pub stage: Stage,
}

impl From<JobWarning> for WarningBody {
    fn from(w: JobWarning) -> Self {
        Self {
            code: w.code,
            message: w.message,
            stage: w.stage,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobLinks {
    #[serde(rename = "self")]
    pub self_: String,
    pub events: String,
    pub artifacts: String,
    pub descriptions: String,
    /// `report.json`, or `report.html` with `Accept: text/html`, once the evaluate stage ran.
    pub report: String,
}

impl JobLinks {
    pub fn for_job(id: Uuid) -> Self {
        let base = job_path(id);
        Self {
            events: format!("{base}/events"),
            artifacts: format!("{base}/artifacts"),
            descriptions: format!("{base}/descriptions"),
            report: format!("{base}/report"),
            self_: base,
        }
    }
}
