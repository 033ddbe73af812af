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

impl From<serde_json::Error> for CoreError {
    fn from(e: serde_json::Error) -> Self {
        CoreError::Corrupt(e.to_string())
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
