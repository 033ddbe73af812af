//! `GET /v1/usage`: the tenant's limits and what it uses of them.

use axum::{extract::State, Extension, Json};
use chrono::Utc;
use sidbooth_core::quotas::until_next_day;

use crate::{
    auth::Tenant,
    error::{ApiError, Problem},
    model::{TenantLimits, TenantUsage, UsageBody},
    quota,
    state::AppState,
};

/// `0` in configuration is no limit; the API says null.
fn limit<T: PartialEq + Default>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

/// The tenant's limits and usage.
#[utoipa::path(
    get,
    path = "/v1/usage",
    operation_id = "getUsage",
    tag = "jobs",
    responses(
        (status = 200, description = "Limits in force and usage now", body = UsageBody),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
) -> Result<Json<UsageBody>, ApiError> {
    let (limits, usage) = quota::standing(&state, tenant).await?;
    let now = Utc::now();
    Ok(Json(UsageBody {
        limits: TenantLimits {
            max_queued_jobs: limit(limits.max_queued_jobs),
            max_running_jobs: limit(limits.max_running_jobs),
            gpu_seconds_per_day: limit(limits.gpu_seconds_per_day),
            job_posts_per_minute: limit(limits.job_posts_per_minute),
        },
        usage: TenantUsage {
            queued_jobs: usage.queued_jobs,
            running_jobs: usage.running_jobs,
            gpu_seconds_today: usage.gpu_seconds_today,
            day: usage.day,
            day_resets_at: now + until_next_day(now),
        },
    }))
}
