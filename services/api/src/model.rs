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
/// Any other part is refused, which `deny_unknown_fields` tells the document.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct CreateJobForm {
    /// The job spec, a JSON object (`JobSpec`), sent as a part of type `application/json`.
    #[schema(value_type = sidbooth_domain::JobSpec)]
    pub spec: String,
    /// 1 to 7 photos, JPEG, PNG or WebP, each at most 20 MiB.
    #[schema(value_type = Vec<String>, format = Binary, content_media_type = "application/octet-stream", min_items = 1, max_items = 7)]
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
    /// The image's position in upload order (JSON Schema's integer: `2.0` counts too).
    #[serde(deserialize_with = "integral")]
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

/// A webhook endpoint to register.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Where events are POSTed: an http(s) URL on a public address.
    #[schema(example = "https://example.com/sidbooth-events")]
    pub url: String,
    /// Event types to deliver (`job.queued`, `job.running`, `job.awaiting_review`,
    /// `job.succeeded`, `job.failed`, `job.canceled`); all of them when absent.
    pub events: Option<Vec<String>>,
}

/// A registered webhook endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// Its delivery log.
    pub deliveries: String,
}

impl From<sidbooth_core::webhooks::Endpoint> for Webhook {
    fn from(e: sidbooth_core::webhooks::Endpoint) -> Self {
        Self {
            deliveries: format!("/v1/webhooks/{}/deliveries", e.id),
            id: e.id,
            url: e.url,
            events: e.events,
            created_at: e.created_at,
        }
    }
}

/// A webhook endpoint just registered, with its signing secret (shown this once).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedWebhook {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    /// `whsec_` + base64 key: verify `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
    /// `webhook-id.webhook-timestamp.body`, keyed with the decoded key), as the Standard
    /// Webhooks libraries do. It is not shown again.
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub deliveries: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Webhooks {
    pub webhooks: Vec<Webhook>,
}

/// What every delivery's body holds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookEvent {
    /// `job.<status>`.
    #[serde(rename = "type")]
    #[schema(example = "job.succeeded")]
    pub type_: String,
    pub timestamp: DateTime<Utc>,
    /// The job as `GET /v1/jobs/{id}` returns it, right after the change.
    pub data: Job,
}

/// One event for one endpoint, with every try.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryBody {
    pub id: i64,
    /// The `webhook-id` header, the same on every try: receivers drop repeats by it.
    pub message_id: String,
    pub event_type: String,
    pub job_id: Uuid,
    /// `pending` (the next try is due at `next_attempt_at`), `delivered` or `failed` (the
    /// retry window passed).
    #[schema(example = "delivered")]
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub tries: Vec<DeliveryTry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryTry {
    pub attempted_at: DateTime<Utc>,
    /// The endpoint's HTTP status; null when it did not answer.
    pub response_status: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

impl From<sidbooth_core::webhooks::Delivery> for DeliveryBody {
    fn from(d: sidbooth_core::webhooks::Delivery) -> Self {
        use sidbooth_core::webhooks::DeliveryStatus;
        Self {
            id: d.id,
            message_id: d.message_id,
            event_type: d.event_type,
            job_id: d.job_id,
            status: match d.status {
                DeliveryStatus::Pending => "pending",
                DeliveryStatus::Delivered => "delivered",
                DeliveryStatus::Failed => "failed",
            }
            .to_owned(),
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at,
            created_at: d.created_at,
            finished_at: d.finished_at,
            tries: d
                .tries
                .into_iter()
                .map(|t| DeliveryTry {
                    attempted_at: t.attempted_at,
                    response_status: t.response_status,
                    error: t.error,
                    duration_ms: t.duration_ms,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Deliveries {
    pub deliveries: Vec<DeliveryBody>,
}

/// A signed URL of a job's event stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventsUrl {
    /// `/v1/jobs/{id}/events?token=…`, relative to the API; needs no key.
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// The tenant's limits in force; null is no limit.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TenantLimits {
    pub max_queued_jobs: Option<u32>,
    pub max_running_jobs: Option<u32>,
    /// Wall seconds of train, generate and evaluate per UTC day.
    pub gpu_seconds_per_day: Option<f64>,
    pub job_posts_per_minute: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TenantUsage {
    pub queued_jobs: i64,
    pub running_jobs: i64,
    pub gpu_seconds_today: f64,
    /// The UTC day `gpu_seconds_today` counts.
    pub day: chrono::NaiveDate,
    pub day_resets_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageBody {
    pub limits: TenantLimits,
    pub usage: TenantUsage,
}

/// A `u32` that JSON may write as an integral float (`3.0`), which JSON Schema calls an
/// integer too, so every value the document allows is accepted.
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = f64::deserialize(d)?;
    if n.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&n) {
        Ok(n as u32)
    } else {
        Err(serde::de::Error::custom(format!(
            "expected a whole number from 0 to {}, got {n}",
            u32::MAX
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_may_be_written_as_an_integral_float() {
        let parse = |json: &str| serde_json::from_str::<DescriptionEdit>(json).map(|e| e.index);
        assert_eq!(parse(r#"{"index": 2, "text": "t"}"#).unwrap(), 2);
        assert_eq!(parse(r#"{"index": 2.0, "text": "t"}"#).unwrap(), 2);
        for bad in ["2.5", "-1", "4294967296", "\"2\""] {
            assert!(
                parse(&format!(r#"{{"index": {bad}, "text": "t"}}"#)).is_err(),
                "{bad}"
            );
        }
    }
}
