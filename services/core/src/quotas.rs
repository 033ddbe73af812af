//! Limits per tenant: most queued jobs, most running jobs, accelerator seconds per UTC day and
//! job submissions per minute. Defaults come from configuration; a row in `tenant_limits`
//! overrides any of them for one tenant (`sidbooth tenants limits`). 0 means no limit.
//!
//! The API refuses a new job over the queued, daily-seconds or rate limit; the queue does not
//! claim a tenant's job while the tenant has its most running jobs.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{CoreError, Result};

/// The defaults of the limits the API enforces; the running limit is the queue's
/// ([`crate::QueueSettings::max_running_jobs`]).
#[derive(Debug, Clone, clap::Args)]
pub struct QuotaSettings {
    /// Most queued jobs per tenant; a new job beyond it is refused (429). 0: no limit.
    #[arg(long, env = "SIDBOOTH_MAX_QUEUED_JOBS", default_value_t = 100)]
    pub max_queued_jobs: u32,
    /// Accelerator seconds (train, generate, evaluate) per tenant per UTC day; once used, new
    /// jobs are refused until midnight UTC. 0: no limit.
    #[arg(long, env = "SIDBOOTH_GPU_SECONDS_PER_DAY", default_value_t = 0.0)]
    pub gpu_seconds_per_day: f64,
    /// `POST /v1/jobs` requests per tenant per minute (a burst of as many). 0: no limit.
    #[arg(long, env = "SIDBOOTH_JOB_POSTS_PER_MINUTE", default_value_t = 60)]
    pub job_posts_per_minute: u32,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        Self {
            max_queued_jobs: 100,
            gpu_seconds_per_day: 0.0,
            job_posts_per_minute: 60,
        }
    }
}

/// One tenant's limits in force; 0 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    pub max_queued_jobs: u32,
    pub max_running_jobs: u32,
    pub gpu_seconds_per_day: f64,
    pub job_posts_per_minute: u32,
}

/// A tenant's own values; `None` keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, sqlx::FromRow)]
pub struct LimitOverrides {
    pub max_queued_jobs: Option<i32>,
    pub max_running_jobs: Option<i32>,
    pub gpu_seconds_per_day: Option<f64>,
    pub job_posts_per_minute: Option<i32>,
}

impl LimitOverrides {
    /// The limits in force given the defaults.
    pub fn apply(&self, defaults: &QuotaSettings, max_running_jobs: u32) -> Limits {
        let count = |o: Option<i32>, d: u32| o.map_or(d, |v| v.max(0) as u32);
        Limits {
            max_queued_jobs: count(self.max_queued_jobs, defaults.max_queued_jobs),
            max_running_jobs: count(self.max_running_jobs, max_running_jobs),
            gpu_seconds_per_day: self
                .gpu_seconds_per_day
                .unwrap_or(defaults.gpu_seconds_per_day),
            job_posts_per_minute: count(self.job_posts_per_minute, defaults.job_posts_per_minute),
        }
    }
}

/// What a tenant uses now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, sqlx::FromRow)]
pub struct Usage {
    pub queued_jobs: i64,
    pub running_jobs: i64,
    /// Accelerator seconds used today (UTC).
    pub gpu_seconds_today: f64,
    pub day: NaiveDate,
}

/// Seconds from `now` to the next midnight UTC, when the daily seconds start again.
pub fn until_next_day(now: DateTime<Utc>) -> std::time::Duration {
    let tomorrow = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    (tomorrow - now).to_std().unwrap_or_default()
}

#[derive(Clone, Debug)]
pub struct QuotaStore {
    pool: PgPool,
}

impl QuotaStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The tenant's overrides and usage, in one round trip.
    pub async fn standing(&self, tenant: Uuid) -> Result<(LimitOverrides, Usage)> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            overrides: LimitOverrides,
            #[sqlx(flatten)]
            usage: Usage,
        }
        let row: Row = sqlx::query_as(
            "SELECT l.max_queued_jobs, l.max_running_jobs, l.gpu_seconds_per_day,
                    l.job_posts_per_minute,
                    (SELECT count(*) FROM jobs WHERE tenant_id = $1 AND status = 'queued')
                        AS queued_jobs,
                    (SELECT count(*) FROM jobs WHERE tenant_id = $1 AND status = 'running')
                        AS running_jobs,
                    coalesce((SELECT gpu_seconds FROM tenant_usage
                              WHERE tenant_id = $1 AND day = (now() AT TIME ZONE 'UTC')::date),
                             0) AS gpu_seconds_today,
                    (now() AT TIME ZONE 'UTC')::date AS day
             FROM (SELECT $1::uuid AS tenant_id) t
             LEFT JOIN tenant_limits l ON l.tenant_id = t.tenant_id",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.overrides, row.usage))
    }

    /// Sets a tenant's overrides (by tenant name); `None` fields go back to the default.
    pub async fn set_overrides(&self, tenant_name: &str, o: &LimitOverrides) -> Result<Uuid> {
        let tenant: Uuid = sqlx::query_scalar("SELECT id FROM tenants WHERE name = $1")
            .bind(tenant_name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(CoreError::NotFound)?;
        sqlx::query(
            "INSERT INTO tenant_limits (tenant_id, max_queued_jobs, max_running_jobs,
                                        gpu_seconds_per_day, job_posts_per_minute)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id) DO UPDATE SET
                 max_queued_jobs = EXCLUDED.max_queued_jobs,
                 max_running_jobs = EXCLUDED.max_running_jobs,
                 gpu_seconds_per_day = EXCLUDED.gpu_seconds_per_day,
                 job_posts_per_minute = EXCLUDED.job_posts_per_minute,
                 updated_at = now()",
        )
        .bind(tenant)
        .bind(o.max_queued_jobs)
        .bind(o.max_running_jobs)
        .bind(o.gpu_seconds_per_day)
        .bind(o.job_posts_per_minute)
        .execute(&self.pool)
        .await?;
        Ok(tenant)
    }

    /// Adds accelerator seconds to the tenant's count for today (UTC).
    pub async fn add_gpu_seconds(&self, tenant: Uuid, seconds: f64) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenant_usage (tenant_id, day, gpu_seconds)
             VALUES ($1, (now() AT TIME ZONE 'UTC')::date, $2)
             ON CONFLICT (tenant_id, day) DO UPDATE
             SET gpu_seconds = tenant_usage.gpu_seconds + EXCLUDED.gpu_seconds",
        )
        .bind(tenant)
        .bind(seconds.max(0.0))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_what_they_name() {
        let defaults = QuotaSettings::default();
        let limits = LimitOverrides {
            max_queued_jobs: Some(3),
            gpu_seconds_per_day: Some(60.0),
            ..Default::default()
        }
        .apply(&defaults, 2);
        assert_eq!(
            limits,
            Limits {
                max_queued_jobs: 3,
                max_running_jobs: 2,
                gpu_seconds_per_day: 60.0,
                job_posts_per_minute: 60,
            }
        );
    }

    #[test]
    fn the_day_ends_at_midnight_utc() {
        let at = "2026-12-02T23:59:30Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(until_next_day(at), std::time::Duration::from_secs(30));
    }
}
