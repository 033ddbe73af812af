//! A web frontend in a real browser: a page served from another origin posts a photo to the API
//! with its key (a CORS preflight for `Authorization` and `Idempotency-Key`), follows the job's
//! events to the end with `EventSource` on a signed URL (no `Authorization` header), and lists
//! the artifacts. Runs against the real API, a real worker and the fake VLM.

use std::time::{Duration, Instant};

use axum::{http::header, response::Html, routing::get, Router};
use serde_json::{json, Value};
use sidbooth_e2e::{browser::Browser, dataset_photos, Stack};

const PAGE: &str = include_str!("fixtures/frontend.html");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_on_another_origin_posts_follows_and_shows_the_artifacts() {
    // The page's own server, on its own port: another origin than the API.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_origin = format!("http://{}", listener.local_addr().unwrap());
    let photo = dataset_photos("dog6", 1).remove(0).1;
    let site = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/photo.jpg",
            get(move || async move { ([(header::CONTENT_TYPE, "image/jpeg")], photo) }),
        );
    tokio::spawn(async move { axum::serve(listener, site).await });

    let mut stack = Stack::start_with(|config| {
        config.cors_allowed_origins = vec![page_origin.clone()];
    })
    .await;
    let config = stack.worker_config();
    stack.start_worker(config);

    let url = format!("{page_origin}/#api={}&key={}", stack.api_url, stack.key);
    let result = tokio::task::spawn_blocking(move || {
        let browser = Browser::launch().expect("headless Chromium");
        let page = browser.open(&url).expect("open the page");
        let deadline = Instant::now() + Duration::from_secs(90);
        let result = loop {
            let result = page.eval_json("window.result").expect("read the result");
            if result["state"] != "running" || Instant::now() > deadline {
                break result;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let links = page
            .eval_json("[...document.querySelectorAll('#artifacts a')].map(a => a.textContent)")
            .expect("read the links");
        let errors = page.console_errors().expect("read the console");
        (result, links, errors)
    })
    .await
    .unwrap();
    let (result, links, errors): (Value, Value, Vec<String>) = result;

    assert_eq!(result["state"], "done", "{result}");
    assert_eq!(result["final"], "succeeded", "{result}");
    let statuses: Vec<&str> = result["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(statuses.first(), Some(&"queued"), "{statuses:?}");
    assert!(statuses.contains(&"running"), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&"succeeded"), "{statuses:?}");
    // The exposed headers were readable from the page.
    let job_path = result["jobPath"].as_str().unwrap();
    assert!(job_path.starts_with("/v1/jobs/"), "{result}");
    assert!(
        result["requestId"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{result}"
    );
    assert!(
        result["artifacts"]
            .as_array()
            .unwrap()
            .contains(&json!("descriptions.json")),
        "{result}"
    );
    assert_eq!(links, result["artifacts"], "a link per artifact");
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");

    // The job the page made is the tenant's, as the API sees it.
    let job = stack.job(job_path.trim_start_matches("/v1/jobs/")).await;
    assert_eq!(job["status"], "succeeded");
}
