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
    /// The endpoint that presigned download URLs name, where clients reach storage at another
    /// address than this process does (compose or Kubernetes: `http://s3:9000` inside,
    /// `https://files.example.com` outside). Unset: the S3 endpoint.
    #[arg(long, env = "SIDBOOTH_S3_PUBLIC_ENDPOINT")]
    pub s3_public_endpoint: Option<String>,
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
    /// Claiming ahead: while a worker's jobs finish within this many seconds of starting, each
    /// slot gets its next job claimed ahead (given back if unused within a second) and does not
    /// wait for the previous success's commit; slower jobs claim nothing ahead. 0: never.
    #[arg(long, env = "SIDBOOTH_QUICK_JOB_SECS", default_value_t = 0.05)]
    pub quick_job_secs: f64,
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
            quick_job_secs: 0.05,
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

/// The environment variables that hold secrets. Each can instead name a file that holds the
/// value, as `<NAME>_FILE` (Docker and Kubernetes secrets mounted as files).
pub const SECRET_VARS: &[&str] = &[
    "DATABASE_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "SIDBOOTH_VLM_API_KEY",
    "SIDBOOTH_EVENTS_URL_KEY",
];

/// What [`prepare_env`] changes in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvChange {
    /// A variable set to the empty string counts as unset (compose's `${VAR:-}` and templated
    /// manifests pass empty strings for what was left out).
    Unset(String),
    /// A secret read from the file its `_FILE` variable names.
    Set(String, String),
}

/// Why the environment cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("{name} and {name}_FILE are both set; set one")]
    Both { name: String },
    #[error("{name}_FILE names {path}, which cannot be read: {reason}")]
    Unreadable {
        name: String,
        path: String,
        reason: String,
    },
}

/// The changes that make `vars` (the process's environment) what the flags' parsers should
/// see: empty sidbooth, database and AWS variables removed, `<SECRET>_FILE` read into
/// `<SECRET>` (one trailing newline dropped). `read` reads a file.
pub fn env_changes(
    vars: impl IntoIterator<Item = (String, String)>,
    read: impl Fn(&std::path::Path) -> std::io::Result<String>,
) -> std::result::Result<Vec<EnvChange>, EnvError> {
    let vars: std::collections::BTreeMap<String, String> = vars.into_iter().collect();
    let ours = |name: &str| {
        name.starts_with("SIDBOOTH_") || name.starts_with("AWS_") || name == "DATABASE_URL"
    };
    let mut changes: Vec<EnvChange> = vars
        .iter()
        .filter(|(name, value)| value.is_empty() && (ours(name) || name.ends_with("_FILE")))
        .map(|(name, _)| EnvChange::Unset(name.clone()))
        .collect();
    let set = |name: &str| vars.get(name).filter(|v| !v.is_empty());
    for name in SECRET_VARS {
        let file_var = format!("{name}_FILE");
        let Some(path) = set(&file_var) else {
            continue;
        };
        if set(name).is_some() {
            return Err(EnvError::Both {
                name: (*name).to_owned(),
            });
        }
        let text = read(std::path::Path::new(path)).map_err(|e| EnvError::Unreadable {
            name: (*name).to_owned(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let value = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        changes.push(EnvChange::Set((*name).to_owned(), value.to_owned()));
    }
    Ok(changes)
}

/// Applies [`env_changes`] to this process's environment. Call it first thing in `main`,
/// before any thread starts (changing the environment is not thread-safe).
pub fn prepare_env() -> std::result::Result<(), EnvError> {
    let vars = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)));
    let changes = env_changes(vars, |p| std::fs::read_to_string(p))?;
    for change in changes {
        match change {
            EnvChange::Unset(name) => std::env::remove_var(name),
            EnvChange::Set(name, value) => std::env::set_var(name, value),
        }
    }
    Ok(())
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

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn files(path: &std::path::Path) -> std::io::Result<String> {
        match path.to_str() {
            Some("/run/secrets/db") => Ok("postgres://app:pw@db/x\n".into()),
            Some("/run/secrets/key") => Ok("sk-1\r\n".into()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "No such file or directory",
            )),
        }
    }

    #[test]
    fn secrets_come_from_files_and_empty_variables_count_as_unset() {
        let changes = env_changes(
            vars(&[
                ("DATABASE_URL_FILE", "/run/secrets/db"),
                ("SIDBOOTH_VLM_API_KEY_FILE", "/run/secrets/key"),
                ("SIDBOOTH_S3_ENDPOINT", ""),
                ("AWS_SECRET_ACCESS_KEY_FILE", ""),
                ("HOME", ""),
                ("SIDBOOTH_S3_BUCKET", "b"),
            ]),
            files,
        )
        .unwrap();
        assert_eq!(
            changes,
            [
                EnvChange::Unset("AWS_SECRET_ACCESS_KEY_FILE".into()),
                EnvChange::Unset("SIDBOOTH_S3_ENDPOINT".into()),
                EnvChange::Set("DATABASE_URL".into(), "postgres://app:pw@db/x".into()),
                EnvChange::Set("SIDBOOTH_VLM_API_KEY".into(), "sk-1".into()),
            ],
            "other programs' variables are left alone; one trailing newline is dropped"
        );
    }

    #[test]
    fn a_secret_set_twice_or_in_a_missing_file_is_refused() {
        let both = env_changes(
            vars(&[
                ("DATABASE_URL", "postgres://x"),
                ("DATABASE_URL_FILE", "/run/secrets/db"),
            ]),
            files,
        );
        assert_eq!(
            both.unwrap_err().to_string(),
            "DATABASE_URL and DATABASE_URL_FILE are both set; set one"
        );
        let missing = env_changes(vars(&[("AWS_SECRET_ACCESS_KEY_FILE", "/nope")]), files);
        let message = missing.unwrap_err().to_string();
        assert!(
            message.starts_with("AWS_SECRET_ACCESS_KEY_FILE names /nope, which cannot be read"),
            "{message}"
        );
        // An empty value beside a file is no conflict: it counts as unset.
        let changes = env_changes(
            vars(&[
                ("DATABASE_URL", ""),
                ("DATABASE_URL_FILE", "/run/secrets/db"),
            ]),
            files,
        )
        .unwrap();
        assert!(changes.contains(&EnvChange::Unset("DATABASE_URL".into())));
    }
}
