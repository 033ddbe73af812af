//! Typed configuration from flags and environment. Secrets are redacted in `Debug` output so
//! a config can be logged at start-up.

use std::{fmt, time::Duration};

/// Where the Postgres database is.
#[derive(Clone, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Largest number of pooled connections.
    #[arg(long, env = "SIDBOOTH_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// How long a request waits for a pooled connection, in seconds. While Postgres is down
    /// this is how long the API takes to answer 503.
    #[arg(long, env = "SIDBOOTH_DB_ACQUIRE_TIMEOUT_SECS", default_value_t = DatabaseArgs::DEFAULT_ACQUIRE_TIMEOUT_SECS)]
    pub db_acquire_timeout_secs: f64,
}

impl DatabaseArgs {
    pub const DEFAULT_ACQUIRE_TIMEOUT_SECS: f64 = 3.0;

    /// Connection settings for `url` with the default pool settings.
    pub fn new(url: impl Into<String>, max_connections: u32) -> Self {
        Self {
            database_url: url.into(),
            db_max_connections: max_connections,
            db_acquire_timeout_secs: Self::DEFAULT_ACQUIRE_TIMEOUT_SECS,
        }
    }
}

impl fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field("database_url", &redact_url(&self.database_url))
            .field("db_max_connections", &self.db_max_connections)
            .field("db_acquire_timeout_secs", &self.db_acquire_timeout_secs)
            .finish()
    }
}

/// Hides the password of a URL like `postgres://user:secret@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Where artifacts and uploads are stored. Credentials come from the standard AWS chain
/// (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles).
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// S3-compatible endpoint URL; the AWS default endpoint when absent.
    #[arg(long, env = "SIDBOOTH_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "SIDBOOTH_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    #[arg(long, env = "SIDBOOTH_S3_BUCKET", default_value = "sidbooth")]
    pub s3_bucket: String,
    /// Path-style addressing (http://host/bucket/key), which most self-hosted servers need.
    #[arg(long, env = "SIDBOOTH_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_path_style: bool,
    /// Lifetime of presigned download URLs, in seconds.
    #[arg(long, env = "SIDBOOTH_PRESIGN_TTL_SECS", default_value_t = 3600)]
    pub presign_ttl_secs: u64,
}

/// Queue timing. The defaults suit a GPU worker whose stages take minutes.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueSettings {
    /// How long a claim holds a job without a heartbeat, in seconds.
    #[arg(long, env = "SIDBOOTH_LEASE_SECS", default_value_t = 30.0)]
    pub lease_secs: f64,
    /// How often a running worker renews its lease and checks for cancellation, in seconds.
    #[arg(long, env = "SIDBOOTH_HEARTBEAT_SECS", default_value_t = 2.0)]
    pub heartbeat_secs: f64,
    /// Idle workers poll at this interval when no notification arrives, in seconds.
    #[arg(long, env = "SIDBOOTH_POLL_SECS", default_value_t = 5.0)]
    pub poll_secs: f64,
    /// Tries per job before it fails.
    #[arg(long, env = "SIDBOOTH_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,
    /// First retry delay; doubled after every failed try.
    #[arg(long, env = "SIDBOOTH_RETRY_BASE_SECS", default_value_t = 2.0)]
    pub retry_base_secs: f64,
    /// Upper bound on the retry delay.
    #[arg(long, env = "SIDBOOTH_RETRY_MAX_SECS", default_value_t = 300.0)]
    pub retry_max_secs: f64,
    /// Most jobs of one tenant running at once (a tenant's `tenant_limits` row may say
    /// otherwise); its other jobs wait in the queue. 0: no limit. Workers claiming at the same
    /// instant can pass it by one each.
    #[arg(long, env = "SIDBOOTH_MAX_RUNNING_JOBS", default_value_t = 0)]
    pub max_running_jobs: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            lease_secs: 30.0,
            heartbeat_secs: 2.0,
            poll_secs: 5.0,
            max_attempts: 5,
            retry_base_secs: 2.0,
            retry_max_secs: 300.0,
            max_running_jobs: 0,
        }
    }
}

impl QueueSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_secs)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_secs)
    }
    pub fn poll(&self) -> Duration {
        Duration::from_secs_f64(self.poll_secs)
    }
    /// Delay before try `attempt + 1` after try `attempt` (1-based) failed: exponential, capped.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let exp = (attempt.max(1) - 1).min(30);
        let secs = self.retry_base_secs * 2f64.powi(exp);
        Duration::from_secs_f64(secs.min(self.retry_max_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_redacted() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://db:5432/x"), "postgres://db:5432/x");
        let args = DatabaseArgs::new("postgres://a:secret@h/d", 1);
        assert!(!format!("{args:?}").contains("secret"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let q = QueueSettings {
            retry_base_secs: 1.0,
            retry_max_secs: 5.0,
            ..QueueSettings::default()
        };
        assert_eq!(q.backoff(1), Duration::from_secs(1));
        assert_eq!(q.backoff(2), Duration::from_secs(2));
        assert_eq!(q.backoff(3), Duration::from_secs(4));
        assert_eq!(q.backoff(4), Duration::from_secs(5));
    }
}
