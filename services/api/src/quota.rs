//! The tenant limits a new job must pass: the submission rate, the queued jobs and the daily
//! accelerator seconds ([`sidbooth_core::quotas`]). Checked before the upload is read, so a
//! refused request costs nothing.

use std::time::Duration;

use chrono::Utc;
use sidbooth_core::quotas::{until_next_day, Limits, Usage};
use uuid::Uuid;

use crate::{error::ApiError, rate_limit::Rate, state::AppState};

/// `Retry-After` when the queue is full: about how long a job takes to start.
const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The tenant's limits in force and what it uses now.
pub(crate) async fn standing(state: &AppState, tenant: Uuid) -> Result<(Limits, Usage), ApiError> {
    let (overrides, usage) = state.quotas().standing(tenant).await?;
    let config = state.config();
    Ok((
        overrides.apply(&config.quotas, config.queue.max_running_jobs),
        usage,
    ))
}

/// Refuses a new job over a limit with 429 and when to try again; spends a token of the
/// submission rate when it passes that.
pub(crate) async fn admit_job(state: &AppState, tenant: Uuid) -> Result<(), ApiError> {
    let (limits, usage) = standing(state, tenant).await?;
    if let Some(rate) = Rate::per_minute(limits.job_posts_per_minute) {
        if let Some(retry_after) = state.job_posts().wait(&tenant, rate) {
            return Err(ApiError::RateLimited {
                what: "too many jobs submitted in the last minute",
                retry_after,
            });
        }
        state.job_posts().spend(&tenant, rate);
    }
    if limits.max_queued_jobs > 0 && usage.queued_jobs >= i64::from(limits.max_queued_jobs) {
        return Err(ApiError::QuotaExceeded {
            what: format!(
                "the tenant has {} queued jobs, its most; wait for some to start",
                usage.queued_jobs
            ),
            retry_after: QUEUE_FULL_RETRY_AFTER,
        });
    }
    if limits.gpu_seconds_per_day > 0.0 && usage.gpu_seconds_today >= limits.gpu_seconds_per_day {
        return Err(ApiError::QuotaExceeded {
            what: format!(
                "the tenant used {:.0} of its {:.0} accelerator seconds today (UTC)",
                usage.gpu_seconds_today, limits.gpu_seconds_per_day
            ),
            retry_after: until_next_day(Utc::now()),
        });
    }
    Ok(())
}
