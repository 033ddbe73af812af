//! Request handlers, one module per resource.

pub mod artifacts;
pub mod descriptions;
pub mod events;
pub mod jobs;
pub mod masks;
pub mod ops;
pub mod report;
pub mod usage;
pub mod webhooks;

use axum::{
    extract::{FromRequestParts, Path},
    http::request::Parts,
};
use uuid::Uuid;

use crate::error::ApiError;

/// The `{id}` of a job route. An id that is not a UUID names no job: 404, like any other
/// unknown id. Recorded on the request span.
#[derive(Debug, Clone, Copy)]
pub struct JobId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<Uuid>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NotFound)?;
        tracing::Span::current().record("job_id", tracing::field::display(id));
        Ok(JobId(id))
    }
}

/// A page's `limit` query parameter: 1 to 100, `default` when absent.
pub(crate) fn page_limit(raw: Option<&str>, default: u32) -> Result<u32, ApiError> {
    match raw {
        None => Ok(default),
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::InvalidRequest("limit must be 1 to 100".into())),
    }
}
