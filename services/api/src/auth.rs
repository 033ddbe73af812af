//! Bearer-key authentication for every `/v1` route (keys that authenticated recently are
//! remembered by [`crate::key_cache`]).

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{ConnectInfo, Request, State},
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

/// Middleware: resolves the key to its tenant or answers 401. A client address that failed too
/// often recently is answered 429 without its key being looked at, so guessing keys costs a
/// minute per few tries.
pub async fn require_tenant(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let client = client_address(&state, &request);
    let limiter = state.auth_failures().zip(client);
    if let Some((buckets, ip)) = limiter {
        if let Some(retry_after) = buckets.wait(&ip) {
            return Err(ApiError::RateLimited {
                what: "too many failed authentications from this address",
                retry_after,
            });
        }
    }
    // The key is taken out of the request first: a borrowed request does not cross an await.
    let key = bearer(&request).map(str::to_owned);
    let tenant = match authenticate(&state, key).await {
        Err(e @ ApiError::Unauthorized(_)) => {
            if let Some((buckets, ip)) = limiter {
                buckets.spend(&ip);
            }
            return Err(e);
        }
        other => other?,
    };
    tracing::Span::current().record("tenant_id", tracing::field::display(tenant));
    request.extensions_mut().insert(Tenant(tenant));
    Ok(next.run(request).await)
}

async fn authenticate(state: &AppState, key: Result<String, ApiError>) -> Result<Uuid, ApiError> {
    let key = key?;
    state
        .key_cache()
        .authenticate(state.pool(), &key)
        .await?
        .ok_or(ApiError::Unauthorized("the API key is unknown or revoked"))
}

/// The client's address: the configured header's first entry when the API runs behind a proxy
/// that sets it, else the TCP peer.
fn client_address(state: &AppState, request: &Request) -> Option<IpAddr> {
    if let Some(name) = &state.config().client_address_header {
        let forwarded = request
            .headers()
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok());
        if forwarded.is_some() {
            return forwarded;
        }
    }
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}
