//! What a page in a browser needs: CORS for the configured origins, and a signed events URL its
//! `EventSource` can open without an `Authorization` header.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sidbooth_api::ApiConfig;

use crate::support::{assert_problem, SseReader, TestApp};

const PAGE: &str = "http://127.0.0.1:5173";

fn with_origin() -> ApiConfig {
    ApiConfig {
        cors_allowed_origins: vec![PAGE.to_owned()],
        ..ApiConfig::default()
    }
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn the_upload_preflight_of_an_allowed_origin_passes() {
    let app = TestApp::with_config(with_origin()).await;
    let preflight = app
        .client
        .request(Method::OPTIONS, app.url("/v1/jobs"))
        .header("origin", PAGE)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,idempotency-key",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        header(&preflight, "access-control-allow-origin"),
        Some(PAGE)
    );
    let allowed = header(&preflight, "access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    for name in ["authorization", "idempotency-key", "content-type"] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    assert!(header(&preflight, "access-control-allow-methods")
        .unwrap()
        .contains("POST"));

    // The POST itself: the page can read Location and x-request-id.
    let job = app
        .post_job(&crate::support::dog_spec(), crate::support::dog_photos(1))
        .await;
    assert_eq!(job.status(), StatusCode::ACCEPTED);
    let response = app
        .get("/v1/jobs")
        .header("origin", PAGE)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "access-control-allow-origin"), Some(PAGE));
    let exposed = header(&response, "access-control-expose-headers")
        .unwrap()
        .to_ascii_lowercase();
    for name in ["location", "retry-after", "x-request-id"] {
        assert!(exposed.contains(name), "{name} in {exposed}");
    }
    // A refusal carries the headers too, so the page can read the problem.
    let refused = app
        .client
        .get(app.url("/v1/jobs"))
        .header("origin", PAGE)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&refused, "access-control-allow-origin"), Some(PAGE));
    assert_problem(refused, StatusCode::UNAUTHORIZED, "unauthorized").await;
    app.shutdown().await;
}

#[tokio::test]
async fn other_origins_and_unconfigured_servers_get_no_cors() {
    let app = TestApp::with_config(with_origin()).await;
    let other = app
        .client
        .request(Method::OPTIONS, app.url("/v1/jobs"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&other, "access-control-allow-origin"), None);
    app.shutdown().await;

    let plain = TestApp::start().await;
    let preflight = plain
        .client
        .request(Method::OPTIONS, plain.url("/v1/jobs"))
        .header("origin", PAGE)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&preflight, "access-control-allow-origin"), None);
    assert_problem(
        preflight,
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
    )
    .await;
    plain.shutdown().await;
}

#[tokio::test]
async fn a_signed_events_url_streams_one_job_without_a_key() {
    let app = TestApp::start().await;
    let id = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    let other_job = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    let minted = app
        .request(Method::POST, &format!("/v1/jobs/{id}/events-url"))
        .send()
        .await
        .unwrap();
    assert_eq!(minted.status(), StatusCode::OK);
    let minted: Value = minted.json().await.unwrap();
    let url = minted["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("/v1/jobs/{id}/events?token=")),
        "{url}"
    );
    assert!(minted["expires_at"].as_str().is_some());

    let stream = app.client.get(app.url(url)).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut events = SseReader::new(stream);
    let first = events
        .next(Duration::from_secs(10))
        .await
        .expect("an event");
    let data: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(data["job_id"], id.as_str());

    // The token is for that job only, and cannot be altered.
    let token = url.split_once("token=").unwrap().1;
    let elsewhere = app
        .client
        .get(app.url(&format!("/v1/jobs/{other_job}/events?token={token}")))
        .send()
        .await
        .unwrap();
    assert_problem(elsewhere, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let mut forged = token.to_owned();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let altered = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events?token={forged}")))
        .send()
        .await
        .unwrap();
    assert_problem(altered, StatusCode::UNAUTHORIZED, "unauthorized").await;

    // Another tenant cannot mint one for this job.
    let other = app.other_tenant_key().await;
    let theirs = app
        .client
        .post(app.url(&format!("/v1/jobs/{id}/events-url")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_problem(theirs, StatusCode::NOT_FOUND, "not-found").await;
    app.shutdown().await;
}
