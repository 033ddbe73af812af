//! A worker process killed with SIGKILL in the middle of describing: another worker takes the
//! job over once the lease lapses, finishes it, and no description is lost, duplicated or
//! paid for twice.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use sidbooth_e2e::{dataset_photos, process::WorkerProcess, Stack};

async fn saved_descriptions(stack: &Stack, id: uuid::Uuid) -> HashMap<i32, (String, String)> {
    // updated_at as Postgres prints it: equal text means the row was not rewritten.
    let rows: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT idx, text, updated_at::text FROM descriptions WHERE job_id = $1 ORDER BY idx",
    )
    .bind(id)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(i, t, u)| (i, (t, u))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_is_taken_over_without_losing_or_repeating_work() {
    let mut stack = Stack::start().await;
    let photos = dataset_photos("dog6", 5);
    // Slow answers so the kill lands mid-stage, one request at a time.
    stack.vlm.set_base_delay(Duration::from_millis(400));

    let job = stack
        .submit(
            serde_json::json!({"subject_class": "dog", "descriptions": {"case": "sid"}}),
            &photos,
        )
        .await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();

    let mut child = WorkerProcess::spawn(&stack, &[]);
    let started = Instant::now();
    let before_kill = loop {
        let saved = saved_descriptions(&stack, id).await;
        if saved.len() >= 2 {
            break saved;
        }
        if let Some(status) = child.exited() {
            panic!("worker exited early with {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the worker described nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill(); // SIGKILL: no chance to release the lease
    assert!(before_kill.len() < 5, "killed before the stage finished");
    let job = stack.job(&id.to_string()).await;
    assert_eq!(
        job["status"], "running",
        "the dead worker still holds the lease: {job}"
    );

    // A second worker (in-process) takes over after the lease lapses.
    stack.vlm.set_base_delay(Duration::ZERO);
    let config = stack.worker_config();
    stack.start_worker(config);
    let done = stack
        .wait_for(&id.to_string(), "succeeded", Duration::from_secs(60))
        .await;
    assert!(done["attempts"].as_i64().is_some());

    let after = saved_descriptions(&stack, id).await;
    assert_eq!(after.len(), 5, "one description per photo: {after:?}");
    for (idx, (text, stamp)) in &before_kill {
        assert_eq!(
            &after[idx],
            &(text.clone(), stamp.clone()),
            "description {idx} was rewritten"
        );
    }
    // Each photo was described once, plus at most the one request in flight at the kill.
    let requests = stack.vlm.requests().len();
    assert!(
        (5..=6).contains(&requests),
        "{requests} VLM requests for 5 photos"
    );

    let response = stack
        .get(&format!("/v1/jobs/{id}/descriptions"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    let indexes: Vec<i64> = body["descriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["index"].as_i64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3, 4]);
}
