//! Creating, reading, listing and changing jobs.

use axum::{
    extract::{multipart::MultipartRejection, rejection::QueryRejection, Multipart, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde::Deserialize;
use sidbooth_core::{keys, Created, JobRecord, NewImage, NewJob};
use sidbooth_domain::JobStatus;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::{
    auth::Tenant,
    error::{ApiError, Problem},
    handlers::JobId,
    model::{job_path, CreateJobForm, Job, JobList},
    quota,
    state::AppState,
    upload::{self, CheckedImage, Upload},
};

/// Longest accepted Idempotency-Key.
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;
/// Header set on a response that returns the job of an earlier request with the same key.
const REPLAYED: &str = "idempotent-replayed";

fn record_job_id(id: Uuid) {
    tracing::Span::current().record("job_id", tracing::field::display(id));
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_CHARS)
        .filter(|k| k.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII \
                 characters"
            ))
        })?;
    Ok(Some(key.to_owned()))
}

fn job_response(status: StatusCode, job: Job, replayed: bool) -> Response {
    let location = HeaderValue::from_str(&job_path(job.id)).expect("a path is a header value");
    let mut response = (status, [(header::LOCATION, location)], Json(job)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// Create a job from a spec and 1-7 photos.
///
/// Everything is validated before anything is stored; a refused request leaves nothing behind.
/// With an `Idempotency-Key`, repeating the same request returns the job the first one made
/// (status 200, header `Idempotent-Replayed: true`); the same key with a different request is
/// refused.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    operation_id = "createJob",
    tag = "jobs",
    request_body(content = CreateJobForm, content_type = "multipart/form-data"),
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 255,
            pattern = "^[!-~]{1,255}$",
            description = "Makes retries safe: the same key and request give the same job. 1 to 255 visible ASCII characters."),
    ),
    responses(
        (status = 202, description = "Job accepted and queued", body = Job,
            headers(("Location" = String, description = "The job's URL"))),
        (status = 200, description = "Replay of an earlier request with the same Idempotency-Key",
            body = Job, headers(
                ("Location" = String, description = "The job's URL"),
                ("Idempotent-Replayed" = String, description = "`true`: this job was made by an earlier request"),
            )),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A concurrent request with the same Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "A file or the request is too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "A file is not a JPEG, PNG or WebP image", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid spec, images or descriptions", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the tenant's submission rate, queued jobs or daily accelerator seconds",
            body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is worth it"))),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let limits = state.upload_limits();
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|n| n > limits.max_request_bytes) {
        return Err(ApiError::RequestTooLarge {
            max: limits.max_request_bytes,
        });
    }
    let idempotency_key = idempotency_key(&headers)?;
    // A retry of a request that made its job is answered with that job below, whatever the
    // limits say now; anything else must pass them before its upload is read. (A concurrent
    // request with the same key that commits meanwhile is caught when the job is stored.)
    let earlier = match &idempotency_key {
        Some(key) => state.jobs().find_by_idempotency_key(tenant, key).await?,
        None => None,
    };
    if earlier.is_none() {
        quota::admit_job(&state, tenant).await?;
    }
    let multipart = multipart.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let raw = upload::read(multipart, &limits).await?;
    let upload = tokio::task::spawn_blocking(move || upload::check(raw, &limits))
        .await
        .map_err(|e| ApiError::Internal(format!("image check task: {e}")))??;

    if let Some((existing, hash)) = earlier {
        if hash != upload.request_hash {
            return Err(ApiError::IdempotencyKeyReused);
        }
        record_job_id(existing.id);
        let job = load(&state, existing).await?;
        return Ok(job_response(StatusCode::OK, job, true));
    }

    // Storing runs to completion even when the client goes away mid-request, so that either the
    // job exists or its uploads are removed again.
    let job_id = Uuid::now_v7();
    record_job_id(job_id);
    let persisted = tokio::spawn(persist(
        state.clone(),
        tenant,
        job_id,
        upload,
        idempotency_key,
    ))
    .await
    .map_err(|e| ApiError::Internal(format!("store task: {e}")))??;
    match persisted {
        (Created::New(record), images) => {
            tracing::info!(job_id = %record.id, images = images.len(), "job created");
            Ok(job_response(
                StatusCode::ACCEPTED,
                Job::new(record, images),
                false,
            ))
        }
        (Created::Existing(record), _) => {
            record_job_id(record.id);
            let job = load(&state, record).await?;
            Ok(job_response(StatusCode::OK, job, true))
        }
    }
}

/// Uploads the images, then inserts the job. Removes the uploads again when the insert fails or
/// a concurrent request with the same Idempotency-Key won.
async fn persist(
    state: AppState,
    tenant: Uuid,
    job_id: Uuid,
    upload: Upload,
    idempotency_key: Option<String>,
) -> Result<(Created, Vec<String>), ApiError> {
    let object_keys: Vec<String> = upload
        .images
        .iter()
        .enumerate()
        .map(|(idx, image)| keys::input(tenant, job_id, idx, &image.file_name))
        .collect();
    let mask_keys: Vec<Option<String>> = upload
        .images
        .iter()
        .enumerate()
        .map(|(idx, image)| {
            image
                .mask
                .as_ref()
                .map(|_| keys::input_mask(tenant, job_id, idx))
        })
        .collect();
    let photos = upload
        .images
        .iter()
        .zip(&object_keys)
        .map(|(image, key)| (key, image.body.clone(), image.content_type));
    let masks = upload
        .images
        .iter()
        .zip(&mask_keys)
        .filter_map(|(image, key)| {
            Some((
                key.as_ref()?,
                image.mask.as_ref()?.body.clone(),
                "image/png",
            ))
        });
    let uploads = photos
        .chain(masks)
        .map(|(key, body, content_type)| state.storage().put(key, body, content_type));
    // Every upload finishes (or fails) before any cleanup, so none lands after it.
    let stored: Result<Vec<()>, _> = futures::future::join_all(uploads)
        .await
        .into_iter()
        .collect();
    let mut all_keys = object_keys.clone();
    all_keys.extend(mask_keys.iter().flatten().cloned());

    let created = match stored {
        Ok(_) => {
            let new_job = NewJob {
                id: job_id,
                tenant_id: tenant,
                spec: upload.spec,
                images: upload
                    .images
                    .iter()
                    .zip(object_keys.iter().zip(&mask_keys))
                    .map(|(image, (key, mask_key))| new_image(image, key, mask_key.clone()))
                    .collect(),
                idempotency_key,
                request_hash: upload.request_hash,
                max_attempts: state.config().queue.max_attempts,
            };
            state.jobs().create(new_job).await.map_err(ApiError::from)
        }
        Err(e) => Err(ApiError::from(e)),
    };
    if !matches!(created, Ok(Created::New(_))) {
        remove_objects(&state, &all_keys).await;
    }
    let names = upload.images.into_iter().map(|i| i.file_name).collect();
    created.map(|c| (c, names))
}

fn new_image(image: &CheckedImage, key: &str, mask_key: Option<String>) -> NewImage {
    NewImage {
        file_name: image.file_name.clone(),
        object_key: key.to_owned(),
        mask_object_key: mask_key,
        content_type: image.content_type.to_owned(),
        sha256: image.sha256.clone(),
        width: image.width,
        height: image.height,
        bytes: image.body.len() as u64,
    }
}

async fn remove_objects(state: &AppState, object_keys: &[String]) {
    let deletes = object_keys.iter().map(|key| state.storage().delete(key));
    for (key, result) in object_keys
        .iter()
        .zip(futures::future::join_all(deletes).await)
    {
        if let Err(e) = result {
            tracing::error!(error = %e, key, "could not remove an upload of a refused job");
        }
    }
}

/// The job body: the record and its image names.
async fn load(state: &AppState, record: JobRecord) -> Result<Job, ApiError> {
    let images = state.jobs().images(record.id).await?;
    Ok(Job::new(
        record,
        images.into_iter().map(|i| i.file_name).collect(),
    ))
}

/// Get a job.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "getJob",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
) -> Result<Json<Job>, ApiError> {
    let (record, images) = state.jobs().get_with_image_names(tenant, id).await?;
    Ok(Json(Job::new(record, images)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Jobs per page, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(value_type = Option<Uuid>)]
    pub cursor: Option<String>,
    /// Only jobs with this status.
    #[param(value_type = Option<JobStatus>)]
    pub status: Option<String>,
}

/// List the tenant's jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    operation_id = "listJobs",
    tag = "jobs",
    params(ListParams),
    responses(
        (status = 200, description = "One page of jobs", body = JobList),
        (status = 400, description = "Invalid limit, cursor or status", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    // A query string that does not parse (a repeated parameter, bad percent-encoding) is a
    // problem like any other bad input, not axum's plain-text rejection.
    let Query(params) = params.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = super::page_limit(params.limit.as_deref(), 20)?;
    let cursor = params
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<Uuid>()
                .map_err(|_| ApiError::InvalidRequest("cursor is not one this API returned".into()))
        })
        .transpose()?;
    let status = params
        .status
        .as_deref()
        .map(|s| {
            s.parse::<JobStatus>()
                .map_err(|e| ApiError::InvalidRequest(e.to_string()))
        })
        .transpose()?;
    let page = state.jobs().list(tenant, status, cursor, limit).await?;
    let ids: Vec<Uuid> = page.jobs.iter().map(|j| j.id).collect();
    let mut names = state.jobs().image_names(&ids).await?;
    let jobs = page
        .jobs
        .into_iter()
        .map(|record| {
            let images = names.remove(&record.id).unwrap_or_default();
            Job::new(record, images)
        })
        .collect();
    Ok(Json(JobList {
        jobs,
        next_cursor: page.next_cursor.map(|c| c.to_string()),
    }))
}

/// Approve the descriptions of a job awaiting review; the job continues.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/approve",
    operation_id = "approveJob",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, queued again", body = Job),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job is not awaiting review, or a description still has a problem", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn approve(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
) -> Result<Json<Job>, ApiError> {
    let record = state.jobs().approve(tenant, id).await?;
    Ok(Json(load(&state, record).await?))
}

/// Cancel a job. A queued or waiting job is canceled at once; a running one stops within a
/// heartbeat.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    operation_id = "cancelJob",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, canceled or with cancellation requested", body = Job),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job has already finished", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
) -> Result<Json<Job>, ApiError> {
    let record = state.jobs().cancel(tenant, id).await?;
    Ok(Json(load(&state, record).await?))
}

/// Delete a job with its images, descriptions, artifacts and events.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    operation_id = "deleteJob",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
) -> Result<StatusCode, ApiError> {
    let record = state.jobs().delete(tenant, id).await?;
    let removed = state
        .storage()
        .delete_prefix(&keys::job_prefix(record.tenant_id, record.id))
        .await?;
    tracing::info!(job_id = %id, objects = removed, "job deleted");
    Ok(StatusCode::NO_CONTENT)
}
