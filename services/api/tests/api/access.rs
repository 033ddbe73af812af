//! Authentication and tenant isolation, on every /v1 route.

use reqwest::StatusCode;
use sidbooth_api::config::ApiConfig;
use sidbooth_api::routes::{routes, Access};
use uuid::Uuid;

use crate::support::{assert_problem, TestApp};

fn concrete(path: &str, id: &str) -> String {
    path.replace("{id}", id)
}

#[tokio::test]
async fn every_v1_route_needs_a_valid_key() {
    // Sixty failures from one address in a row: the limit on them has its own test.
    let app = TestApp::with_config(ApiConfig {
        auth_failures_per_minute: 0,
        ..ApiConfig::default()
    })
    .await;
    let id = Uuid::now_v7().to_string();
    let revoked = sidbooth_core::tenants::create_key(&app.db.pool, "tenant-r")
        .await
        .unwrap();
    assert!(
        sidbooth_core::tenants::revoke_key(&app.db.pool, revoked.key_id)
            .await
            .unwrap()
    );

    let tenant_routes: Vec<_> = routes()
        .into_iter()
        .filter(|(_, _, access)| *access != Access::Public)
        .collect();
    assert!(tenant_routes.len() >= 10);
    for (method, path, _) in tenant_routes {
        let url = app.url(&concrete(path, &id));
        let attempts = [
            None,
            Some("Basic dXNlcjpwYXNz".to_owned()),
            Some("Bearer".to_owned()),
            Some(
                "Bearer sb_0000000000000000000000000000000000000000000000000000000000000000".into(),
            ),
            Some("Bearer not-a-key".to_owned()),
            Some(format!("Bearer {}", revoked.secret)),
        ];
        for authorization in attempts {
            let mut request = app.client.request(method.clone(), &url);
            if let Some(value) = &authorization {
                request = request.header("authorization", value);
            }
            let response = request.send().await.unwrap();
            let www = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
            assert!(
                www.is_some_and(|v| v.starts_with("Bearer")),
                "{method} {path} with {authorization:?}"
            );
        }
    }
}

#[tokio::test]
async fn another_tenants_job_is_not_found_on_every_route() {
    let app = TestApp::start().await;
    let job = app.create_job(1).await;
    let id = job["id"].as_str().unwrap();
    let other = app.other_tenant_key().await;

    let job_routes: Vec<_> = routes()
        .into_iter()
        .filter(|(_, path, _)| path.contains("{id}"))
        .collect();
    assert!(job_routes.len() >= 8);
    for (method, path, _) in job_routes {
        let mut request = app
            .client
            .request(method.clone(), app.url(&concrete(path, id)))
            .bearer_auth(&other);
        if method == reqwest::Method::PUT {
            request = request.json(&serde_json::json!({
                "descriptions": [{"index": 0, "text": "a photo of sks dog on grass."}]
            }));
        }
        let response = request.send().await.unwrap();
        assert_problem(response, StatusCode::NOT_FOUND, "not-found").await;
    }
    let listed: serde_json::Value = app
        .client
        .get(app.url("/v1/jobs"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["jobs"], serde_json::json!([]));

    // The owner still has it, untouched.
    let mine: serde_json::Value = app
        .get(&format!("/v1/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine["status"], "queued");
    assert_eq!(app.storage.all_keys().await.len(), 1);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = TestApp::start().await;
    let response = app.get("/v1/nothing-here").send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not-found").await;
    let response = app
        .request(reqwest::Method::PATCH, "/v1/jobs")
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
    )
    .await;
    let response = app.get("/v1/jobs/not-a-uuid").send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not-found").await;
}

#[tokio::test]
async fn revocation_takes_effect_within_the_auth_cache_ttl() {
    for (ttl, expected_after_revoke) in [(0, StatusCode::UNAUTHORIZED), (60, StatusCode::OK)] {
        let app = TestApp::with_config(sidbooth_api::ApiConfig {
            auth_cache_secs: ttl,
            ..sidbooth_api::ApiConfig::default()
        })
        .await;
        let issued = sidbooth_core::tenants::create_key(&app.db.pool, "tenant-c")
            .await
            .unwrap();
        let list = || {
            app.client
                .get(app.url("/v1/jobs"))
                .bearer_auth(&issued.secret)
                .send()
        };
        assert_eq!(list().await.unwrap().status(), StatusCode::OK);
        sidbooth_core::tenants::revoke_key(&app.db.pool, issued.key_id)
            .await
            .unwrap();
        assert_eq!(
            list().await.unwrap().status(),
            expected_after_revoke,
            "ttl {ttl}"
        );
    }
}

/// Wrong keys from one address: the first N are 401, then every request from the address is 429
/// with Retry-After (a right key too, until the budget refills), and the key is not looked at.
#[tokio::test]
async fn failed_authentication_is_limited_per_client_address() {
    let app = TestApp::with_config(ApiConfig {
        auth_failures_per_minute: 5,
        ..ApiConfig::default()
    })
    .await;
    let wrong = |n: usize| {
        app.client
            .get(app.url("/v1/jobs"))
            .header("authorization", format!("Bearer sb_wrong{n}"))
            .send()
    };
    for n in 0..5 {
        assert_problem(
            wrong(n).await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        )
        .await;
    }
    let limited = wrong(5).await.unwrap();
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=12).contains(&retry_after), "{retry_after}");
    assert_problem(limited, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
    let right = app.get("/v1/jobs").send().await.unwrap();
    assert_problem(right, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;

    // Another address (as a trusted proxy reports it) is not affected.
    let app = TestApp::with_config(ApiConfig {
        auth_failures_per_minute: 1,
        client_address_header: Some("x-forwarded-for".into()),
        ..ApiConfig::default()
    })
    .await;
    let from = |ip: &str, key: &str| {
        app.client
            .get(app.url("/v1/jobs"))
            .header("x-forwarded-for", format!("{ip}, 10.0.0.1"))
            .header("authorization", format!("Bearer {key}"))
            .send()
    };
    let r = from("203.0.113.7", "sb_wrong").await.unwrap();
    assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let r = from("203.0.113.7", "sb_wrong").await.unwrap();
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
    let r = from("198.51.100.2", &app.key).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
