//! The API's one error type and its one table from cause to HTTP status and problem type.
//!
//! Every handler returns `Result<_, ApiError>`; [`ApiError::kind`] is the only place that decides
//! which status and which `https://sidbooth.dev/problems/...` type a cause gets. Responses are
//! RFC 9457 problem details (`application/problem+json`).

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use sidbooth_core::CoreError;
use sidbooth_domain::{SpecError, TextError};
use utoipa::ToSchema;

/// `Retry-After` of a 503 `unavailable`: long enough for a restarted database to accept
/// connections again.
const UNAVAILABLE_RETRY_AFTER_SECS: &str = "5";

/// Base of every problem type URI.
pub const PROBLEM_BASE: &str = "https://sidbooth.dev/problems/";

/// One stable problem type: its slug (the last segment of the type URI), status and title.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProblemKind {
    pub slug: &'static str,
    pub status: StatusCode,
    pub title: &'static str,
}

impl ProblemKind {
    const fn new(slug: &'static str, status: StatusCode, title: &'static str) -> Self {
        Self {
            slug,
            status,
            title,
        }
    }

    pub fn type_uri(&self) -> String {
        format!("{PROBLEM_BASE}{}", self.slug)
    }
}

/// Every problem type the API answers with.
pub mod kinds {
    use super::ProblemKind;
    use axum::http::StatusCode as S;

    pub const UNAUTHORIZED: ProblemKind = ProblemKind::new(
        "unauthorized",
        S::UNAUTHORIZED,
        "Missing or invalid API key",
    );
    pub const NOT_FOUND: ProblemKind = ProblemKind::new("not-found", S::NOT_FOUND, "Not found");
    pub const METHOD_NOT_ALLOWED: ProblemKind = ProblemKind::new(
        "method-not-allowed",
        S::METHOD_NOT_ALLOWED,
        "Method not allowed",
    );
    pub const CONFLICT: ProblemKind = ProblemKind::new(
        "conflict",
        S::CONFLICT,
        "The job is not in a state that allows this",
    );
    pub const IDEMPOTENCY_KEY_REUSED: ProblemKind = ProblemKind::new(
        "idempotency-key-reused",
        S::UNPROCESSABLE_ENTITY,
        "Idempotency-Key already used for a different request",
    );
    pub const INVALID_REQUEST: ProblemKind =
        ProblemKind::new("invalid-request", S::BAD_REQUEST, "Malformed request");
    pub const INVALID_SPEC: ProblemKind =
        ProblemKind::new("invalid-spec", S::UNPROCESSABLE_ENTITY, "Invalid job spec");
    pub const INVALID_SUBJECT_CLASS: ProblemKind = ProblemKind::new(
        "invalid-subject-class",
        S::UNPROCESSABLE_ENTITY,
        "Invalid subject class",
    );
    pub const INVALID_TOKEN: ProblemKind = ProblemKind::new(
        "invalid-token",
        S::UNPROCESSABLE_ENTITY,
        "Invalid identifier token",
    );
    pub const STAGE_NOT_AVAILABLE: ProblemKind = ProblemKind::new(
        "stage-not-available",
        S::UNPROCESSABLE_ENTITY,
        "Stage not available in this version",
    );
    pub const METHOD_NOT_AVAILABLE: ProblemKind = ProblemKind::new(
        "method-not-available",
        S::UNPROCESSABLE_ENTITY,
        "Training method not available in this version",
    );
    pub const INVALID_DESCRIPTION: ProblemKind = ProblemKind::new(
        "invalid-description",
        S::UNPROCESSABLE_ENTITY,
        "Invalid description",
    );
    pub const NO_IMAGES: ProblemKind =
        ProblemKind::new("no-images", S::UNPROCESSABLE_ENTITY, "No images");
    pub const TOO_MANY_IMAGES: ProblemKind = ProblemKind::new(
        "too-many-images",
        S::UNPROCESSABLE_ENTITY,
        "Too many images",
    );
    pub const FILE_TOO_LARGE: ProblemKind =
        ProblemKind::new("file-too-large", S::PAYLOAD_TOO_LARGE, "File too large");
    pub const REQUEST_TOO_LARGE: ProblemKind = ProblemKind::new(
        "request-too-large",
        S::PAYLOAD_TOO_LARGE,
        "Request too large",
    );
    pub const UNSUPPORTED_IMAGE_TYPE: ProblemKind = ProblemKind::new(
        "unsupported-image-type",
        S::UNSUPPORTED_MEDIA_TYPE,
        "Unsupported image type",
    );
    pub const CORRUPT_IMAGE: ProblemKind =
        ProblemKind::new("corrupt-image", S::UNPROCESSABLE_ENTITY, "Corrupt image");
    pub const IMAGE_TOO_LARGE: ProblemKind = ProblemKind::new(
        "image-too-large",
        S::UNPROCESSABLE_ENTITY,
        "Image dimensions too large",
    );
    pub const INVALID_MASK: ProblemKind = ProblemKind::new(
        "invalid-mask",
        S::UNPROCESSABLE_ENTITY,
        "Invalid subject mask",
    );
    pub const NO_REPORT: ProblemKind =
        ProblemKind::new("no-report", S::NOT_FOUND, "The job has no report (yet)");
    pub const NOT_ACCEPTABLE: ProblemKind = ProblemKind::new(
        "not-acceptable",
        S::NOT_ACCEPTABLE,
        "None of the accepted media types can be served",
    );
    pub const INVALID_WEBHOOK: ProblemKind = ProblemKind::new(
        "invalid-webhook",
        S::UNPROCESSABLE_ENTITY,
        "Webhook endpoint refused",
    );
    pub const RATE_LIMITED: ProblemKind = ProblemKind::new(
        "rate-limited",
        S::TOO_MANY_REQUESTS,
        "Too many requests; try again after Retry-After seconds",
    );
    pub const QUOTA_EXCEEDED: ProblemKind = ProblemKind::new(
        "quota-exceeded",
        S::TOO_MANY_REQUESTS,
        "A limit of the tenant is reached; try again after Retry-After seconds",
    );
    pub const UNAVAILABLE: ProblemKind = ProblemKind::new(
        "unavailable",
        S::SERVICE_UNAVAILABLE,
        "The database or storage is unavailable; try again shortly",
    );
    pub const NOT_READY: ProblemKind = ProblemKind::new(
        "not-ready",
        S::SERVICE_UNAVAILABLE,
        "A dependency is unavailable",
    );
    pub const INTERNAL: ProblemKind = ProblemKind::new(
        "internal",
        S::INTERNAL_SERVER_ERROR,
        "Internal server error",
    );

    /// Every kind, for documentation and tests.
    pub const ALL: [ProblemKind; 28] = [
        UNAUTHORIZED,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        CONFLICT,
        IDEMPOTENCY_KEY_REUSED,
        INVALID_REQUEST,
        INVALID_SPEC,
        INVALID_SUBJECT_CLASS,
        INVALID_TOKEN,
        STAGE_NOT_AVAILABLE,
        METHOD_NOT_AVAILABLE,
        INVALID_DESCRIPTION,
        NO_IMAGES,
        TOO_MANY_IMAGES,
        FILE_TOO_LARGE,
        REQUEST_TOO_LARGE,
        UNSUPPORTED_IMAGE_TYPE,
        CORRUPT_IMAGE,
        IMAGE_TOO_LARGE,
        INVALID_MASK,
        NO_REPORT,
        NOT_ACCEPTABLE,
        INVALID_WEBHOOK,
        RATE_LIMITED,
        QUOTA_EXCEEDED,
        UNAVAILABLE,
        NOT_READY,
        INTERNAL,
    ];
}

/// One item of a problem's `errors` list: which field or part, and why.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FieldError {
    /// Where: a JSON pointer into the body or spec (`/descriptions/0/text`), or `images[2]`.
    pub pointer: String,
    /// A stable machine code, e.g. a description validator code such as `missing_prefix`.
    pub code: String,
    pub message: String,
}

/// An RFC 9457 problem details body.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI that identifies the cause, stable across versions.
    #[serde(rename = "type")]
    #[schema(example = "https://sidbooth.dev/problems/too-many-images")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("no such job")]
    NotFound,
    #[error("no such webhook endpoint")]
    NoSuchWebhook,
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    InvalidSubjectClass(TextError),
    #[error("{0}")]
    InvalidToken(TextError),
    #[error("{0}")]
    StageNotAvailable(SpecError),
    #[error("{0}")]
    MethodNotAvailable(SpecError),
    #[error("{} description(s) are invalid", .0.len())]
    InvalidDescriptions(Vec<FieldError>),
    #[error("the request has no `images` part; send 1 to {max} images")]
    NoImages { max: usize },
    #[error("the request has more than {max} images")]
    TooManyImages { max: usize },
    #[error("{part} is larger than {max} bytes")]
    FileTooLarge { part: String, max: u64 },
    #[error("the request body is larger than {max} bytes")]
    RequestTooLarge { max: u64 },
    #[error("{part} is not a JPEG, PNG or WebP image")]
    UnsupportedImageType { part: String },
    #[error("{part} could not be decoded: {reason}")]
    CorruptImage { part: String, reason: String },
    #[error("{part} is {width}x{height} pixels; at most {max_mp} megapixels are accepted")]
    ImageTooLarge {
        part: String,
        width: u32,
        height: u32,
        max_mp: f64,
    },
    #[error("{}: {}", .0.pointer, .0.message)]
    InvalidMask(FieldError),
    #[error("{0}")]
    NoReport(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    InvalidWebhook(String),
    /// A client went over a limit; it may try again after `retry_after`.
    #[error("{what}; try again in {} s", retry_after_secs(*.retry_after))]
    RateLimited {
        what: &'static str,
        retry_after: std::time::Duration,
    },
    /// The tenant is at one of its limits (queued jobs, daily seconds); `retry_after` says when
    /// trying again is worth it.
    #[error("{what}; try again in {} s", retry_after_secs(*.retry_after))]
    QuotaExceeded {
        what: String,
        retry_after: std::time::Duration,
    },
    /// Postgres or storage did not answer; nothing was changed.
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    #[error("not ready: {}", .0.join("; "))]
    NotReady(Vec<String>),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The table: each cause's problem kind.
    pub fn kind(&self) -> ProblemKind {
        use kinds::*;
        match self {
            ApiError::Unauthorized(_) => UNAUTHORIZED,
            ApiError::NotFound | ApiError::NoSuchWebhook | ApiError::NoRoute(_) => NOT_FOUND,
            ApiError::MethodNotAllowed(_) => METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => CONFLICT,
            ApiError::IdempotencyKeyReused => IDEMPOTENCY_KEY_REUSED,
            ApiError::InvalidRequest(_) => INVALID_REQUEST,
            ApiError::InvalidSpec(_) => INVALID_SPEC,
            ApiError::InvalidSubjectClass(_) => INVALID_SUBJECT_CLASS,
            ApiError::InvalidToken(_) => INVALID_TOKEN,
            ApiError::StageNotAvailable(_) => STAGE_NOT_AVAILABLE,
            ApiError::MethodNotAvailable(_) => METHOD_NOT_AVAILABLE,
            ApiError::InvalidDescriptions(_) => INVALID_DESCRIPTION,
            ApiError::NoImages { .. } => NO_IMAGES,
            ApiError::TooManyImages { .. } => TOO_MANY_IMAGES,
            ApiError::FileTooLarge { .. } => FILE_TOO_LARGE,
            ApiError::RequestTooLarge { .. } => REQUEST_TOO_LARGE,
            ApiError::UnsupportedImageType { .. } => UNSUPPORTED_IMAGE_TYPE,
            ApiError::CorruptImage { .. } => CORRUPT_IMAGE,
            ApiError::ImageTooLarge { .. } => IMAGE_TOO_LARGE,
            ApiError::InvalidMask(_) => INVALID_MASK,
            ApiError::NoReport(_) => NO_REPORT,
            ApiError::NotAcceptable(_) => NOT_ACCEPTABLE,
            ApiError::InvalidWebhook(_) => INVALID_WEBHOOK,
            ApiError::RateLimited { .. } => RATE_LIMITED,
            ApiError::QuotaExceeded { .. } => QUOTA_EXCEEDED,
            ApiError::Unavailable(_) => UNAVAILABLE,
            ApiError::NotReady(_) => NOT_READY,
            ApiError::Internal(_) => INTERNAL,
        }
    }

    pub fn problem(&self) -> Problem {
        let kind = self.kind();
        let detail = match self {
            // Internal details go to the log, not to the client.
            ApiError::Internal(_) => "an internal error occurred; it has been logged".to_owned(),
            other => other.to_string(),
        };
        let errors = match self {
            ApiError::InvalidDescriptions(errors) => errors.clone(),
            ApiError::InvalidMask(error) => vec![error.clone()],
            _ => Vec::new(),
        };
        Problem {
            type_: kind.type_uri(),
            title: kind.title.to_owned(),
            status: kind.status.as_u16(),
            detail,
            errors,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.kind();
        if kind.status.is_server_error() {
            tracing::error!(error = %self, problem = kind.slug, "request failed");
        } else {
            tracing::debug!(error = %self, problem = kind.slug, "request refused");
        }
        let mut response = (kind.status, Json(self.problem())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if kind == kinds::UNAVAILABLE {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(UNAVAILABLE_RETRY_AFTER_SECS),
            );
        }
        if let ApiError::RateLimited { retry_after, .. }
        | ApiError::QuotaExceeded { retry_after, .. } = &self
        {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(*retry_after)),
            );
        }
        if kind == kinds::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sidbooth\""),
            );
        }
        response
    }
}

/// Whole seconds for `Retry-After`, rounded up (at least 1).
fn retry_after_secs(d: std::time::Duration) -> u64 {
    (d.as_secs_f64().ceil() as u64).max(1)
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotFound => ApiError::NotFound,
            CoreError::Conflict(message) => ApiError::Conflict(message),
            CoreError::IdempotencyMismatch => ApiError::IdempotencyKeyReused,
            ref other if other.is_unavailable() => {
                tracing::warn!(error = %other, "a dependency is unavailable");
                ApiError::Unavailable(if matches!(other, CoreError::Storage(_)) {
                    "storage"
                } else {
                    "the database"
                })
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        match e {
            SpecError::StageNotImplemented(_) => ApiError::StageNotAvailable(e),
            SpecError::MethodNotImplemented(_) => ApiError::MethodNotAvailable(e),
            SpecError::Invalid(message) => ApiError::InvalidSpec(message),
        }
    }
}

impl From<TextError> for ApiError {
    fn from(e: TextError) -> Self {
        let field = match &e {
            TextError::Empty { field }
            | TextError::TooLong { field, .. }
            | TextError::BadCharacter { field, .. } => *field,
        };
        if field == "token" {
            ApiError::InvalidToken(e)
        } else {
            ApiError::InvalidSubjectClass(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_slugs_are_unique() {
        let mut slugs: Vec<_> = kinds::ALL.iter().map(|k| k.slug).collect();
        slugs.sort();
        slugs.dedup();
        assert_eq!(slugs.len(), kinds::ALL.len());
    }

    #[test]
    fn internal_details_are_not_sent() {
        let problem = ApiError::Internal("password=hunter2".into()).problem();
        assert!(!problem.detail.contains("hunter2"));
        assert_eq!(problem.status, 500);
    }

    #[test]
    fn spec_errors_map_to_their_own_types() {
        let e: ApiError = SpecError::StageNotImplemented("train").into();
        assert_eq!(e.kind(), kinds::STAGE_NOT_AVAILABLE);
        let e: ApiError = SpecError::MethodNotImplemented("svdiff".into()).into();
        assert_eq!(e.kind(), kinds::METHOD_NOT_AVAILABLE);
        let e: ApiError = TextError::Empty { field: "token" }.into();
        assert_eq!(e.kind(), kinds::INVALID_TOKEN);
        let e: ApiError = TextError::Empty {
            field: "subject_class",
        }
        .into();
        assert_eq!(e.kind(), kinds::INVALID_SUBJECT_CLASS);
    }
}
