//! Reading and editing a job's descriptions during review.

use std::collections::BTreeSet;

use axum::{
    extract::{rejection::JsonRejection, State},
    Extension, Json,
};
use sidbooth_core::Description;
use sidbooth_describe::{validate_description, DescriptionRules};
use sidbooth_domain::JobStatus;
use uuid::Uuid;

use crate::{
    auth::Tenant,
    error::{ApiError, FieldError, Problem},
    handlers::JobId,
    model::{DescriptionBody, Descriptions, EditDescriptions, MaskBody},
    state::AppState,
};

/// axum's default body limit, which JSON routes keep.
const JSON_BODY_LIMIT: u64 = 2 * 1024 * 1024;

pub(crate) async fn body(
    state: &AppState,
    job_id: Uuid,
    status: JobStatus,
    descriptions: Vec<Description>,
) -> Result<Descriptions, ApiError> {
    let images = state.jobs().images(job_id).await?;
    let mut masks = state.jobs().masks(job_id).await?;
    let artifacts = state.jobs().artifacts(job_id).await?;
    let mut bodies = Vec::with_capacity(descriptions.len());
    for d in descriptions {
        let file_name = images
            .iter()
            .find(|i| i.idx == d.idx)
            .map(|i| i.file_name.clone())
            .unwrap_or_default();
        let mask = match masks.iter().position(|m| m.idx == d.idx) {
            Some(at) => {
                let mask = masks.swap_remove(at);
                let name = sidbooth_core::mask_artifact_name(mask.idx);
                let url = match artifacts.iter().find(|a| a.name == name) {
                    Some(a) => Some(state.storage().presign_get(&a.object_key).await?),
                    None => None,
                };
                Some(MaskBody::new(job_id, mask, url))
            }
            None => None,
        };
        bodies.push(DescriptionBody::new(d, file_name, mask));
    }
    let descriptions = bodies;
    Ok(Descriptions {
        job_id,
        status,
        descriptions,
    })
}

/// The descriptions written so far, one per image.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/descriptions",
    operation_id = "getDescriptions",
    tag = "descriptions",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The descriptions", body = Descriptions),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
) -> Result<Json<Descriptions>, ApiError> {
    let job = state.jobs().get(tenant, id).await?;
    let descriptions = state.jobs().descriptions(id).await?;
    Ok(Json(body(&state, id, job.status, descriptions).await?))
}

/// Edit some descriptions while the job awaits review. Each text is validated like model
/// output (and lightly repaired); a text that fails is refused with its validator code.
#[utoipa::path(
    put,
    path = "/v1/jobs/{id}/descriptions",
    operation_id = "editDescriptions",
    tag = "descriptions",
    params(("id" = Uuid, Path, description = "Job id")),
    request_body(content = EditDescriptions, content_type = "application/json"),
    responses(
        (status = 200, description = "All descriptions after the edit", body = Descriptions),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job is not awaiting review", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A text failed validation; `errors` has one entry per text with the validator's code", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn edit(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
    edits: Result<Json<EditDescriptions>, JsonRejection>,
) -> Result<Json<Descriptions>, ApiError> {
    let Json(edits) = edits.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::RequestTooLarge {
                max: JSON_BODY_LIMIT,
            }
        } else {
            ApiError::InvalidRequest(e.body_text())
        }
    })?;
    let job = state.jobs().get(tenant, id).await?;
    if job.status != JobStatus::AwaitingReview {
        return Err(ApiError::Conflict(format!(
            "descriptions can be edited only while the job is awaiting_review; it is {}",
            job.status
        )));
    }
    if edits.descriptions.is_empty() {
        return Err(ApiError::InvalidRequest(
            "descriptions must name at least one edit".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for edit in &edits.descriptions {
        if edit.index >= job.image_count as u32 {
            return Err(ApiError::InvalidRequest(format!(
                "index {} is out of range; the job has {} images",
                edit.index, job.image_count
            )));
        }
        if !seen.insert(edit.index) {
            return Err(ApiError::InvalidRequest(format!(
                "index {} is edited twice",
                edit.index
            )));
        }
    }

    let rules = DescriptionRules::for_spec(&job.spec);
    let mut texts = Vec::with_capacity(edits.descriptions.len());
    let mut errors = Vec::new();
    for (position, edit) in edits.descriptions.iter().enumerate() {
        match validate_description(&edit.text, &rules) {
            Ok(text) => texts.push((edit.index as i32, text)),
            Err(problem) => errors.push(FieldError {
                pointer: format!("/descriptions/{position}/text"),
                code: problem.code().to_owned(),
                message: problem.message(),
            }),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::InvalidDescriptions(errors));
    }
    let descriptions = state.jobs().edit_descriptions(tenant, id, &texts).await?;
    Ok(Json(body(&state, id, job.status, descriptions).await?))
}
