//! The route table: every (method, path) the API serves, its handler and whether it needs an
//! API key. [`router`](crate::router) builds the axum router from it, and the OpenAPI test checks
//! the document against [`routes`], so a route cannot be served without being documented.

use axum::{
    handler::Handler,
    http::Method,
    routing::{on, MethodFilter, MethodRouter},
};

use crate::{
    handlers::{artifacts, descriptions, events, jobs, masks, ops, report, usage, webhooks},
    state::AppState,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Open: health, readiness, metrics, the OpenAPI document.
    Public,
    /// Needs `Authorization: Bearer <key>`; the handler acts for the key's tenant.
    Tenant,
    /// A job's event stream: a key, or the `token` of a signed events URL for that job.
    TenantOrEventsToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// axum's default limit (2 MiB): JSON bodies.
    Default,
    /// The configured request limit: photo uploads.
    Upload,
}

pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub body: Body,
    pub(crate) handler: MethodRouter<AppState>,
}

fn route<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
    Route {
        method,
        path,
        access,
        body: Body::Default,
        handler: on(filter, handler),
    }
}

pub(crate) fn table() -> Vec<Route> {
    use Access::{Public, Tenant, TenantOrEventsToken};
    vec![
        Route {
            body: Body::Upload,
            ..route(Method::POST, "/v1/jobs", Tenant, jobs::create)
        },
        route(Method::GET, "/v1/jobs", Tenant, jobs::list),
        route(Method::GET, "/v1/jobs/{id}", Tenant, jobs::get),
        route(Method::DELETE, "/v1/jobs/{id}", Tenant, jobs::delete),
        route(Method::POST, "/v1/jobs/{id}/approve", Tenant, jobs::approve),
        route(Method::POST, "/v1/jobs/{id}/cancel", Tenant, jobs::cancel),
        route(
            Method::GET,
            "/v1/jobs/{id}/descriptions",
            Tenant,
            descriptions::get,
        ),
        route(
            Method::PUT,
            "/v1/jobs/{id}/descriptions",
            Tenant,
            descriptions::edit,
        ),
        Route {
            body: Body::Upload,
            ..route(
                Method::PUT,
                "/v1/jobs/{id}/masks/{n}",
                Tenant,
                masks::replace,
            )
        },
        route(Method::GET, "/v1/jobs/{id}/report", Tenant, report::get),
        route(
            Method::GET,
            "/v1/jobs/{id}/events",
            TenantOrEventsToken,
            events::stream,
        ),
        route(
            Method::POST,
            "/v1/jobs/{id}/events-url",
            Tenant,
            events::signed_url,
        ),
        route(
            Method::GET,
            "/v1/jobs/{id}/artifacts",
            Tenant,
            artifacts::list,
        ),
        route(Method::GET, "/v1/usage", Tenant, usage::get),
        route(Method::POST, "/v1/webhooks", Tenant, webhooks::create),
        route(Method::GET, "/v1/webhooks", Tenant, webhooks::list),
        route(
            Method::DELETE,
            "/v1/webhooks/{id}",
            Tenant,
            webhooks::delete,
        ),
        route(
            Method::GET,
            "/v1/webhooks/{id}/deliveries",
            Tenant,
            webhooks::deliveries,
        ),
        route(Method::GET, "/healthz", Public, ops::healthz),
        route(Method::GET, "/readyz", Public, ops::readyz),
        route(Method::GET, "/metrics", Public, ops::metrics),
        route(Method::GET, "/openapi.yaml", Public, crate::openapi::serve),
    ]
}

/// Every (method, path, access) the router serves.
pub fn routes() -> Vec<(Method, &'static str, Access)> {
    table()
        .into_iter()
        .map(|r| (r.method, r.path, r.access))
        .collect()
}
