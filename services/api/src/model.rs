//! The JSON bodies the API sends and accepts.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sidbooth_core::{Description, SubjectMask};
use sidbooth_domain::{report::MaskSource, DescriptionCase, JobStatus};
use utoipa::ToSchema;
use uuid::Uuid;

pub use sidbooth_core::view::{job_path, Job, JobErrorBody, JobLinks, WarningBody};

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
    /// Optional subject masks: none, or one PNG per photo named with its photo's file stem
    /// (`00.png` for `00.jpg`), white = subject, black = the rest, the photo's shape (any
    /// resolution). Without them, masks are made during describe when the worker has SAM.
    #[schema(value_type = Option<Vec<String>>, format = Binary, content_media_type = "image/png")]
    pub masks: Option<Vec<Vec<u8>>>,
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
    /// CLIP tokens of the text, start and end tokens included.
    pub tokens: u32,
    /// What the text encoder reads; anything after that never trains.
    pub token_limit: u32,
    /// The words the text encoder does not read, when the text is longer than `token_limit`.
    pub cut: Option<String>,
    /// The photo's subject mask, once describe made it (or it was uploaded).
    pub mask: Option<MaskBody>,
    pub updated_at: DateTime<Utc>,
}

/// A photo's subject mask.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MaskBody {
    /// The artifact name, `masks/00.png`.
    pub artifact: String,
    /// A presigned GET URL of the PNG (white = subject).
    pub url: Option<String>,
    pub source: MaskSource,
    /// The box SAM was prompted with, in pixels of the photo: `[x0, y0, x1, y1]`.
    pub prompt_box: Option<Vec<f32>>,
    /// Share of the photo the mask covers.
    pub coverage: f32,
    pub updated_at: DateTime<Utc>,
    /// Where to `PUT` a replacement PNG while the job awaits review.
    pub replace: String,
}

impl MaskBody {
    pub fn new(job_id: Uuid, mask: SubjectMask, url: Option<String>) -> Self {
        Self {
            artifact: sidbooth_core::mask_artifact_name(mask.idx),
            url,
            source: mask.source,
            prompt_box: mask.prompt_box.map(|b| b.to_vec()),
            coverage: mask.coverage,
            updated_at: mask.updated_at,
            replace: format!("{}/masks/{}", job_path(job_id), mask.idx),
        }
    }
}

impl DescriptionBody {
    pub fn new(d: Description, file_name: String, mask: Option<MaskBody>) -> Self {
        let count = sidbooth_tokenizer::count_tokens(&d.text);
        Self {
            tokens: count.tokens as u32,
            token_limit: sidbooth_tokenizer::CONTEXT_LENGTH as u32,
            cut: count.cut,
            mask,
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
