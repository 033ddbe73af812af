//! `GET /v1/jobs/{id}/artifacts`: what a job produced, with presigned download URLs.

use axum::{extract::State, Extension, Json};
use chrono::Utc;

use crate::{
    auth::Tenant,
    error::{ApiError, Problem},
    handlers::JobId,
    model::{ArtifactBody, Artifacts},
    state::AppState,
};

/// The job's artifacts. Each `url` is a presigned GET URL on the object store, valid until
/// `expires_at`; it needs no API key.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/artifacts",
    operation_id = "listArtifacts",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The artifacts", body = Artifacts),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
) -> Result<Json<Artifacts>, ApiError> {
    state.jobs().get(tenant, id).await?;
    let ttl = chrono::Duration::from_std(state.storage().presign_ttl())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut artifacts = Vec::new();
    for artifact in state.jobs().artifacts(id).await? {
        let expires_at = Utc::now() + ttl;
        let url = state.storage().presign_get(&artifact.object_key).await?;
        artifacts.push(ArtifactBody {
            name: artifact.name,
            size: artifact.size,
            content_type: artifact.content_type,
            sha256: artifact.sha256,
            url,
            expires_at,
            created_at: artifact.created_at,
        });
    }
    Ok(Json(Artifacts { artifacts }))
}
