//! sidbooth's HTTP API: routes, authentication, input limits, problem details, SSE, metrics and
//! the OpenAPI document. Everything below HTTP lives in `sidbooth-core`.
//!
//! ```text
//! let state = AppState::new(pool, storage, ApiConfig::default());
//! let listener = tokio::net::TcpListener::bind(state.config().bind).await?;
//! sidbooth_api::serve(listener, state, shutdown_signal()).await?;
//! ```

pub mod auth;
pub mod config;
pub mod error;
mod events;
pub mod events_url;
pub mod handlers;
mod key_cache;
pub mod metrics;
pub mod model;
pub mod openapi;
mod quota;
mod rate_limit;
pub mod routes;
pub mod state;
pub mod upload;

use std::future::Future;

use axum::{
    extract::{DefaultBodyLimit, Request},
    http::{header, HeaderName, HeaderValue, Method, Uri},
    middleware,
    response::{IntoResponse, Response},
    Router,
};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

pub use config::ApiConfig;
pub use error::{ApiError, Problem};
pub use state::AppState;

use routes::{Access, Body};

async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_owned())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("a handler panicked".into()).into_response()
}

fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id,
        tenant_id = tracing::field::Empty,
        job_id = tracing::field::Empty,
    )
}

/// The API's router, with authentication, body limits, metrics, tracing (a span per request
/// carrying its `x-request-id`) and problem responses for unknown routes and panics.
pub fn router(state: AppState) -> Router {
    metrics::install_recorder();
    let upload_limit = usize::try_from(state.config().max_request_bytes).unwrap_or(usize::MAX);
    let mut router = Router::new();
    for route in routes::table() {
        let mut handler = route.handler;
        if route.body == Body::Upload {
            handler = handler.layer(DefaultBodyLimit::max(upload_limit));
        }
        handler = match route.access {
            Access::Public => handler,
            Access::Tenant => handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::require_tenant,
            )),
            Access::TenantOrEventsToken => handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::require_tenant_or_events_token,
            )),
        };
        router = router.route(route.path, handler);
    }
    let cors = cors(state.config());
    let router = router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(metrics::track))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(CatchPanicLayer::custom(panic_response)),
        )
        .with_state(state);
    // Outermost: preflights are answered before routing, and every answer (401s, 429s,
    // problems) carries the headers a page needs to read it.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// CORS for the configured origins: the methods and headers the API takes (the multipart POST
/// with `Authorization` and `Idempotency-Key` needs a preflight) and the response headers a
/// page may read. No origins: no cross-origin access.
fn cors(config: &ApiConfig) -> Option<CorsLayer> {
    let origins = &config.cors_allowed_origins;
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let layer = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([
            header::LOCATION,
            header::RETRY_AFTER,
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("idempotent-replayed"),
        ])
        .max_age(std::time::Duration::from_secs(3600));
    Some(layer)
}

/// Serves until `shutdown` completes, then drains: no new connections, open requests finish,
/// and event streams end. The webhook dispatcher (and the retention sweeper, when retention is
/// on) run beside the server and stop with it, after the work they have in hand.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = state.shutdown_token().clone();
    let dispatcher =
        sidbooth_webhooks::Dispatcher::new(state.pool().clone(), state.config().webhooks.clone())
            .map_err(std::io::Error::other)?;
    let dispatching = tokio::spawn(dispatcher.run(token.clone()));
    let sweeping = state.config().retention().map(|retention| {
        let sweeper = sidbooth_core::retention::Sweeper::new(
            state.pool().clone(),
            state.storage().clone(),
            retention,
        );
        tokio::spawn(sweeper.run(state.config().retention_sweep(), token.clone()))
    });
    let app = router(state);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "API listening");
    }
    // The peer address reaches the middleware (failed-authentication limits per client).
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown({
        let token = token.clone();
        async move {
            shutdown.await;
            tracing::info!("API draining");
            token.cancel();
        }
    })
    .await;
    // A server that failed to run stops the dispatcher too.
    token.cancel();
    let _ = dispatching.await;
    if let Some(sweeping) = sweeping {
        let _ = sweeping.await;
    }
    served
}
