//! Bearer-key authentication for every `/v1` route (keys that authenticated recently are
//! remembered by [`crate::key_cache`]).

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::Response,
};
use uuid::Uuid;

use crate::{error::ApiError, state::AppState};

/// The tenant a request acts for; handlers read it from the request extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenant(pub Uuid);

/// The key of `Authorization: Bearer <key>`, or why there is none.
fn bearer(request: &Request) -> Result<&str, ApiError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized(
            "the Authorization header is missing",
        ))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("the Authorization header is malformed"))?;
    let (scheme, key) = value.split_once(' ').ok_or(ApiError::Unauthorized(
        "the Authorization header is malformed",
    ))?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return Err(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <key>`",
        ));
    }
    Ok(key)
}

/// Middleware: resolves the key to its tenant or answers 401.
pub async fn require_tenant(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = bearer(&request)?;
    let tenant = state
        .key_cache()
        .authenticate(state.pool(), key)
        .await?
        .ok_or(ApiError::Unauthorized("the API key is unknown or revoked"))?;
    tracing::Span::current().record("tenant_id", tracing::field::display(tenant));
    request.extensions_mut().insert(Tenant(tenant));
    Ok(next.run(request).await)
}
