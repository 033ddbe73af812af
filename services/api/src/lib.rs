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
pub mod handlers;
mod key_cache;
pub mod metrics;
pub mod model;
pub mod openapi;
mod rate_limit;
pub mod routes;
pub mod state;
pub mod upload;

use std::future::Future;

use axum::{
    extract::{DefaultBodyLimit, Request},
    http::{Method, Uri},
    middleware,
    response::{IntoResponse, Response},
    Router,
};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
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
        if route.access == Access::Tenant {
            handler = handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::require_tenant,
            ));
        }
        router = router.route(route.path, handler);
    }
    router
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
        .with_state(state)
}

/// Serves until `shutdown` completes, then drains: no new connections, open requests finish,
/// and event streams end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = state.shutdown_token().clone();
    let app = router(state);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "API listening");
    }
    // The peer address reaches the middleware (failed-authentication limits per client).
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("API draining");
        token.cancel();
    })
    .await
}
