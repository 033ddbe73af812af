//! Health, readiness, metrics, the OpenAPI document and the problem types' documentation.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::Value;
use sidbooth_api::{error::kinds, routes::routes, ApiConfig, AppState};
use sidbooth_core::{
    testing::{TestDb, TestStorage},
    ArtifactStore, StorageArgs,
};

use crate::support::{assert_problem, TestApp};

#[tokio::test]
async fn healthz_and_readyz() {
    let app = TestApp::start().await;
    let health: Value = reqwest::get(app.url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let response = reqwest::get(app.url("/readyz")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["postgres"], "ok");
    assert_eq!(ready["storage"], "ok");
}

#[tokio::test]
async fn readyz_is_503_when_storage_is_unreachable() {
    let db = TestDb::new().await;
    let storage = TestStorage::start().await;
    let missing_bucket = StorageArgs {
        s3_bucket: "no-such-bucket".into(),
        ..storage.args.clone()
    };
    let store = ArtifactStore::with_static_credentials(
        &missing_bucket,
        TestStorage::ACCESS_KEY,
        TestStorage::SECRET_KEY,
    );
    let state = AppState::new(db.pool.clone(), store, ApiConfig::default());
    let app = TestApp::serve(db, storage, state).await;
    let response = reqwest::get(app.url("/readyz")).await.unwrap();
    let problem = assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "not-ready").await;
    assert!(problem["detail"].as_str().unwrap().contains("storage"));
}

#[tokio::test]
async fn metrics_count_requests_and_jobs() {
    let app = TestApp::start().await;
    let id = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    app.get(&format!("/v1/jobs/{id}")).send().await.unwrap();
    let response = reqwest::get(app.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    for expected in [
        "sidbooth_http_requests_total{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"200\"}",
        "sidbooth_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"202\"}",
        "sidbooth_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/jobs/{id}\"",
        "sidbooth_jobs{status=\"queued\"}",
        "sidbooth_jobs{status=\"failed\"} 0",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
}

fn committed_path() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi.yaml")
}

#[test]
fn openapi_yaml_matches_the_code() {
    let generated = sidbooth_api::openapi::yaml();
    let path = committed_path();
    if std::env::var_os("SIDBOOTH_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from the document the code generates; regenerate it with \
         `SIDBOOTH_UPDATE_OPENAPI=1 cargo test -p sidbooth-api openapi` and commit it",
        path.display()
    );
}

#[test]
fn every_served_route_is_documented_and_nothing_else() {
    let document = sidbooth_api::openapi::document();
    let documented: BTreeSet<(String, String)> = document
        .paths
        .paths
        .iter()
        .flat_map(|(path, item)| {
            let methods = [
                ("GET", item.get.is_some()),
                ("POST", item.post.is_some()),
                ("PUT", item.put.is_some()),
                ("DELETE", item.delete.is_some()),
                ("PATCH", item.patch.is_some()),
            ];
            methods
                .into_iter()
                .filter(|(_, present)| *present)
                .map(|(method, _)| (method.to_owned(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let served: BTreeSet<(String, String)> = routes()
        .into_iter()
        .map(|(method, path, _)| (method.to_string(), path.to_owned()))
        .collect();
    assert_eq!(served, documented);
}

#[tokio::test]
async fn the_document_is_served() {
    let app = TestApp::start().await;
    let response = reqwest::get(app.url("/openapi.yaml")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert_eq!(text, sidbooth_api::openapi::yaml());
    assert!(text.starts_with("openapi: 3.1"));
}

#[test]
fn the_readme_documents_every_problem_type() {
    let readme = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"),
    )
    .unwrap();
    for kind in kinds::ALL {
        assert!(
            readme.contains(&format!("`{}`", kind.slug)),
            "README lacks {}",
            kind.slug
        );
    }
}

#[tokio::test]
async fn responses_carry_a_request_id() {
    let app = TestApp::start().await;
    let response = reqwest::get(app.url("/healthz")).await.unwrap();
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
}
