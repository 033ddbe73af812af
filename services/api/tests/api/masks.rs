//! Subject masks uploaded with the photos or replaced during review, the report route, and a
//! database outage answered with 503.

use reqwest::{
    multipart::{Form, Part},
    Method, StatusCode,
};
use serde_json::{json, Value};
use sidbooth_imaging::Mask;

use crate::support::{assert_problem, dog_photos, dog_spec, TestApp};

/// A mask PNG of `w`x`h` whose left `share` of columns is subject.
fn mask_png(w: u32, h: u32, share: f64) -> Vec<u8> {
    Mask::from_bools(w, h, |x, _| (x as f64) < share * w as f64).to_png()
}

/// The dog6 photos are 768x768 (or smaller, square).
fn square_masks(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("{i:02}.png"), mask_png(96, 96, 0.5)))
        .collect()
}

async fn post(
    app: &TestApp,
    images: Vec<(String, Vec<u8>)>,
    masks: Vec<(String, Vec<u8>)>,
) -> reqwest::Response {
    let mut form = Form::new().part(
        "spec",
        Part::text(dog_spec().to_string())
            .mime_str("application/json")
            .unwrap(),
    );
    for (name, bytes) in images {
        form = form.part("images", Part::bytes(bytes).file_name(name));
    }
    for (name, bytes) in masks {
        form = form.part("masks", Part::bytes(bytes).file_name(name));
    }
    app.request(Method::POST, "/v1/jobs")
        .multipart(form)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn uploaded_masks_are_stored_beside_their_photos() {
    let app = TestApp::start().await;
    // Given out of order: masks pair with photos by file stem.
    let mut masks = square_masks(2);
    masks.reverse();
    let response = post(&app, dog_photos(2), masks).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let keys: Vec<Option<String>> =
        sqlx::query_scalar("SELECT mask_object_key FROM job_images WHERE job_id = $1 ORDER BY idx")
            .bind(id)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(keys.len(), 2);
    for (idx, key) in keys.iter().enumerate() {
        let key = key.as_ref().expect("a mask key");
        assert!(
            key.ends_with(&format!("inputs/masks/{idx:02}.png")),
            "{key}"
        );
        let stored = app.storage.store.get(key).await.unwrap();
        let mask = Mask::from_png(&stored).unwrap();
        assert!((mask.coverage() - 0.5).abs() < 1e-9);
    }
    // Without masks, the photos have none.
    let plain = app.create_job(1).await;
    let none: Option<String> =
        sqlx::query_scalar("SELECT mask_object_key FROM job_images WHERE job_id = $1::uuid")
            .bind(plain["id"].as_str().unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(none, None);
}

#[tokio::test]
async fn bad_masks_are_refused_and_nothing_is_stored() {
    let app = TestApp::start().await;
    let photos = || dog_photos(2);
    type Parts = Vec<(String, Vec<u8>)>;
    let cases: Vec<(Parts, &str)> = vec![
        (
            vec![
                ("00.png".into(), dog_photos(1).remove(0).1),
                ("01.png".into(), mask_png(8, 8, 0.5)),
            ],
            "mask_not_png",
        ),
        (square_masks(1), "mask_count"),
        (
            vec![
                ("00.png".into(), mask_png(8, 8, 0.0)),
                ("01.png".into(), mask_png(8, 8, 0.5)),
            ],
            "mask_empty",
        ),
        (
            vec![
                ("00.png".into(), mask_png(80, 40, 0.5)),
                ("01.png".into(), mask_png(8, 8, 0.5)),
            ],
            "mask_size_mismatch",
        ),
        (
            vec![
                ("00.png".into(), mask_png(8, 8, 0.5)),
                ("07.png".into(), mask_png(8, 8, 0.5)),
            ],
            "mask_unpaired",
        ),
        (
            vec![
                ("00.png".into(), b"\x89PNG\r\n\x1a\n but cut".to_vec()),
                ("01.png".into(), mask_png(8, 8, 0.5)),
            ],
            "mask_unreadable",
        ),
    ];
    for (masks, code) in cases {
        let response = post(&app, photos(), masks).await;
        let problem =
            assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid-mask").await;
        assert_eq!(problem["errors"][0]["code"], code, "{problem}");
        assert!(problem["errors"][0]["pointer"]
            .as_str()
            .unwrap()
            .starts_with("masks"));
        app.assert_nothing_stored().await;
    }
}

#[tokio::test]
async fn masks_are_replaced_only_during_review() {
    let app = TestApp::start().await;
    let job = app.create_job(2).await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let put = |n: u32, body: Vec<u8>| {
        app.request(Method::PUT, &format!("/v1/jobs/{id}/masks/{n}"))
            .header("content-type", "image/png")
            .body(body)
            .send()
    };
    assert_problem(
        put(0, mask_png(16, 16, 0.25)).await.unwrap(),
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;

    app.to_awaiting_review(
        id,
        &[
            "a photo of sks dog on a sofa",
            "a photo of sks dog on a rug",
        ],
    )
    .await;
    let response = put(1, mask_png(16, 16, 0.25)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let mask = &body["descriptions"][1]["mask"];
    assert_eq!(mask["source"], "uploaded");
    assert_eq!(mask["artifact"], "masks/01.png");
    assert!((mask["coverage"].as_f64().unwrap() - 0.25).abs() < 1e-6);
    assert_eq!(mask["replace"], format!("/v1/jobs/{id}/masks/1"));
    assert!(body["descriptions"][0]["mask"].is_null());
    let png = reqwest::get(mask["url"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(Mask::from_png(&png).unwrap().dimensions(), (16, 16));

    // Replacing again leaves one object for the artifact.
    assert_eq!(
        put(1, mask_png(16, 16, 0.75)).await.unwrap().status(),
        StatusCode::OK
    );
    let prefix = sidbooth_core::keys::artifact(app.tenant, id, "");
    let objects: Vec<String> = app
        .storage
        .store
        .list(&prefix)
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.ends_with("masks/01.png"))
        .collect();
    assert_eq!(objects.len(), 1, "{objects:?}");

    let problem = assert_problem(
        put(0, b"not a png".to_vec()).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-mask",
    )
    .await;
    assert_eq!(problem["errors"][0]["code"], "mask_not_png");
    assert_problem(
        put(0, mask_png(30, 10, 0.5)).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-mask",
    )
    .await;
    assert_problem(
        put(2, mask_png(16, 16, 0.5)).await.unwrap(),
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    let other = app.other_tenant_key().await;
    let foreign = app
        .client
        .put(app.url(&format!("/v1/jobs/{id}/masks/0")))
        .bearer_auth(other)
        .body(mask_png(16, 16, 0.5))
        .send()
        .await
        .unwrap();
    assert_problem(foreign, StatusCode::NOT_FOUND, "not-found").await;
}

#[tokio::test]
async fn the_report_is_404_until_evaluate_wrote_it_and_negotiates_its_type() {
    let app = TestApp::start().await;
    let id = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/jobs/{id}/report");
    assert_problem(
        app.get(&path).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "no-report",
    )
    .await;
    assert_problem(
        app.get(&path)
            .header("accept", "image/png")
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_ACCEPTABLE,
        "not-acceptable",
    )
    .await;
    assert_problem(
        app.get("/v1/jobs/00000000-0000-0000-0000-000000000000/report")
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    let job: Value = app
        .get(&format!("/v1/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["links"]["report"], json!(path));
}

#[tokio::test]
async fn a_database_outage_is_503_with_retry_after() {
    let app = TestApp::start().await;
    let id = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    // The key is cached now; then the database goes away.
    app.db.pool.close().await;
    let response = app.get(&format!("/v1/jobs/{id}")).send().await.unwrap();
    let retry_after = response.headers().get("retry-after").cloned();
    let problem = assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("database"),
        "{problem}"
    );
    assert_eq!(retry_after.unwrap(), "5");
}
