//! Why a job spec was refused (its own file: the spec and the training settings both raise it).

/// Why a spec was refused. Each variant maps to one stable problem type in the API.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("stage {0:?} is not available in this version of sidbooth")]
    StageNotImplemented(&'static str),
    #[error("training method {0:?} is not available in this version of sidbooth")]
    MethodNotImplemented(String),
    #[error("{0}")]
    Invalid(String),
}
