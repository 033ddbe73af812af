//! Webhook endpoints: register, list, delete, and each one's delivery log. Delivery itself is
//! the dispatcher's (`sidbooth-webhooks`), which `serve` runs beside the HTTP server.

use axum::{
    extract::{rejection::JsonRejection, rejection::QueryRejection, Path, Query, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde::Deserialize;
use sidbooth_core::{
    webhooks::{event_types, NewEndpoint},
    CoreError,
};
use sidbooth_webhooks::sign;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::{
    auth::Tenant,
    error::{ApiError, Problem},
    model::{CreatedWebhook, Deliveries, DeliveryBody, NewWebhook, Webhook, Webhooks},
    state::AppState,
};

/// The `{id}` of a webhook route; one that is not a UUID names no endpoint.
fn endpoint_id(
    id: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
) -> Result<Uuid, ApiError> {
    id.map(|Path(id)| id).map_err(|_| ApiError::NoSuchWebhook)
}

fn not_found_is_webhook(e: CoreError) -> ApiError {
    match e {
        CoreError::NotFound => ApiError::NoSuchWebhook,
        CoreError::Conflict(message) => ApiError::InvalidWebhook(message),
        other => other.into(),
    }
}

/// The subscribed event types: all when none are named; each must be known, none repeated.
fn checked_events(events: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let known = event_types();
    let Some(events) = events else {
        return Ok(known);
    };
    if events.is_empty() {
        return Err(ApiError::InvalidWebhook(
            "events must name at least one event type; leave it out for all".into(),
        ));
    }
    let mut checked: Vec<String> = Vec::new();
    for event in events {
        if !known.contains(&event) {
            return Err(ApiError::InvalidWebhook(format!(
                "unknown event type {event:?}; known: {}",
                known.join(", ")
            )));
        }
        if !checked.contains(&event) {
            checked.push(event);
        }
    }
    Ok(checked)
}

/// Register a webhook endpoint.
///
/// Every status change of the tenant's jobs is POSTed to `url` as
/// `{"type": "job.<status>", "timestamp", "data": <the job>}`, signed after the Standard
/// Webhooks specification (`webhook-id`, `webhook-timestamp`, `webhook-signature`). A 2xx answer
/// delivers it; anything else is retried with exponential backoff for 24 hours under the same
/// `webhook-id`. Loopback, private and link-local addresses are refused unless the operator
/// allows them.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    operation_id = "createWebhook",
    tag = "webhooks",
    request_body = NewWebhook,
    responses(
        (status = 201, description = "Registered; the secret is shown only now", body = CreatedWebhook,
            headers(("Location" = String, description = "The endpoint's URL"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The URL or events are refused, or the tenant has too many endpoints", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    body: Result<Json<NewWebhook>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let settings = &state.config().webhooks;
    let url = settings
        .policy()
        .check(body.url.trim())
        .await
        .map_err(|e| ApiError::InvalidWebhook(e.to_string()))?;
    let new = NewEndpoint {
        url: url.to_string(),
        events: checked_events(body.events)?,
        secret: sign::new_secret(),
    };
    let endpoint = state
        .webhooks()
        .create(tenant, &new, settings.webhook_max_endpoints)
        .await
        .map_err(not_found_is_webhook)?;
    let view = Webhook::from(endpoint);
    let location = HeaderValue::from_str(&format!("/v1/webhooks/{}", view.id))
        .expect("a path is a header value");
    let created = CreatedWebhook {
        id: view.id,
        url: view.url,
        events: view.events,
        secret: new.secret,
        created_at: view.created_at,
        deliveries: view.deliveries,
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response())
}

/// List the tenant's webhook endpoints (without their secrets).
#[utoipa::path(
    get,
    path = "/v1/webhooks",
    operation_id = "listWebhooks",
    tag = "webhooks",
    responses(
        (status = 200, description = "The endpoints, oldest first", body = Webhooks),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
) -> Result<Json<Webhooks>, ApiError> {
    let webhooks = state.webhooks().list(tenant).await?;
    Ok(Json(Webhooks {
        webhooks: webhooks.into_iter().map(Webhook::from).collect(),
    }))
}

/// Remove a webhook endpoint; deliveries not yet made to it are dropped.
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    operation_id = "deleteWebhook",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "Endpoint id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    id: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = endpoint_id(id)?;
    state
        .webhooks()
        .delete(tenant, id)
        .await
        .map_err(not_found_is_webhook)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// Deliveries to return, newest first, 1 to 100 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
}

/// The endpoint's deliveries, newest first, each with every try and its answer.
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries",
    operation_id = "listWebhookDeliveries",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "Endpoint id"), DeliveryParams),
    responses(
        (status = 200, description = "The deliveries", body = Deliveries),
        (status = 400, description = "A bad limit", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint for this tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn deliveries(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    id: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
    params: Result<Query<DeliveryParams>, QueryRejection>,
) -> Result<Json<Deliveries>, ApiError> {
    let id = endpoint_id(id)?;
    let Query(params) = params.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = super::page_limit(params.limit.as_deref(), 50)?;
    let deliveries = state
        .webhooks()
        .deliveries(tenant, id, i64::from(limit))
        .await
        .map_err(not_found_is_webhook)?;
    Ok(Json(Deliveries {
        deliveries: deliveries.into_iter().map(DeliveryBody::from).collect(),
    }))
}
