//! One error type for the core layer. The API maps each kind to an HTTP status in one place.

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("not found")]
    NotFound,
    /// The request conflicts with the job's current state (e.g. editing descriptions of a job that
    /// is not awaiting review). The message says what the state is.
    #[error("{0}")]
    Conflict(String),
    /// The same idempotency key was used with a different request body.
    #[error("the Idempotency-Key was already used for a different request")]
    IdempotencyMismatch,
    /// A worker's lease on the job was taken over (or the job was canceled or deleted); the worker
    /// must stop writing to it.
    #[error("the lease on this job was lost")]
    LeaseLost,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

impl CoreError {
    /// The database or storage could not be reached (down, restarting, out of connections):
    /// worth trying again later, and nothing was changed. Storage errors are all reported as
    /// such; the S3 client has retried them already.
    pub fn is_unavailable(&self) -> bool {
        match self {
            CoreError::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                        | sqlx::Error::Protocol(_)
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    // Class 08 (connection exception), 57P01-57P03 (shutdown, cannot connect now).
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P"))
            }
            CoreError::Storage(_) => true,
            _ => false,
        }
    }
}

impl From<serde_json::Error> for CoreError {
    fn from(e: serde_json::Error) -> Self {
        CoreError::Corrupt(e.to_string())
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
