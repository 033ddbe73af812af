//! Webhook endpoints over HTTP and deliveries of real job changes to a receiver on loopback.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sidbooth_api::{config::WebhookSettings, ApiConfig};
use sidbooth_webhooks::testing::Receiver;

use crate::support::{assert_problem, TestApp};

/// Loopback allowed (the receiver runs here), retries fast.
fn local_webhooks() -> ApiConfig {
    ApiConfig {
        webhooks: WebhookSettings {
            allow_private_targets: true,
            webhook_retry_base_secs: 0.05,
            webhook_retry_max_secs: 0.2,
            webhook_poll_secs: 0.05,
            ..WebhookSettings::default()
        },
        ..ApiConfig::default()
    }
}

async fn register(app: &TestApp, body: Value) -> reqwest::Response {
    app.request(Method::POST, "/v1/webhooks")
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn endpoints_are_registered_listed_and_deleted_per_tenant() {
    let app = TestApp::with_config(local_webhooks()).await;
    let response = register(&app, json!({"url": "http://127.0.0.1:9/a"})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/webhooks/{id}"));
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(
        created["events"].as_array().unwrap().len(),
        6,
        "all by default"
    );
    assert_eq!(
        created["deliveries"],
        format!("/v1/webhooks/{id}/deliveries")
    );

    let some = register(
        &app,
        json!({"url": "http://127.0.0.1:9/b", "events": ["job.failed", "job.succeeded", "job.failed"]}),
    )
    .await;
    assert_eq!(some.status(), StatusCode::CREATED);
    let some: Value = some.json().await.unwrap();
    assert_eq!(some["events"], json!(["job.failed", "job.succeeded"]));

    let listed: Value = app
        .get("/v1/webhooks")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = listed["webhooks"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|w| w.get("secret").is_none()),
        "the secret is shown once"
    );

    // Another tenant sees none of them and cannot delete them.
    let other = app.other_tenant_key().await;
    let theirs: Value = app
        .client
        .get(app.url("/v1/webhooks"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(theirs["webhooks"], json!([]));
    let refused = app
        .client
        .delete(app.url(&location))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_problem(refused, StatusCode::NOT_FOUND, "not-found").await;

    let deleted = app.request(Method::DELETE, &location).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let again = app.request(Method::DELETE, &location).send().await.unwrap();
    assert_problem(again, StatusCode::NOT_FOUND, "not-found").await;
    let log = app
        .get(&format!("{location}/deliveries"))
        .send()
        .await
        .unwrap();
    assert_problem(log, StatusCode::NOT_FOUND, "not-found").await;
    let bad_id = app
        .get("/v1/webhooks/nope/deliveries")
        .send()
        .await
        .unwrap();
    assert_problem(bad_id, StatusCode::NOT_FOUND, "not-found").await;
    app.shutdown().await;
}

#[tokio::test]
async fn bad_endpoints_are_refused_with_problems() {
    // The default configuration: only public addresses.
    let app = TestApp::start().await;
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
    ] {
        let body = assert_problem(
            register(&app, json!({ "url": url })).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-webhook",
        )
        .await;
        assert!(
            body["detail"].as_str().unwrap().contains("public"),
            "{body}"
        );
    }
    for body in [
        json!({"url": "ftp://example.com/x"}),
        json!({"url": "not a url"}),
        json!({"url": "https://example.com/x", "events": ["job.exploded"]}),
        json!({"url": "https://example.com/x", "events": []}),
    ] {
        assert_problem(
            register(&app, body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-webhook",
        )
        .await;
    }
    for body in [
        json!({"events": ["job.failed"]}),
        json!({"url": 3}),
        json!({"url": "https://example.com", "extra": 1}),
    ] {
        assert_problem(
            register(&app, body).await,
            StatusCode::BAD_REQUEST,
            "invalid-request",
        )
        .await;
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing refused was stored");
    app.shutdown().await;
}

#[tokio::test]
async fn a_tenant_has_a_bounded_number_of_endpoints() {
    let mut config = local_webhooks();
    config.webhooks.webhook_max_endpoints = 2;
    let app = TestApp::with_config(config).await;
    for _ in 0..2 {
        let r = register(&app, json!({"url": "http://127.0.0.1:9/x"})).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let third = register(&app, json!({"url": "http://127.0.0.1:9/x"})).await;
    let body = assert_problem(third, StatusCode::UNPROCESSABLE_ENTITY, "invalid-webhook").await;
    assert!(body["detail"].as_str().unwrap().contains("at most 2"));
    app.shutdown().await;
}

#[tokio::test]
async fn job_changes_arrive_signed_and_carry_the_job_as_get_shows_it() {
    let app = TestApp::with_config(local_webhooks()).await;
    // The receiver fails the first try: the retry carries the same id.
    let receiver = Receiver::start(1).await;
    let created: Value = register(&app, json!({ "url": receiver.url }))
        .await
        .json()
        .await
        .unwrap();
    let secret = created["secret"].as_str().unwrap();

    let job = app.create_job(2).await;
    let id = job["id"].as_str().unwrap();
    let canceled = app
        .request(Method::POST, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(canceled.status(), StatusCode::OK);
    let now: Value = app
        .get(&format!("/v1/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let got = receiver.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(
        got.len(),
        3,
        "queued (failed once, then delivered) and canceled"
    );
    assert!(got.iter().all(|m| m.verifies(secret)));
    // Deliveries are not ordered (a retry may come after a later event): receivers order by
    // `data.updated_at` and drop repeats by `webhook-id`.
    let of_type = |t: &str| -> Vec<_> {
        got.iter()
            .filter(|m| m.json()["type"] == t)
            .cloned()
            .collect()
    };
    let (queued, canceled) = (of_type("job.queued"), of_type("job.canceled"));
    assert_eq!((queued.len(), canceled.len()), (2, 1));
    assert_eq!(queued[0].id, queued[1].id, "a retry keeps its webhook-id");
    assert_eq!(queued[0].body, queued[1].body, "and its body");
    assert_ne!(queued[0].id, canceled[0].id);
    assert_eq!(
        canceled[0].json()["data"],
        now,
        "the job as GET /v1/jobs/{{id}} returns it"
    );
    assert_eq!(
        queued[0].json()["data"]["images"],
        json!(["00.jpg", "01.jpg"])
    );

    // The log shows both deliveries, newest first, and every try (the dispatcher records a try
    // just after the receiver answered it).
    let log_url = format!("{}?limit=10", created["deliveries"].as_str().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log: Value = loop {
        let log: Value = app
            .get(&log_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let settled = log["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "delivered");
        if settled || std::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deliveries = log["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 2);
    assert_eq!(deliveries[0]["event_type"], "job.canceled");
    assert_eq!(deliveries[1]["status"], "delivered");
    assert_eq!(deliveries[1]["message_id"], queued[0].id.as_str());
    let tries: Vec<&Value> = deliveries[1]["tries"].as_array().unwrap().iter().collect();
    assert_eq!(tries.len(), 2);
    assert_eq!(tries[0]["response_status"], 500);
    assert_eq!(tries[1]["response_status"], 204);
    let bad = app
        .get(&format!(
            "{}?limit=0",
            created["deliveries"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_problem(bad, StatusCode::BAD_REQUEST, "invalid-request").await;
    app.shutdown().await;
}
