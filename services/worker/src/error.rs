//! How a stage can end other than by finishing, and what the worker does about each.
//!
//! | kind | examples | the worker |
//! |---|---|---|
//! | [`StageError::Transient`] | VLM timeouts, 429/5xx after the client's retries, storage and database errors, the engine running out of GPU/host memory or disk (`engine_resources`) | `Queue::retry_later` (exponential backoff; fails after the job's max attempts with the error recorded) |
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

    /// A failure of the engine or the evaluators in a stage whose own failures are `code`:
    /// transient (`engine_resources`) when the machine ran out of memory, disk or its GPU, which
    /// another try, later or on another worker, may not; permanent otherwise.
    pub fn engine(code: &'static str, e: impl std::fmt::Display) -> Self {
        let message = e.to_string();
        if sidbooth_engine::is_transient_failure(&message) {
            StageError::transient("engine_resources", message)
        } else {
            StageError::permanent(code, message)
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

    #[test]
    fn an_engine_that_ran_out_of_memory_or_disk_is_retried_and_a_bad_input_is_not() {
        let oom = "tensor error: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        assert!(matches!(
            StageError::engine("train_failed", oom),
            StageError::Transient {
                code: "engine_resources",
                ..
            }
        ));
        let full = std::io::Error::from_raw_os_error(28);
        assert!(matches!(
            StageError::engine("generate_failed", full),
            StageError::Transient {
                code: "engine_resources",
                ..
            }
        ));
        assert!(matches!(
            StageError::engine("train_failed", "shape mismatch in matmul"),
            StageError::Permanent {
                code: "train_failed",
                ..
            }
        ));
    }
}
