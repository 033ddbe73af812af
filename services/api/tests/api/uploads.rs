//! POST /v1/jobs: accepted uploads, every refused input, idempotency.

use reqwest::{Body, StatusCode};
use serde_json::{json, Value};
use sidbooth_api::ApiConfig;

use crate::{
    images,
    support::{assert_problem, dog_photo, dog_photos, dog_spec, form, multipart_body, TestApp},
};

#[tokio::test]
async fn five_photos_make_a_queued_job() {
    let app = TestApp::start().await;
    let response = app.post_job(&dog_spec(), dog_photos(5)).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let job: Value = response.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert_eq!(job["status"], "queued");
    assert_eq!(job["stage"], "describe");
    assert_eq!(job["image_count"], 5);
    assert_eq!(
        job["images"],
        json!(["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"])
    );
    assert_eq!(job["spec"]["token"], "sks");
    assert_eq!(job["spec"]["descriptions"]["case"], "sid");
    assert_eq!(job["links"]["events"], format!("/v1/jobs/{id}/events"));

    let keys = app.storage.all_keys().await;
    assert_eq!(keys.len(), 5, "{keys:?}");
    let prefix = format!("tenants/{}/jobs/{id}/inputs/", app.tenant);
    assert!(keys.iter().all(|k| k.starts_with(&prefix)), "{keys:?}");
    let stored = app
        .storage
        .store
        .get(&format!("{prefix}00-00.jpg"))
        .await
        .unwrap();
    assert_eq!(
        stored.as_ref(),
        dog_photo(0).as_slice(),
        "an upright photo is stored as sent"
    );

    let fetched: Value = app
        .get(&location)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["id"], job["id"]);
    assert_eq!(fetched["images"], job["images"]);
}

#[tokio::test]
async fn exif_orientation_is_applied_before_storing() {
    let app = TestApp::start().await;
    let sideways = images::with_exif_orientation(&images::two_colour_jpeg(40, 20), 6);
    let response = app
        .post_job(&dog_spec(), vec![("phone.jpeg".into(), sideways.clone())])
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["images"], json!(["phone.jpg"]));
    let keys = app.storage.all_keys().await;
    assert_eq!(keys.len(), 1);
    assert!(keys[0].ends_with("inputs/00-phone.jpg"), "{keys:?}");
    let stored = app.storage.store.get(&keys[0]).await.unwrap();
    assert_ne!(stored.as_ref(), sideways.as_slice());
    // Orientation 6 rotates 90 degrees clockwise: the red left half ends up on top.
    assert_eq!(images::dimensions(&stored), (20, 40));
    let top = images::pixel(&stored, 10, 5);
    let bottom = images::pixel(&stored, 10, 35);
    assert!(top[0] > 200 && top[2] < 60, "top is red: {top:?}");
    assert!(
        bottom[2] > 200 && bottom[0] < 60,
        "bottom is blue: {bottom:?}"
    );
}

#[tokio::test]
async fn png_and_webp_are_accepted_by_content_whatever_their_names() {
    let app = TestApp::start().await;
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        30,
        20,
        image::Rgb([10, 200, 30]),
    ));
    let mut png = Vec::new();
    image
        .write_with_encoder(image::codecs::png::PngEncoder::new(&mut png))
        .unwrap();
    let mut webp = Vec::new();
    image
        .write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut webp))
        .unwrap();
    let response = app
        .post_job(
            &dog_spec(),
            vec![
                ("photo.jpg".into(), png.clone()),
                ("../x/photo".into(), webp.clone()),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["images"], json!(["photo.png", "photo.webp"]));
    let rows: Vec<(String, String, i32, i32)> = sqlx::query_as(
        "SELECT file_name, content_type, width, height FROM job_images ORDER BY idx",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("photo.png".to_owned(), "image/png".to_owned(), 30, 20),
            ("photo.webp".to_owned(), "image/webp".to_owned(), 30, 20),
        ]
    );
    let mut keys = app.storage.all_keys().await;
    keys.sort();
    assert!(keys[0].ends_with("inputs/00-photo.png") && keys[1].ends_with("inputs/01-photo.webp"));
    assert_eq!(
        app.storage.store.get(&keys[1]).await.unwrap().as_ref(),
        webp.as_slice()
    );
}

/// A 300-character file name (and one of multi-byte letters) is shortened to what every storage
/// can hold: the job is accepted and the photos are stored under their shortened names.
#[tokio::test]
async fn very_long_file_names_are_shortened_and_stored() {
    let app = TestApp::start().await;
    let long = format!("{}.jpg", "a".repeat(296));
    let wide = format!("{}.jpg", "ü".repeat(200));
    let response = app
        .post_job(
            &dog_spec(),
            vec![(long, dog_photo(0)), (wide, dog_photo(1))],
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    let names: Vec<&str> = job["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names[0], format!("{}.jpg", "a".repeat(40)));
    assert_eq!(names[1], "image-1.jpg");
    let keys = app.storage.all_keys().await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in &keys {
        assert!(!app.storage.store.get(key).await.unwrap().is_empty());
    }
}

/// Posts and expects a problem; then checks nothing was stored.
async fn refused(
    app: &TestApp,
    spec: &Value,
    images: Vec<(String, Vec<u8>)>,
    status: StatusCode,
    slug: &str,
) -> Value {
    let response = app.post_job(spec, images).await;
    let problem = assert_problem(response, status, slug).await;
    app.assert_nothing_stored().await;
    problem
}

#[tokio::test]
async fn image_count_limits() {
    let app = TestApp::start().await;
    refused(
        &app,
        &dog_spec(),
        vec![],
        StatusCode::UNPROCESSABLE_ENTITY,
        "no-images",
    )
    .await;
    refused(
        &app,
        &dog_spec(),
        dog_photos(8),
        StatusCode::UNPROCESSABLE_ENTITY,
        "too-many-images",
    )
    .await;
}

#[tokio::test]
async fn a_file_over_the_limit_is_413() {
    let app = TestApp::start().await;
    let mut big = dog_photo(0);
    big.resize(20 * 1024 * 1024 + 1, 0);
    let problem = refused(
        &app,
        &dog_spec(),
        vec![("00.jpg".into(), dog_photo(0)), ("big.jpg".into(), big)],
        StatusCode::PAYLOAD_TOO_LARGE,
        "file-too-large",
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("images[1]"));
}

fn small_request_limit() -> ApiConfig {
    ApiConfig {
        max_request_bytes: 300 * 1024,
        ..ApiConfig::default()
    }
}

#[tokio::test]
async fn a_request_over_the_limit_is_413_by_its_length() {
    let app = TestApp::with_config(small_request_limit()).await;
    refused(
        &app,
        &dog_spec(),
        dog_photos(4),
        StatusCode::PAYLOAD_TOO_LARGE,
        "request-too-large",
    )
    .await;
}

#[tokio::test]
async fn a_streamed_request_over_the_limit_is_413() {
    let app = TestApp::with_config(small_request_limit()).await;
    // Without a Content-Length the limit is enforced while reading.
    let boundary = "sidbooth-test-boundary";
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let body = multipart_body(boundary, &dog_spec().to_string(), &dog_photos(4));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(16 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = app
        .request(reqwest::Method::POST, "/v1/jobs")
        .header("content-type", content_type)
        .body(Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "request-too-large").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn images_are_checked_by_content() {
    let app = TestApp::start().await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;

    let text = b"just some text pretending to be a photo\n".repeat(20);
    refused(
        &app,
        &dog_spec(),
        vec![("00.jpg".into(), dog_photo(0)), ("notes.jpg".into(), text)],
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-image-type",
    )
    .await;

    let photo = dog_photo(1);
    let truncated = photo[..photo.len() / 2].to_vec();
    refused(
        &app,
        &dog_spec(),
        vec![("cut.jpg".into(), truncated)],
        unprocessable,
        "corrupt-image",
    )
    .await;

    let problem = refused(
        &app,
        &dog_spec(),
        vec![("bomb.png".into(), images::png_claiming(10_000, 10_000))],
        unprocessable,
        "image-too-large",
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("10000x10000"));
}

#[tokio::test]
async fn specs_are_parsed_strictly() {
    let app = TestApp::start().await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let one = || dog_photos(1);

    let problem = refused(
        &app,
        &json!({"subject_class": "dog", "colour": "brown"}),
        one(),
        unprocessable,
        "invalid-spec",
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("colour"),
        "{problem}"
    );
    refused(
        &app,
        &json!({"subject_class": "dog", "review": "yes"}),
        one(),
        unprocessable,
        "invalid-spec",
    )
    .await;
    refused(&app, &json!(["dog"]), one(), unprocessable, "invalid-spec").await;
    refused(
        &app,
        &json!({"subject_class": "dog/cat"}),
        one(),
        unprocessable,
        "invalid-subject-class",
    )
    .await;
    refused(
        &app,
        &json!({"subject_class": ""}),
        one(),
        unprocessable,
        "invalid-subject-class",
    )
    .await;
    refused(
        &app,
        &json!({"subject_class": "dog", "token": "SKS"}),
        one(),
        unprocessable,
        "invalid-token",
    )
    .await;
    refused(
        &app,
        &json!({"subject_class": "dog", "token": "abcdefghijklmnopqrstu"}),
        one(),
        unprocessable,
        "invalid-token",
    )
    .await;
    // Evaluate measures generated images: without the stages that make them it is refused.
    let problem = refused(
        &app,
        &json!({"subject_class": "dog", "stages": ["describe", "evaluate"]}),
        one(),
        unprocessable,
        "invalid-spec",
    )
    .await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("stage evaluate needs stage generate"));
    refused(
        &app,
        &json!({"subject_class": "dog", "descriptions": {"source": "manual", "texts": []}}),
        one(),
        unprocessable,
        "invalid-spec",
    )
    .await;

    // A body that is not JSON, and a request with no spec part at all.
    let response = app
        .request(reqwest::Method::POST, "/v1/jobs")
        .multipart(
            reqwest::multipart::Form::new()
                .text("spec", "{not json")
                .part(
                    "images",
                    reqwest::multipart::Part::bytes(dog_photo(0)).file_name("a.jpg"),
                ),
        )
        .send()
        .await
        .unwrap();
    assert_problem(response, unprocessable, "invalid-spec").await;
    let response = app
        .request(reqwest::Method::POST, "/v1/jobs")
        .multipart(reqwest::multipart::Form::new().part(
            "images",
            reqwest::multipart::Part::bytes(dog_photo(0)).file_name("a.jpg"),
        ))
        .send()
        .await
        .unwrap();
    assert_problem(response, unprocessable, "invalid-spec").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let app = TestApp::start().await;
    let response = app
        .request(reqwest::Method::POST, "/v1/jobs")
        .json(&dog_spec())
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
    let response = app
        .request(reqwest::Method::POST, "/v1/jobs")
        .multipart(form(dog_spec().to_string(), dog_photos(1)).text("extra", "x"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
    let response = app
        .request(reqwest::Method::POST, "/v1/jobs")
        .header("Idempotency-Key", "")
        .multipart(form(dog_spec().to_string(), dog_photos(1)))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn manual_descriptions_are_validated_and_repaired() {
    let app = TestApp::start().await;
    let spec = |texts: Value| json!({"subject_class": "dog", "descriptions": {"source": "manual", "texts": texts}});
    let problem = refused(
        &app,
        &spec(json!([
            "a photo of sks dog lying on a red sofa next to a window.",
            "a dog in the park."
        ])),
        dog_photos(2),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-description",
    )
    .await;
    let errors = problem["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{problem}");
    assert_eq!(errors[0]["pointer"], "/descriptions/texts/1");
    assert_eq!(errors[0]["code"], "missing_prefix");

    let response = app
        .post_job(
            &spec(json!([
                "  A photo of sks dog lying on a red sofa next to a window.  "
            ])),
            dog_photos(1),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(
        job["spec"]["descriptions"]["texts"],
        json!(["a photo of sks dog lying on a red sofa next to a window."])
    );
}

#[tokio::test]
async fn the_same_idempotency_key_gives_the_same_job() {
    let app = TestApp::start().await;
    let first = app
        .post_job_with(&dog_spec(), dog_photos(2), Some("retry-1"))
        .await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();

    let again = app
        .post_job_with(&dog_spec(), dog_photos(2), Some("retry-1"))
        .await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["images"], first["images"]);
    assert_eq!(app.job_rows().await, 1);
    assert_eq!(app.storage.all_keys().await.len(), 2);

    let different = app
        .post_job_with(&dog_spec(), dog_photos(3), Some("retry-1"))
        .await;
    assert_problem(
        different,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    )
    .await;
    let different_spec = app
        .post_job_with(
            &json!({"subject_class": "cat"}),
            dog_photos(2),
            Some("retry-1"),
        )
        .await;
    assert_problem(
        different_spec,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    )
    .await;
    assert_eq!(app.job_rows().await, 1);
    assert_eq!(app.storage.all_keys().await.len(), 2);

    // Keys are per tenant: another tenant may use the same one.
    let other = app.other_tenant_key().await;
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(other)
        .header("Idempotency-Key", "retry-1")
        .multipart(form(dog_spec().to_string(), dog_photos(2)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(app.job_rows().await, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_make_one_job_and_leave_no_orphans() {
    let app = TestApp::start().await;
    let spec = dog_spec();
    let requests = (0..4).map(|_| app.post_job_with(&spec, dog_photos(1), Some("race")));
    let responses = futures::future::join_all(requests).await;
    let mut ids = Vec::new();
    for response in responses {
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        match status {
            StatusCode::ACCEPTED | StatusCode::OK => ids.push(body["id"].clone()),
            StatusCode::CONFLICT => {
                assert_eq!(body["type"], "https://sidbooth.dev/problems/conflict")
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(app.job_rows().await, 1);
    assert_eq!(app.storage.all_keys().await.len(), 1);
}

/// `train` is one method's settings: another method's field or an unknown method is refused
/// by name, and an accepted job shows the method with its fields as the spec gave them.
#[tokio::test]
async fn train_settings_belong_to_their_method() {
    let app = TestApp::start().await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let with_train = |train: Value| json!({"subject_class": "dog", "stages": ["describe", "train"], "train": train});
    let problem = refused(
        &app,
        &with_train(json!({"method": "dreambooth", "rank": 8})),
        dog_photos(1),
        unprocessable,
        "invalid-spec",
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("rank"),
        "{problem}"
    );
    let problem = refused(
        &app,
        &with_train(json!({"method": "hypernetwork"})),
        dog_photos(1),
        unprocessable,
        "invalid-spec",
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("hypernetwork"),
        "{problem}"
    );

    let response = app
        .post_job(
            &with_train(json!({"method": "textual_inversion", "num_vectors": 2})),
            dog_photos(1),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    let train = &job["spec"]["train"];
    assert_eq!(train["method"], "textual_inversion", "{job}");
    assert_eq!(train["num_vectors"], 2, "{job}");
    assert_eq!(train["steps"], 3000, "the method's own default: {job}");
    assert!(train.get("rank").is_none(), "{job}");
}
