//! GET /v1/jobs/{id}/events: replay, live events, the end after a terminal status, resuming.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sidbooth_domain::Stage;
use uuid::Uuid;

use crate::support::{SseReader, TestApp};

const WAIT: Duration = Duration::from_secs(10);

fn data(event: &crate::support::SseEvent) -> Value {
    serde_json::from_str(&event.data).unwrap()
}

#[tokio::test]
async fn events_replay_then_follow_the_job_to_its_end() {
    let app = TestApp::start().await;
    let id: Uuid = app.create_job(1).await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let response = app
        .get(&format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut events = SseReader::new(response);

    let created = events.next(WAIT).await.expect("the creation event");
    assert_eq!(created.event.as_deref(), Some("status"));
    assert_eq!(data(&created)["data"]["status"], "queued");
    assert_eq!(data(&created)["job_id"], id.to_string());
    let first_id: i64 = created.id.clone().unwrap().parse().unwrap();

    // A worker claims it, reports progress and finishes: each arrives live.
    let queue = app.queue();
    let claimed = queue.claim().await.unwrap().unwrap();
    let running = events.next(WAIT).await.expect("the running event");
    assert_eq!(data(&running)["data"]["status"], "running");
    assert!(running.id.clone().unwrap().parse::<i64>().unwrap() > first_id);

    queue
        .progress(
            &claimed.lease,
            Stage::Describe,
            0.5,
            serde_json::json!({"image": 0}),
        )
        .await
        .unwrap();
    let progress = events.next(WAIT).await.expect("the progress event");
    assert_eq!(progress.event.as_deref(), Some("progress"));
    assert_eq!(data(&progress)["data"]["progress"], 0.5);

    queue
        .complete_stage(&claimed.lease, Stage::Describe, None)
        .await
        .unwrap();
    queue.succeed(&claimed.lease).await.unwrap();
    let mut last = None;
    while let Some(event) = events.next(WAIT).await {
        last = Some(event);
    }
    let last = last.expect("events up to the end");
    assert_eq!(
        data(&last)["data"]["status"],
        "succeeded",
        "the stream ends after it"
    );

    // Resuming after the first event replays the rest and ends at once.
    let response = app
        .get(&format!("/v1/jobs/{id}/events"))
        .header("Last-Event-ID", first_id.to_string())
        .send()
        .await
        .unwrap();
    let mut resumed = SseReader::new(response);
    let mut kinds = Vec::new();
    while let Some(event) = resumed.next(WAIT).await {
        assert!(event.id.unwrap().parse::<i64>().unwrap() > first_id);
        kinds.push(event.event.unwrap());
    }
    assert_eq!(kinds, ["status", "progress", "stage_completed", "status"]);
}

#[tokio::test]
async fn a_finished_job_streams_its_history_and_ends() {
    let app = TestApp::start().await;
    let id = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    app.request(reqwest::Method::POST, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    let response = app
        .get(&format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut events = SseReader::new(response);
    let statuses: Vec<_> = {
        let mut all = Vec::new();
        while let Some(event) = events.next(WAIT).await {
            all.push(data(&event)["data"]["status"].clone());
        }
        all
    };
    assert_eq!(statuses, ["queued", "canceled"]);

    let response = app
        .get(&format!("/v1/jobs/{id}/events"))
        .header("Last-Event-ID", "not-a-number")
        .send()
        .await
        .unwrap();
    crate::support::assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let app = TestApp::start().await;
    let id = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    let response = app
        .get(&format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut events = SseReader::new(response);
    events.next(WAIT).await.expect("the creation event");
    let reader = tokio::spawn(async move { events.next(WAIT).await.is_none() });
    app.shutdown().await;
    assert!(
        reader.await.unwrap(),
        "the stream ended when the server drained"
    );
}

#[tokio::test]
async fn idle_streams_get_keep_alive_comments() {
    let app = TestApp::with_config(sidbooth_api::ApiConfig {
        sse_keepalive_secs: 1,
        ..sidbooth_api::ApiConfig::default()
    })
    .await;
    let id = app.create_job(1).await["id"].as_str().unwrap().to_owned();
    let mut response = app
        .get(&format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.lines().any(|line| line.starts_with(':')) {
                return true;
            }
        }
        false
    })
    .await
    .expect("a keep-alive comment in time");
    assert!(found, "{text}");
    assert!(
        text.contains("event: status"),
        "the creation event came first: {text}"
    );
}
