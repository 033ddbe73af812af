//! Bearer-key authentication for every `/v1` route (keys that authenticated recently are
//! remembered by [`crate::key_cache`]).

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{rejection::PathRejection, ConnectInfo, Path, Request, State},
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
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    authenticated(state, request, next, None).await
}

/// Middleware of a job's event stream: like [`require_tenant`], and without an
/// `Authorization` header also `?token=` of a signed events URL made for this job
/// ([`crate::events_url`]), which is what a browser's `EventSource` can send.
pub async fn require_tenant_or_events_token(
    State(state): State<AppState>,
    job: Result<Path<Uuid>, PathRejection>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let job = job.ok().map(|Path(id)| id);
    authenticated(state, request, next, job).await
}

/// The `token` query parameter (signed URLs' tokens need no percent-decoding).
fn events_token(request: &Request) -> Option<&str> {
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

async fn authenticated(
    state: AppState,
    mut request: Request,
    next: Next,
    events_of: Option<Uuid>,
) -> Result<Response, ApiError> {
    let client = client_address(&state, &request);
    let limiter = state.auth_failures().zip(client);
    if let Some(((buckets, rate), ip)) = limiter {
        if let Some(retry_after) = buckets.wait(&ip, rate) {
            return Err(ApiError::RateLimited {
                what: "too many failed authentications from this address",
                retry_after,
            });
        }
    }
    let token = events_of
        .filter(|_| !request.headers().contains_key(header::AUTHORIZATION))
        .zip(events_token(&request));
    let outcome = match token {
        Some((job, token)) => state
            .events_urls()
            .verify(token, job)
            .ok_or(ApiError::Unauthorized(
                "the events URL is invalid or expired; ask for a new one",
            )),
        None => {
            // The key is taken out of the request first: a borrowed request does not cross an
            // await.
            let key = bearer(&request).map(str::to_owned);
            authenticate(&state, key).await
        }
    };
    let tenant = match outcome {
        Err(e @ ApiError::Unauthorized(_)) => {
            if let Some(((buckets, rate), ip)) = limiter {
                buckets.spend(&ip, rate);
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
