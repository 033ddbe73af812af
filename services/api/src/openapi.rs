//! The OpenAPI 3.1 document, generated from the handlers' annotations and the types they use.
//! The committed `openapi.yaml` at the repository root is checked against it by a test.

use std::sync::OnceLock;

use axum::{
    http::{header, StatusCode},
    response::IntoResponse,
};
use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use crate::{error, handlers, model};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sidbooth API",
        description = "Upload photos of a subject and get Selectively Informative Descriptions \
                       back. Errors are RFC 9457 problem details with a stable `type` URI per \
                       cause.",
        license(name = "Apache-2.0"),
    ),
    paths(
        handlers::jobs::create,
        handlers::jobs::list,
        handlers::jobs::get,
        handlers::jobs::delete,
        handlers::jobs::approve,
        handlers::jobs::cancel,
        handlers::descriptions::get,
        handlers::descriptions::edit,
        handlers::masks::replace,
        handlers::report::get,
        handlers::events::stream,
        handlers::events::signed_url,
        handlers::artifacts::list,
        handlers::usage::get,
        handlers::webhooks::create,
        handlers::webhooks::list,
        handlers::webhooks::delete,
        handlers::webhooks::deliveries,
        handlers::ops::healthz,
        handlers::ops::readyz,
        handlers::ops::metrics,
        serve,
    ),
    components(schemas(
        model::Job,
        model::JobErrorBody,
        model::JobLinks,
        model::JobList,
        model::CreateJobForm,
        model::Descriptions,
        model::DescriptionBody,
        model::MaskBody,
        model::WarningBody,
        model::EditDescriptions,
        model::DescriptionEdit,
        model::Artifacts,
        model::ArtifactBody,
        model::Health,
        model::Readiness,
        model::NewWebhook,
        model::Webhook,
        model::CreatedWebhook,
        model::Webhooks,
        model::WebhookEvent,
        model::DeliveryBody,
        model::DeliveryTry,
        model::Deliveries,
        model::EventsUrl,
        model::TenantLimits,
        model::TenantUsage,
        model::UsageBody,
        error::Problem,
        error::FieldError,
        sidbooth_domain::report::Report,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "jobs", description = "Jobs: photos in, descriptions and artifacts out"),
        (name = "descriptions", description = "Reviewing and editing descriptions"),
        (name = "webhooks", description = "Being told when a job changes, instead of polling"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `sidbooth keys create --tenant NAME`"))
                    .build(),
            ),
        );
    }
}

/// The document as a value.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as YAML, rendered once.
pub fn yaml() -> &'static str {
    static YAML: OnceLock<String> = OnceLock::new();
    YAML.get_or_init(|| {
        document()
            .to_yaml()
            .expect("the OpenAPI document serialises to YAML")
    })
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/openapi.yaml",
    operation_id = "openapiDocument",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/yaml", body = String))
)]
pub async fn serve() -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/yaml")],
        yaml(),
    )
}
