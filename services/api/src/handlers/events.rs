//! `GET /v1/jobs/{id}/events`: Server-Sent Events of a job's status changes and progress.

use axum::{
    extract::State,
    http::HeaderMap,
    response::sse::{KeepAlive, Sse},
    Extension, Json,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    auth::Tenant,
    error::{ApiError, Problem},
    events::Subscription,
    handlers::JobId,
    model::{job_path, EventsUrl},
    state::AppState,
};

/// Follow a job's events.
///
/// Each SSE message has `id` (the event id, for `Last-Event-ID`), `event` (the kind: `status`,
/// `progress`, `stage_completed`, `cancel_requested`, `descriptions_edited`) and `data`, a JSON
/// object `{id, job_id, kind, data, created_at}`. The stream replays the events after
/// `Last-Event-ID` (all of them without it), then sends new ones as they happen, and ends after
/// the job reaches succeeded, failed or canceled. Comments keep idle connections alive.
///
/// Browsers, whose `EventSource` sends no `Authorization` header, open the signed URL from
/// `POST /v1/jobs/{id}/events-url` instead (its `token` parameter stands in for the key).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    operation_id = "streamJobEvents",
    tag = "jobs",
    params(
        ("id" = Uuid, Path, description = "Job id"),
        ("Last-Event-ID" = Option<u64>, Header, nullable = false, description = "Resume after this event id"),
        ("token" = Option<String>, Query, description = "From a signed events URL; stands in for the API key"),
    ),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed Last-Event-ID", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key or token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []), ())
)]
pub async fn stream(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
    headers: HeaderMap,
) -> Result<
    Sse<impl Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>,
    ApiError,
> {
    let last_id = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|v| *v >= 0)
            .ok_or_else(|| ApiError::InvalidRequest("Last-Event-ID must be an event id".into()))?,
    };
    // Subscribe before the first read, so nothing recorded in between is missed.
    let notices = state.events().subscribe();
    state.jobs().get(tenant, id).await?;

    let (sender, receiver) = mpsc::channel(32);
    let subscription = Subscription {
        jobs: state.jobs().clone(),
        tenant,
        job_id: id,
        last_id,
        notices,
        shutdown: state.shutdown_token().clone(),
    };
    tokio::spawn(subscription.pump(sender));
    Ok(Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(state.config().sse_keepalive())))
}

/// Get a signed URL of the job's event stream, for a browser.
///
/// `EventSource` cannot send an `Authorization` header: open the returned `url` (relative to
/// the API) instead. It streams this job's events for this tenant without a key until
/// `expires_at` (reconnections included); afterwards ask for a new one.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/events-url",
    operation_id = "createJobEventsUrl",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "A signed URL of the event stream", body = EventsUrl),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn signed_url(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
) -> Result<Json<EventsUrl>, ApiError> {
    state.jobs().get(tenant, id).await?;
    let (token, expires_at) = state.events_urls().sign(tenant, id);
    Ok(Json(EventsUrl {
        url: format!("{}/events?token={token}", job_path(id)),
        expires_at,
    }))
}
