//! How a stage can end other than by finishing, and what the worker does about each.
//!
//! | kind | examples | the worker |
//! |---|---|---|
//! | [`StageError::Transient`] | VLM timeouts, 429/5xx after the client's retries, storage and database errors | `Queue::retry_later` (exponential backoff; fails after the job's max attempts with the error recorded) |
//! | [`StageError::Permanent`] | invalid descriptions with review off, an input photo missing or unreadable, no VLM configured | `Queue::fail` with the code and message |
//! | [`StageError::LeaseLost`] | another worker took the job over, it was deleted | stops quietly |
//! | [`StageError::Interrupted`] | cancellation, lease lost, shutdown in release mode | mark canceled, stop, or release |

use sidbooth_core::{CoreError, JobError};
use sidbooth_domain::Stage;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Worth another try later.
    #[error("{code}: {message}")]
    Transient { code: &'static str, message: String },
    /// Another try would fail the same way.
    #[error("{code}: {message}")]
    Permanent { code: &'static str, message: String },
    /// The lease was taken over; nothing more may be written to the job.
    #[error("the lease on the job was lost")]
    LeaseLost,
    /// The stage was stopped from outside (cancel, lease lost, shutdown).
    #[error("the stage was interrupted")]
    Interrupted,
}

impl StageError {
    pub fn transient(code: &'static str, message: impl Into<String>) -> Self {
        StageError::Transient {
            code,
            message: message.into(),
        }
    }

    pub fn permanent(code: &'static str, message: impl Into<String>) -> Self {
        StageError::Permanent {
            code,
            message: message.into(),
        }
    }

    /// The error recorded on the job, for the two kinds that are recorded.
    pub fn job_error(&self, stage: Option<Stage>) -> Option<JobError> {
        match self {
            StageError::Transient { code, message } | StageError::Permanent { code, message } => {
                Some(JobError {
                    code: (*code).to_owned(),
                    message: message.clone(),
                    stage,
                })
            }
            StageError::LeaseLost | StageError::Interrupted => None,
        }
    }

    /// Short label for metrics and logs.
    pub fn outcome(&self) -> &'static str {
        match self {
            StageError::Transient { .. } => "transient_error",
            StageError::Permanent { .. } => "failed",
            StageError::LeaseLost => "lease_lost",
            StageError::Interrupted => "interrupted",
        }
    }
}

impl From<CoreError> for StageError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::LeaseLost => StageError::LeaseLost,
            CoreError::Database(e) => StageError::transient("database_error", e.to_string()),
            CoreError::Storage(msg) => StageError::transient("storage_error", msg),
            CoreError::Migrate(e) => StageError::transient("database_error", e.to_string()),
            CoreError::NotFound => {
                StageError::permanent("not_found", "a stored object or row is missing")
            }
            CoreError::Corrupt(msg) => StageError::permanent("corrupt_data", msg),
            CoreError::Conflict(msg) => StageError::permanent("conflict", msg),
            CoreError::IdempotencyMismatch => StageError::permanent("conflict", e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_errors_are_classified() {
        assert!(matches!(
            StageError::from(CoreError::LeaseLost),
            StageError::LeaseLost
        ));
        assert!(matches!(
            StageError::from(CoreError::Storage("down".into())),
            StageError::Transient {
                code: "storage_error",
                ..
            }
        ));
        assert!(matches!(
            StageError::from(CoreError::Database(sqlx::Error::PoolTimedOut)),
            StageError::Transient {
                code: "database_error",
                ..
            }
        ));
        assert!(matches!(
            StageError::from(CoreError::Corrupt("bad".into())),
            StageError::Permanent {
                code: "corrupt_data",
                ..
            }
        ));
        let e = StageError::permanent("description_invalid", "image 2: empty");
        let job_error = e.job_error(Some(Stage::Describe)).unwrap();
        assert_eq!(job_error.code, "description_invalid");
        assert_eq!(job_error.stage, Some(Stage::Describe));
        assert!(StageError::LeaseLost.job_error(None).is_none());
    }
}
