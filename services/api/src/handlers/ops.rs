//! Health, readiness and metrics (the OpenAPI document is served by [`crate::openapi`]).

use axum::{extract::State, http::header, response::IntoResponse, Json};

use crate::{
    error::{ApiError, Problem},
    model::{Health, Readiness},
    state::AppState,
};

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: Postgres and the object store answer within the timeout.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "A dependency is unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    let timeout = state.config().ready_timeout();
    let postgres = tokio::time::timeout(timeout, sidbooth_core::db::ping(state.pool()));
    let storage = tokio::time::timeout(timeout, state.storage().ping());
    let (postgres, storage) = tokio::join!(postgres, storage);
    let mut failures = Vec::new();
    match postgres {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failures.push(format!("postgres: {e}")),
        Err(_) => failures.push("postgres: timed out".to_owned()),
    }
    match storage {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failures.push(format!("storage: {e}")),
        Err(_) => failures.push("storage: timed out".to_owned()),
    }
    if !failures.is_empty() {
        return Err(ApiError::NotReady(failures));
    }
    Ok(Json(Readiness {
        status: "ready".into(),
        postgres: "ok".into(),
        storage: "ok".into(),
    }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let handle = crate::metrics::install_recorder();
    match state.jobs().status_counts().await {
        Ok(counts) => crate::metrics::set_job_counts(&counts),
        Err(e) => tracing::warn!(error = %e, "job counts for metrics"),
    }
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}
