//! `PUT /v1/jobs/{id}/masks/{n}`: replace photo `n`'s subject mask during review, so a bad
//! automatic mask is fixed before training and evaluation use it.

use axum::{
    body::Bytes,
    extract::{Path, State},
    Extension, Json,
};
use sha2::{Digest, Sha256};
use sidbooth_core::{keys, mask_artifact_name, NewArtifact};
use sidbooth_domain::JobStatus;
use uuid::Uuid;

use crate::{
    auth::Tenant,
    error::{ApiError, Problem},
    handlers::descriptions,
    model::Descriptions,
    state::AppState,
    upload::check_mask,
};

/// Replace a photo's subject mask while the job awaits review.
///
/// The body is the PNG itself (white = subject, black = the rest), checked like an uploaded
/// mask: PNG only, the photo's shape (any resolution), at least one subject pixel. The mask's
/// source becomes `uploaded`. Answers with all descriptions and their masks.
#[utoipa::path(
    put,
    path = "/v1/jobs/{id}/masks/{n}",
    operation_id = "replaceMask",
    tag = "descriptions",
    params(
        ("id" = Uuid, Path, description = "Job id"),
        ("n" = u32, Path, description = "The photo's index in upload order"),
    ),
    request_body(content = Vec<u8>, content_type = "image/png", description = "The mask PNG"),
    responses(
        (status = 200, description = "The descriptions and masks after the change", body = Descriptions),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant, or no photo with this index", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job is not awaiting review", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a usable mask (`errors[0].code`: mask_not_png, mask_unreadable, mask_empty, mask_size_mismatch, mask_too_large)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database or storage is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn replace(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path((id, n)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Descriptions>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    tracing::Span::current().record("job_id", tracing::field::display(id));
    let job = state.jobs().get(tenant, id).await?;
    let n: i32 = n
        .parse()
        .ok()
        .filter(|n| (0..job.image_count).contains(n))
        .ok_or(ApiError::NotFound)?;
    if job.status != JobStatus::AwaitingReview {
        return Err(ApiError::Conflict(format!(
            "masks can be replaced only while the job is awaiting_review; it is {}",
            job.status
        )));
    }
    let images = state.jobs().images(id).await?;
    let image = images
        .iter()
        .find(|i| i.idx == n)
        .ok_or(ApiError::NotFound)?;
    let photo = (image.width as u32, image.height as u32);
    let max_pixels = state.upload_limits().max_pixels;
    let checked = tokio::task::spawn_blocking(move || check_mask(&body, "body", photo, max_pixels))
        .await
        .map_err(|e| ApiError::Internal(format!("mask check task: {e}")))??;

    let name = mask_artifact_name(n);
    let object_key = keys::artifact(tenant, id, &format!("u{}/{name}", Uuid::now_v7()));
    let artifact = NewArtifact {
        name,
        object_key: object_key.clone(),
        content_type: "image/png".into(),
        size: checked.body.len() as i64,
        sha256: hex::encode(Sha256::digest(&checked.body)),
    };
    state
        .storage()
        .put(&object_key, checked.body, "image/png")
        .await?;
    match state
        .jobs()
        .replace_mask(tenant, id, n, checked.coverage, &artifact)
        .await
    {
        Ok(Some(previous)) => {
            if let Err(e) = state.storage().delete(&previous).await {
                tracing::warn!(error = %e, object_key = %previous, "could not delete a replaced mask");
            }
        }
        Ok(None) => {}
        Err(e) => {
            if let Err(delete) = state.storage().delete(&object_key).await {
                tracing::warn!(error = %delete, %object_key, "could not delete an unrecorded mask");
            }
            return Err(e.into());
        }
    }
    tracing::info!(job_id = %id, index = n, "mask replaced");
    let all = state.jobs().descriptions(id).await?;
    Ok(Json(
        descriptions::body(&state, id, JobStatus::AwaitingReview, all).await?,
    ))
}
