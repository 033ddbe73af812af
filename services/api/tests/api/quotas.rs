//! Limits per tenant on POST /v1/jobs, their overrides, and GET /v1/usage.

use reqwest::StatusCode;
use serde_json::Value;
use sidbooth_api::ApiConfig;
use sidbooth_core::quotas::{LimitOverrides, QuotaSettings, QuotaStore};

use crate::support::{assert_problem, dog_photos, dog_spec, TestApp};

fn limited(quotas: QuotaSettings) -> ApiConfig {
    ApiConfig {
        quotas,
        ..ApiConfig::default()
    }
}

async fn usage(app: &TestApp) -> Value {
    let response = app.get("/v1/usage").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn queued_jobs_are_limited_and_a_tenant_override_lifts_the_limit() {
    let app = TestApp::with_config(limited(QuotaSettings {
        max_queued_jobs: 2,
        ..QuotaSettings::default()
    }))
    .await;
    app.create_job(1).await;
    app.create_job(1).await;
    let refused = app.post_job(&dog_spec(), dog_photos(1)).await;
    assert!(retry_after(&refused) >= 1);
    let body = assert_problem(refused, StatusCode::TOO_MANY_REQUESTS, "quota-exceeded").await;
    assert!(
        body["detail"].as_str().unwrap().contains("queued"),
        "{body}"
    );
    assert_eq!(app.job_rows().await, 2, "the refused job stored nothing");

    let seen = usage(&app).await;
    assert_eq!(seen["limits"]["max_queued_jobs"], 2);
    assert_eq!(
        seen["limits"]["gpu_seconds_per_day"],
        Value::Null,
        "no limit"
    );
    assert_eq!(seen["usage"]["queued_jobs"], 2);
    assert_eq!(seen["usage"]["running_jobs"], 0);

    // Another tenant has its own count.
    let other = app.other_tenant_key().await;
    let theirs = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(&other)
        .multipart(crate::support::form(dog_spec().to_string(), dog_photos(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), StatusCode::ACCEPTED);

    QuotaStore::new(app.db.pool.clone())
        .set_overrides(
            "tenant-a",
            &LimitOverrides {
                max_queued_jobs: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    app.create_job(1).await;
    assert_eq!(usage(&app).await["limits"]["max_queued_jobs"], 3);
    app.shutdown().await;
}

#[tokio::test]
async fn job_posts_are_rate_limited_per_tenant_but_replays_pass() {
    let app = TestApp::with_config(limited(QuotaSettings {
        job_posts_per_minute: 2,
        ..QuotaSettings::default()
    }))
    .await;
    let first = app
        .post_job_with(&dog_spec(), dog_photos(1), Some("k-1"))
        .await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    app.create_job(1).await;
    let refused = app.post_job(&dog_spec(), dog_photos(1)).await;
    let wait = retry_after(&refused);
    assert!(
        (20..=31).contains(&wait),
        "a token comes back every 30 s: {wait}"
    );
    assert_problem(refused, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
    // Retrying the first request returns its job.
    let replay = app
        .post_job_with(&dog_spec(), dog_photos(1), Some("k-1"))
        .await;
    assert_eq!(replay.status(), StatusCode::OK);
    app.shutdown().await;
}

#[tokio::test]
async fn the_daily_accelerator_seconds_stop_new_jobs_until_midnight() {
    let app = TestApp::with_config(limited(QuotaSettings {
        gpu_seconds_per_day: 100.0,
        ..QuotaSettings::default()
    }))
    .await;
    let quotas = QuotaStore::new(app.db.pool.clone());
    quotas.add_gpu_seconds(app.tenant, 60.0).await.unwrap();
    app.create_job(1).await;
    quotas.add_gpu_seconds(app.tenant, 45.5).await.unwrap();
    let refused = app.post_job(&dog_spec(), dog_photos(1)).await;
    let wait = retry_after(&refused);
    assert!((1..=86_400).contains(&wait), "until midnight UTC: {wait}");
    let body = assert_problem(refused, StatusCode::TOO_MANY_REQUESTS, "quota-exceeded").await;
    assert!(
        body["detail"].as_str().unwrap().contains("106 of its 100"),
        "{body}"
    );
    let seen = usage(&app).await;
    assert_eq!(seen["usage"]["gpu_seconds_today"], 105.5);
    assert_eq!(seen["limits"]["gpu_seconds_per_day"], 100.0);
    app.shutdown().await;
}
