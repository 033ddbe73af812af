//! `GET /v1/jobs/{id}/report`: the evaluate stage's report, as JSON or as the page a person
//! reads (`Accept: text/html`).

use axum::{
    extract::State,
    http::{header, HeaderMap, HeaderValue},
    response::{IntoResponse, Response},
    Extension,
};
use sidbooth_core::CoreError;
use sidbooth_domain::report::Report;

use crate::{
    auth::Tenant,
    error::{ApiError, Problem},
    handlers::JobId,
    state::AppState,
};

const REPORT_JSON: &str = "report.json";
const REPORT_HTML: &str = "report.html";

/// Which representation an `Accept` header asks for: HTML only when it prefers `text/html` to
/// JSON (a browser does), JSON for `*/*`, no header or `application/json`; `None` when it
/// accepts neither.
fn negotiate(headers: &HeaderMap) -> Option<&'static str> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Some(REPORT_JSON);
    };
    let (mut html, mut json) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut params = range.split(';');
        let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = params
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "text/html" => html = html.max(q),
            "application/json" => json = json.max(q),
            // Wildcards stand for JSON, slightly below an explicit type.
            "*/*" | "application/*" => json = json.max(q * 0.99),
            "text/*" => html = html.max(q * 0.99),
            _ => {}
        }
    }
    match (html, json) {
        (h, j) if h <= 0.0 && j <= 0.0 => None,
        (h, j) if h > j => Some(REPORT_HTML),
        _ => Some(REPORT_JSON),
    }
}

/// The job's evaluation report.
///
/// `report.json` by default (schema `Report`); `report.html`, one self-contained page, when
/// the `Accept` header prefers `text/html`. 404 `no-report` until the evaluate stage has
/// written it.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/report",
    operation_id = "getReport",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The report", content(
            (Report = "application/json"),
            (String = "text/html"),
        )),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant, or no report yet (`no-report`)", body = Problem, content_type = "application/problem+json"),
        (status = 406, description = "The Accept header allows neither JSON nor HTML", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database or storage is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    JobId(id): JobId,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let name = negotiate(&headers).ok_or_else(|| {
        ApiError::NotAcceptable("the report is served as application/json or text/html".into())
    })?;
    state.jobs().get(tenant, id).await?;
    let no_report =
        || ApiError::NoReport("the job has no report; the evaluate stage writes it".into());
    let artifact = state
        .jobs()
        .artifacts(id)
        .await?
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(no_report)?;
    let bytes = match state.storage().get(&artifact.object_key).await {
        Ok(bytes) => bytes,
        Err(CoreError::NotFound) => return Err(no_report()),
        Err(e) => return Err(e.into()),
    };
    let content_type = if name == REPORT_HTML {
        "text/html; charset=utf-8"
    } else {
        "application/json"
    };
    let mut response = bytes.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::VARY, HeaderValue::from_static("accept"));
    // The page is self-contained; this keeps it from loading anything even if it tried.
    if name == REPORT_HTML {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
            ),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> Option<&'static str> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        negotiate(&h)
    }

    #[test]
    fn browsers_get_html_and_clients_json() {
        assert_eq!(negotiate(&HeaderMap::new()), Some(REPORT_JSON));
        assert_eq!(accept("*/*"), Some(REPORT_JSON));
        assert_eq!(accept("application/json"), Some(REPORT_JSON));
        assert_eq!(
            accept("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            Some(REPORT_HTML)
        );
        assert_eq!(accept("text/html"), Some(REPORT_HTML));
        assert_eq!(
            accept("application/json, text/html;q=0.5"),
            Some(REPORT_JSON)
        );
        assert_eq!(accept("image/png"), None);
        assert_eq!(accept("text/html;q=0"), None);
    }
}
