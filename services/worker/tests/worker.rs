//! The worker against real Postgres, an embedded S3 server and a fake OpenAI-compatible VLM.

mod support;

use std::{collections::HashSet, io::Read, time::Duration};

use serde_json::json;
use sidbooth_core::JobError;
use sidbooth_describe::fake::Behaviour;
use sidbooth_domain::JobStatus;
use sidbooth_worker::{
    stages::describe::{DescriptionEntry, CAPTIONS_ZIP, DESCRIPTIONS_JSON},
    ShutdownMode,
};
use support::{photos, spawn, Env};

const WAIT: Duration = Duration::from_secs(30);

fn sid(review: bool) -> serde_json::Value {
    json!({"subject_class": "dog", "review": review})
}

/// Reads a stored artifact of a job.
async fn artifact(env: &Env, id: uuid::Uuid, name: &str) -> Vec<u8> {
    let artifacts = env.jobs.artifacts(id).await.unwrap();
    let a = artifacts
        .iter()
        .find(|a| a.name == name)
        .unwrap_or_else(|| panic!("job {id} has no {name}: {artifacts:?}"));
    let bytes = env.storage.store.get(&a.object_key).await.unwrap();
    assert_eq!(a.size as usize, bytes.len());
    bytes.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sid_with_review_waits_then_succeeds_with_artifacts_after_approval() {
    let env = Env::new().await;
    let id = env.create_job(sid(true), 5).await;
    let worker = spawn(env.worker());

    let job = env.wait_status(id, JobStatus::AwaitingReview, WAIT).await;
    assert!(job.stages_done.contains(&sidbooth_domain::Stage::Describe));
    let ds = env.descriptions(id).await;
    assert_eq!(
        ds.iter().map(|d| d.idx).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    for d in &ds {
        assert!(d.text.starts_with("a photo of sks dog "), "{}", d.text);
        assert!(d.problem.is_none());
        assert_eq!(d.model, "fake-model");
        assert!(d.instruction.contains("\"a photo of sks dog\""));
    }
    let mut asked = env.requested_photos();
    asked.sort();
    assert_eq!(
        asked,
        vec![0, 1, 2, 3, 4],
        "the VLM received each photo once"
    );
    assert!(env
        .vlm
        .requests()
        .iter()
        .all(|r| r.model == "fake-model" && r.images.len() == 1));
    assert!(
        env.jobs.artifacts(id).await.unwrap().is_empty(),
        "no artifacts before approval"
    );

    // Progress was reported per image.
    let events = env.jobs.events_since(id, 0).await.unwrap();
    let progress: Vec<_> = events.iter().filter(|e| e.kind == "progress").collect();
    assert_eq!(progress.len(), 5);
    assert_eq!(progress.last().unwrap().data["described"], 5);
    assert_eq!(progress.last().unwrap().data["total"], 5);

    let edited = "a photo of sks dog lying on a blue rug beside a wooden chair.";
    env.jobs
        .edit_descriptions(env.tenant, id, &[(2, edited.to_owned())])
        .await
        .unwrap();
    env.jobs.approve(env.tenant, id).await.unwrap();
    let job = env.wait_status(id, JobStatus::Succeeded, WAIT).await;
    assert!(job.error.is_none());
    assert_eq!(
        env.vlm.requests().len(),
        5,
        "approval asks the VLM nothing more"
    );

    let ds = env.descriptions(id).await;
    let entries: Vec<DescriptionEntry> =
        serde_json::from_slice(&artifact(&env, id, DESCRIPTIONS_JSON).await).unwrap();
    assert_eq!(entries.len(), 5);
    for (e, d) in entries.iter().zip(&ds) {
        assert_eq!(e.text, d.text);
        assert_eq!(e.edited, d.idx == 2);
        assert_eq!(e.model, "fake-model");
    }
    assert_eq!(entries[2].text, edited);

    let zip_bytes = artifact(&env, id, CAPTIONS_ZIP).await;
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes)).unwrap();
    assert_eq!(zip.len(), 10, "5 image/.txt pairs");
    for (idx, (name, bytes)) in photos(5).into_iter().enumerate() {
        let image_name = format!("{idx:02}-{name}");
        let mut got = Vec::new();
        zip.by_name(&image_name)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, bytes.to_vec(), "{image_name} is the uploaded photo");
        let caption_name = format!("{}.txt", image_name.trim_end_matches(".jpg"));
        let mut caption = String::new();
        zip.by_name(&caption_name)
            .unwrap()
            .read_to_string(&mut caption)
            .unwrap();
        assert_eq!(caption.trim_end(), ds[idx].text);
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sid_without_review_succeeds_directly() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 3).await;
    let worker = spawn(env.worker());
    let job = env.wait_status(id, JobStatus::Succeeded, WAIT).await;
    assert_eq!(job.progress, 1.0);
    assert_eq!(env.descriptions(id).await.len(), 3);
    let mut asked = env.requested_photos();
    asked.sort();
    assert_eq!(asked, vec![0, 1, 2]);
    let names: Vec<String> = env
        .jobs
        .artifacts(id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(
        names,
        vec![CAPTIONS_ZIP.to_owned(), DESCRIPTIONS_JSON.to_owned()]
    );
    let entries: Vec<DescriptionEntry> =
        serde_json::from_slice(&artifact(&env, id, DESCRIPTIONS_JSON).await).unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entries
        .iter()
        .all(|e| !e.edited && e.text.starts_with("a photo of sks dog")));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_and_class_only_descriptions_need_no_vlm() {
    let env = Env::new().await;
    let texts = [
        "a photo of sks dog sitting in front of an orange wall.",
        "A photo of sks dog lying on a grey floor",
    ];
    let manual = env
        .create_job(
            json!({"subject_class": "dog", "descriptions": {"source": "manual", "texts": texts}}),
            2,
        )
        .await;
    let class_only = env
        .create_job(
            json!({"subject_class": "dog", "descriptions": {"case": "class_only"}}),
            3,
        )
        .await;
    let worker = spawn(env.worker());
    env.wait_status(manual, JobStatus::Succeeded, WAIT).await;
    env.wait_status(class_only, JobStatus::Succeeded, WAIT)
        .await;

    let ds = env.descriptions(manual).await;
    assert_eq!(ds[0].text, texts[0]);
    // Validation repairs the prefix's letter case.
    assert_eq!(ds[1].text, "a photo of sks dog lying on a grey floor");
    assert!(ds.iter().all(|d| d.model == "manual"));
    let ds = env.descriptions(class_only).await;
    assert_eq!(ds.len(), 3);
    assert!(ds.iter().all(|d| d.text == "a photo of sks dog"));
    assert!(env.vlm.requests().is_empty(), "no VLM request");
    artifact(&env, class_only, CAPTIONS_ZIP).await;
    artifact(&env, manual, CAPTIONS_ZIP).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_aborted_mid_describe_is_taken_over_without_losing_or_repeating_work() {
    let env = Env::new().await;
    let id = env.create_job(sid(true), 5).await;
    env.vlm.set_base_delay(Duration::from_millis(400));
    let mut one_at_a_time = env.vlm_config();
    one_at_a_time.concurrency = 1;
    let first =
        spawn(env.worker_with(env.config(ShutdownMode::FinishStage), one_at_a_time.clone()));

    env.wait_until("two descriptions saved", WAIT, || async {
        env.descriptions(id).await.len() >= 2
    })
    .await;
    first.task.abort();
    let _ = first.task.await;
    let saved_before = env.descriptions(id).await;
    let asked_before = env.requested_photos().len();
    assert!(
        saved_before.len() >= 2 && saved_before.len() < 5,
        "{}",
        saved_before.len()
    );
    assert_eq!(
        env.job(id).await.status,
        JobStatus::Running,
        "the lease has not lapsed yet"
    );

    env.vlm.set_base_delay(Duration::ZERO);
    let second = spawn(env.worker_with(env.config(ShutdownMode::FinishStage), one_at_a_time));
    env.wait_status(id, JobStatus::AwaitingReview, WAIT).await;
    let claims = env
        .jobs
        .events_since(id, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "status" && e.data["status"] == "running")
        .count();
    assert_eq!(
        claims, 2,
        "claimed by the first worker, then taken over by the second"
    );

    let saved_after = env.descriptions(id).await;
    assert_eq!(
        saved_after.iter().map(|d| d.idx).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    for before in &saved_before {
        let after = saved_after.iter().find(|d| d.idx == before.idx).unwrap();
        assert_eq!(after.text, before.text);
        assert_eq!(
            after.updated_at, before.updated_at,
            "photo {} was not described again",
            before.idx
        );
    }
    let asked_after: Vec<usize> = env.requested_photos()[asked_before..].to_vec();
    let saved_idx: HashSet<usize> = saved_before.iter().map(|d| d.idx as usize).collect();
    assert!(
        asked_after.iter().all(|p| !saved_idx.contains(p)),
        "the second worker asked again for a saved photo: {asked_after:?} (saved {saved_idx:?})"
    );
    assert_eq!(asked_after.len(), 5 - saved_before.len(), "{asked_after:?}");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_running_stage_within_seconds() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 2).await;
    env.vlm.set_base_delay(Duration::from_secs(20));
    let worker = spawn(env.worker());
    env.wait_until("a VLM request", WAIT, || async {
        !env.vlm.requests().is_empty()
    })
    .await;
    let requested = tokio::time::Instant::now();
    let job = env.jobs.cancel(env.tenant, id).await.unwrap();
    assert_eq!(
        job.status,
        JobStatus::Running,
        "a running job is flagged, not canceled at once"
    );
    let job = env
        .wait_status(id, JobStatus::Canceled, Duration::from_secs(3))
        .await;
    assert!(requested.elapsed() < Duration::from_secs(3));
    assert!(job.finished_at.is_some());
    assert!(env.jobs.artifacts(id).await.unwrap().is_empty());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_then_a_500_are_retried_by_the_job_and_it_succeeds() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 1).await;
    env.vlm.push_all([
        Behaviour::RateLimited {
            retry_after_secs: Some(0),
        },
        Behaviour::server_error(),
    ]);
    // The client gives up at once, so each failure reaches the worker's own retry.
    let mut no_client_retries = env.vlm_config();
    no_client_retries.max_retries = 0;
    let worker = spawn(env.worker_with(env.config(ShutdownMode::FinishStage), no_client_retries));
    let job = env.wait_status(id, JobStatus::Succeeded, WAIT).await;
    assert_eq!(env.vlm.requests().len(), 3);
    assert_eq!(env.descriptions(id).await.len(), 1);
    assert!(job.error.is_none(), "{:?}", job.error);

    let retries: Vec<JobError> = env
        .jobs
        .events_since(id, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.kind == "status" && e.data["status"] == "queued" && !e.data["error"].is_null()
        })
        .map(|e| serde_json::from_value(e.data["error"].clone()).unwrap())
        .collect();
    let codes: Vec<&str> = retries.iter().map(|e| e.code.as_str()).collect();
    assert_eq!(codes, vec!["vlm_rate_limited", "vlm_server_error"]);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_retries_429_and_500_itself() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 1).await;
    env.vlm.push_all([
        Behaviour::RateLimited {
            retry_after_secs: Some(1),
        },
        Behaviour::server_error(),
    ]);
    let worker = spawn(env.worker());
    let job = env.wait_status(id, JobStatus::Succeeded, WAIT).await;
    assert_eq!(env.vlm.requests().len(), 3);
    let reqs = env.vlm.requests();
    assert!(
        reqs[1].received_at - reqs[0].received_at >= Duration::from_millis(900),
        "Retry-After honoured"
    );
    assert_eq!(job.attempts, 0, "no job-level retry was needed");
    worker.stop().await;
}

const BAD: &str = "I cannot see a dog in this picture.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_keep_failing_validation_go_to_review_with_the_problem() {
    let env = Env::new().await;
    let id = env.create_job(sid(true), 1).await;
    env.vlm.push_all([
        Behaviour::reply(BAD),
        Behaviour::reply(BAD),
        Behaviour::reply(BAD),
    ]);
    let worker = spawn(env.worker());
    env.wait_status(id, JobStatus::AwaitingReview, WAIT).await;
    let ds = env.descriptions(id).await;
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].text, BAD);
    let problem = ds[0].problem.as_ref().expect("the problem is recorded");
    assert_eq!(problem["code"], "missing_prefix");
    assert!(problem["message"]
        .as_str()
        .unwrap()
        .contains("a photo of sks dog"));
    assert_eq!(
        env.vlm.requests().len(),
        3,
        "one request and two corrections"
    );
    assert!(
        env.jobs.approve(env.tenant, id).await.is_err(),
        "a problem blocks approval"
    );

    // The reviewer fixes it; approval then finishes the job.
    env.jobs
        .edit_descriptions(
            env.tenant,
            id,
            &[(0, "a photo of sks dog on a sofa.".into())],
        )
        .await
        .unwrap();
    env.jobs.approve(env.tenant, id).await.unwrap();
    env.wait_status(id, JobStatus::Succeeded, WAIT).await;
    let entries: Vec<DescriptionEntry> =
        serde_json::from_slice(&artifact(&env, id, DESCRIPTIONS_JSON).await).unwrap();
    assert_eq!(entries[0].text, "a photo of sks dog on a sofa.");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_keep_failing_validation_fail_the_job_without_review() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 2).await;
    env.vlm
        .push_all(std::iter::repeat_n(Behaviour::reply(BAD), 6));
    let mut sequential = env.vlm_config();
    sequential.concurrency = 1;
    let worker = spawn(env.worker_with(env.config(ShutdownMode::FinishStage), sequential));
    let job = env.wait_status(id, JobStatus::Failed, WAIT).await;
    let error = job.error.expect("the error is recorded");
    assert_eq!(error.code, "description_invalid");
    // The message names the photo (whichever of the two was answered first).
    assert!(
        (0..2).any(|i| error
            .message
            .contains(&format!("photo {i} (photo-0{i}.jpg)"))),
        "{}",
        error.message
    );
    assert!(
        error
            .message
            .contains("must start with \"a photo of sks dog\""),
        "{}",
        error.message
    );
    assert_eq!(job.attempts, 1, "an invalid description is not retried");
    assert!(env.jobs.artifacts(id).await.unwrap().is_empty());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vlm_down_beyond_the_attempts_fails_the_job_with_the_error() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 1).await;
    env.vlm
        .push_all(std::iter::repeat_n(Behaviour::Status(503), 50));
    let worker = spawn(env.worker());
    let job = env.wait_status(id, JobStatus::Failed, WAIT).await;
    let error = job.error.expect("the error is recorded");
    assert_eq!(error.code, "vlm_server_error");
    assert!(error.message.contains("503"), "{}", error.message);
    assert_eq!(job.attempts, 3, "max attempts");
    // 3 job attempts x (1 request + 2 client retries).
    assert_eq!(env.vlm.requests().len(), 9);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_spares_a_second_job_with_the_same_photos() {
    let env = Env::new().await;
    let worker = spawn(env.worker());
    let first = env.create_job(sid(false), 2).await;
    env.wait_status(first, JobStatus::Succeeded, WAIT).await;
    assert_eq!(env.vlm.requests().len(), 2);

    let second = env.create_job(sid(false), 2).await;
    env.wait_status(second, JobStatus::Succeeded, WAIT).await;
    assert_eq!(env.vlm.requests().len(), 2, "no request for cached photos");
    let a: Vec<String> = env
        .descriptions(first)
        .await
        .into_iter()
        .map(|d| d.text)
        .collect();
    let b: Vec<String> = env
        .descriptions(second)
        .await
        .into_iter()
        .map(|d| d.text)
        .collect();
    assert_eq!(a, b);

    // Another token does not reuse a text that names the old one.
    let third = env
        .create_job(json!({"subject_class": "dog", "token": "ohwx"}), 2)
        .await;
    env.wait_status(third, JobStatus::Succeeded, WAIT).await;
    assert_eq!(env.vlm.requests().len(), 4);
    assert!(env
        .descriptions(third)
        .await
        .iter()
        .all(|d| d.text.starts_with("a photo of ohwx dog")));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_in_release_mode_gives_the_job_back_at_once() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 2).await;
    env.vlm.set_base_delay(Duration::from_secs(20));
    // A long lease: only the release, not a lapse, can let the second worker in quickly.
    let mut config = env.config(ShutdownMode::Release);
    config.queue.lease_secs = 60.0;
    let first = spawn(env.worker_with(config.clone(), env.vlm_config()));
    env.wait_until("a VLM request", WAIT, || async {
        !env.vlm.requests().is_empty()
    })
    .await;

    let stopping = tokio::time::Instant::now();
    first.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
    let job = env.job(id).await;
    assert_eq!(job.status, JobStatus::Queued);
    assert!(job.error.is_none());

    env.vlm.set_base_delay(Duration::ZERO);
    config.shutdown_mode = ShutdownMode::FinishStage;
    let second = spawn(env.worker_with(config, env.vlm_config()));
    env.wait_status(id, JobStatus::Succeeded, Duration::from_secs(10))
        .await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_in_finish_stage_mode_finishes_the_running_stage() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 1).await;
    env.vlm.set_base_delay(Duration::from_millis(1500));
    let worker = spawn(env.worker());
    env.wait_until("a VLM request", WAIT, || async {
        !env.vlm.requests().is_empty()
    })
    .await;
    worker.stop().await;
    let job = env.job(id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
    assert_eq!(env.descriptions(id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_its_timeout_gives_a_stage_that_runs_on_back() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 2).await;
    env.vlm.set_base_delay(Duration::from_secs(20));
    let mut config = env.config(ShutdownMode::FinishStage);
    config.queue.lease_secs = 60.0;
    config.shutdown_timeout_secs = Some(0.5);
    let worker = spawn(env.worker_with(config, env.vlm_config()));
    env.wait_until("a VLM request", WAIT, || async {
        !env.vlm.requests().is_empty()
    })
    .await;

    let stopping = tokio::time::Instant::now();
    worker.stop().await;
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "the stage had its timeout to finish: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "the stage was stopped at the timeout, not finished: {took:?}"
    );
    let job = env.job(id).await;
    assert_eq!(job.status, JobStatus::Queued, "given back, not lapsed");
    assert!(job.error.is_none());
    assert_eq!(job.attempts, 0, "a give-back does not count as a try");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_needing_a_model_fails_clearly_without_one() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 1).await;
    let worker = sidbooth_worker::Worker::new(
        env.db.pool.clone(),
        env.storage.store.clone(),
        env.config(ShutdownMode::FinishStage),
    )
    .unwrap();
    let running = spawn(worker);
    let job = env.wait_status(id, JobStatus::Failed, WAIT).await;
    assert_eq!(job.error.unwrap().code, "vlm_not_configured");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_was_taken_over_writes_nothing_more() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 2).await;
    env.vlm.set_base_delay(Duration::from_millis(1500));
    // A heartbeat slower than the test: the first worker learns of the takeover only when its
    // fenced writes are refused. One job at a time, so it does not claim the job back itself.
    let mut config = env.config(ShutdownMode::FinishStage);
    config.queue.lease_secs = 60.0;
    config.queue.heartbeat_secs = 30.0;
    config.concurrency = 1;
    let first = spawn(env.worker_with(config, env.vlm_config()));
    env.wait_until("a VLM request", WAIT, || async {
        !env.vlm.requests().is_empty()
    })
    .await;
    assert_eq!(env.job(id).await.status, JobStatus::Running);

    // Another worker takes the job over as if the first one's lease had lapsed.
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&env.db.pool)
        .await
        .unwrap();
    let other = sidbooth_core::Queue::new(
        env.db.pool.clone(),
        sidbooth_core::QueueSettings {
            lease_secs: 60.0,
            ..support::queue_settings()
        },
    );
    let claimed = other
        .claim()
        .await
        .unwrap()
        .expect("the lapsed job is claimable");
    assert_eq!(claimed.job.id, id);

    // The first worker's answers arrive after the takeover; none of them may land.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        env.descriptions(id).await.is_empty(),
        "a fenced-out worker saved a description"
    );
    let job = env.job(id).await;
    assert_eq!(
        job.status,
        JobStatus::Running,
        "the first worker left the job to its new owner"
    );
    assert!(job.error.is_none());
    other
        .heartbeat(&claimed.lease)
        .await
        .expect("the new owner still holds the lease");
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_input_photo_fails_the_job_for_good() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 2).await;
    let images = env.jobs.images(id).await.unwrap();
    env.storage
        .store
        .delete(&images[1].object_key)
        .await
        .unwrap();
    let worker = spawn(env.worker());
    let job = env.wait_status(id, JobStatus::Failed, WAIT).await;
    let error = job.error.unwrap();
    assert_eq!(error.code, "input_missing");
    assert!(error.message.contains("photo 1"), "{}", error.message);
    assert_eq!(job.attempts, 1, "not retried");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_refused_by_the_fence_is_deleted_from_storage() {
    let env = Env::new().await;
    let id = env.create_job(sid(false), 1).await;
    let queue = sidbooth_core::Queue::new(env.db.pool.clone(), support::queue_settings());
    let stale = queue.claim().await.unwrap().unwrap().lease;
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&env.db.pool)
        .await
        .unwrap();
    let current = queue.claim().await.unwrap().unwrap().lease;
    assert!(current.epoch > stale.epoch);

    let prefix = sidbooth_core::keys::artifact(env.tenant, id, "");
    let refused = sidbooth_worker::io::store_artifact(
        &queue,
        &env.storage.store,
        &stale,
        None,
        "descriptions.json",
        "application/json",
        b"[]".to_vec(),
    )
    .await;
    assert!(
        matches!(refused, Err(sidbooth_worker::StageError::LeaseLost)),
        "{refused:?}"
    );
    assert!(
        env.storage.store.list(&prefix).await.unwrap().is_empty(),
        "the refused object was deleted"
    );
    assert!(env.jobs.artifacts(id).await.unwrap().is_empty());

    // The current owner's write lands, and replaces an earlier object of the same name.
    sidbooth_worker::io::store_artifact(
        &queue,
        &env.storage.store,
        &current,
        None,
        "descriptions.json",
        "application/json",
        b"[1]".to_vec(),
    )
    .await
    .unwrap();
    let first_key = env.jobs.artifacts(id).await.unwrap()[0].object_key.clone();
    let newer = sidbooth_core::Lease {
        epoch: current.epoch + 1,
        ..current
    };
    sqlx::query("UPDATE jobs SET lease_epoch = $2 WHERE id = $1")
        .bind(id)
        .bind(newer.epoch)
        .execute(&env.db.pool)
        .await
        .unwrap();
    sidbooth_worker::io::store_artifact(
        &queue,
        &env.storage.store,
        &newer,
        Some(&first_key),
        "descriptions.json",
        "application/json",
        b"[2]".to_vec(),
    )
    .await
    .unwrap();
    let keys = env.storage.store.list(&prefix).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let artifacts = env.jobs.artifacts(id).await.unwrap();
    assert_eq!(artifacts.len(), 1);
    assert_eq!(artifacts[0].object_key, keys[0]);
    assert_eq!(
        env.storage.store.get(&keys[0]).await.unwrap().as_ref(),
        b"[2]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_worker_long_before_its_poll() {
    let env = Env::new().await;
    let mut config = env.config(ShutdownMode::FinishStage);
    config.queue.poll_secs = 60.0;
    let worker = spawn(env.worker_with(config, env.vlm_config()));
    // Let the worker find the queue empty and go to sleep on LISTEN.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let created = tokio::time::Instant::now();
    let id = env
        .create_job(
            json!({"subject_class": "dog", "descriptions": {"case": "class_only"}}),
            1,
        )
        .await;
    env.wait_status(id, JobStatus::Succeeded, Duration::from_secs(10))
        .await;
    assert!(created.elapsed() < Duration::from_secs(10));
    worker.stop().await;
}
