//! The job store and queue against a real Postgres database (one per test).

use std::time::Duration;

use sidbooth_core::{
    jobs::{Created, NewDescription, NewImage, NewJob},
    tenants,
    testing::TestDb,
    CoreError, JobError, JobStore, Queue, QueueSettings, RetryDecision,
};
use sidbooth_domain::{DescriptionCase, JobSpec, JobStatus, Stage};
use uuid::Uuid;

fn spec(review: bool) -> JobSpec {
    serde_json::from_value(serde_json::json!({"subject_class": "dog", "review": review})).unwrap()
}

fn new_job(tenant: Uuid, images: usize, key: Option<&str>, hash: &[u8]) -> NewJob {
    let id = Uuid::now_v7();
    NewJob {
        id,
        tenant_id: tenant,
        spec: spec(false),
        images: (0..images)
            .map(|i| NewImage {
                file_name: format!("{i}.jpg"),
                object_key: format!("k/{id}/{i}"),
                content_type: "image/jpeg".into(),
                sha256: "00".into(),
                width: 8,
                height: 8,
                bytes: 10,
                mask_object_key: None,
            })
            .collect(),
        idempotency_key: key.map(str::to_owned),
        request_hash: hash.to_vec(),
        max_attempts: 3,
    }
}

fn fast_settings() -> QueueSettings {
    QueueSettings {
        lease_secs: 30.0,
        retry_base_secs: 0.05,
        retry_max_secs: 0.2,
        max_attempts: 3,
        ..QueueSettings::default()
    }
}

async fn tenant(db: &TestDb, name: &str) -> Uuid {
    tenants::create_key(&db.pool, name).await.unwrap().tenant_id
}

async fn create(store: &JobStore, job: NewJob) -> Uuid {
    match store.create(job).await.unwrap() {
        Created::New(j) => j.id,
        Created::Existing(_) => panic!("expected a new job"),
    }
}

#[tokio::test]
async fn a_job_runs_through_its_stages_and_records_events() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let queue = Queue::new(db.pool.clone(), fast_settings());
    let t = tenant(&db, "acme").await;
    let id = create(&store, new_job(t, 2, None, b"h")).await;

    let claimed = queue.claim().await.unwrap().expect("a job to claim");
    assert_eq!(claimed.job.id, id);
    assert_eq!(claimed.job.status, JobStatus::Running);
    assert_eq!(claimed.job.next_stage(), Some(Stage::Describe));
    assert!(
        queue.claim().await.unwrap().is_none(),
        "nothing else is claimable"
    );

    queue
        .progress(
            &claimed.lease,
            Stage::Describe,
            0.5,
            serde_json::json!({"image": 0}),
        )
        .await
        .unwrap();
    let done = queue
        .complete_stage(&claimed.lease, Stage::Describe, None)
        .await
        .unwrap();
    assert_eq!(done.stages_done, vec![Stage::Describe]);
    assert_eq!(done.next_stage(), None);
    let finished = queue.succeed(&claimed.lease).await.unwrap();
    assert_eq!(finished.status, JobStatus::Succeeded);
    assert!(finished.finished_at.is_some());

    let kinds: Vec<String> = store
        .events_since(id, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["status", "status", "progress", "stage_completed", "status"]
    );
}

#[tokio::test]
async fn a_lapsed_lease_is_taken_over_and_the_old_worker_is_fenced_out() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let short = QueueSettings {
        lease_secs: 0.3,
        ..fast_settings()
    };
    let first = Queue::new(db.pool.clone(), short.clone());
    let second = Queue::new(db.pool.clone(), short);
    let t = tenant(&db, "acme").await;
    let id = create(&store, new_job(t, 1, None, b"h")).await;

    let old = first.claim().await.unwrap().unwrap();
    assert!(second.claim().await.unwrap().is_none(), "lease still valid");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = second
        .claim()
        .await
        .unwrap()
        .expect("lapsed lease is claimable");
    assert_eq!(new.job.id, id);
    assert!(new.lease.epoch > old.lease.epoch);

    assert!(matches!(
        first.heartbeat(&old.lease).await,
        Err(CoreError::LeaseLost)
    ));
    let description = NewDescription {
        idx: 0,
        text: "a photo of sks dog".into(),
        case: DescriptionCase::ClassOnly,
        model: "none".into(),
        instruction: String::new(),
        instruction_version: "1".into(),
        problem: None,
    };
    assert!(matches!(
        first.save_description(&old.lease, &description).await,
        Err(CoreError::LeaseLost)
    ));
    assert!(matches!(
        first.succeed(&old.lease).await,
        Err(CoreError::LeaseLost)
    ));
    second
        .save_description(&new.lease, &description)
        .await
        .unwrap();
    second.heartbeat(&new.lease).await.unwrap();
    assert_eq!(store.descriptions(id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_workers_never_claim_the_same_job() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let t = tenant(&db, "acme").await;
    for _ in 0..40 {
        create(&store, new_job(t, 1, None, b"h")).await;
    }
    let mut workers = Vec::new();
    for _ in 0..4 {
        let queue = Queue::new(db.pool.clone(), fast_settings());
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(c) = queue.claim().await.unwrap() {
                queue.succeed(&c.lease).await.unwrap();
                mine.push(c.job.id);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(total, 40);
    assert_eq!(all.len(), 40);
}

#[tokio::test]
async fn transient_failures_back_off_then_fail_with_the_error_recorded() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let queue = Queue::new(db.pool.clone(), fast_settings());
    let t = tenant(&db, "acme").await;
    let id = create(&store, new_job(t, 1, None, b"h")).await;
    let error = JobError {
        code: "vlm_unavailable".into(),
        message: "the VLM answered 503".into(),
        stage: Some(Stage::Describe),
    };

    for attempt in 1..=2 {
        let c = queue.claim().await.unwrap().expect("claimable");
        assert_eq!(c.job.attempts, attempt);
        let decision = queue.retry_later(&c.lease, &error).await.unwrap();
        assert!(
            matches!(decision, RetryDecision::RetryAfter(_)),
            "{decision:?}"
        );
        let job = store.get(t, id).await.unwrap();
        assert_eq!(job.status, JobStatus::Queued);
        assert!(job.run_after > chrono::Utc::now() - chrono::Duration::milliseconds(10));
        assert!(queue.claim().await.unwrap().is_none(), "backing off");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let c = queue.claim().await.unwrap().expect("claimable");
    assert_eq!(
        queue.retry_later(&c.lease, &error).await.unwrap(),
        RetryDecision::Failed
    );
    let job = store.get(t, id).await.unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.error, Some(error));
}

#[tokio::test]
async fn cancel_stops_queued_jobs_at_once_and_flags_running_ones() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let queue = Queue::new(db.pool.clone(), fast_settings());
    let t = tenant(&db, "acme").await;
    let running = create(&store, new_job(t, 1, None, b"h")).await;
    let c = queue.claim().await.unwrap().unwrap();
    let queued = create(&store, new_job(t, 1, None, b"h")).await;

    assert_eq!(
        store.cancel(t, queued).await.unwrap().status,
        JobStatus::Canceled
    );
    assert!(matches!(
        store.cancel(t, queued).await,
        Err(CoreError::Conflict(_))
    ));

    let flagged = store.cancel(t, running).await.unwrap();
    assert_eq!(flagged.status, JobStatus::Running);
    assert!(queue.heartbeat(&c.lease).await.unwrap().cancel_requested);
    assert_eq!(
        queue.mark_canceled(&c.lease).await.unwrap().status,
        JobStatus::Canceled
    );
    assert!(queue.claim().await.unwrap().is_none());
}

#[tokio::test]
async fn idempotency_keys_return_the_first_job_or_refuse_a_different_body() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let t = tenant(&db, "acme").await;
    let first = create(&store, new_job(t, 1, Some("k1"), b"same")).await;
    match store
        .create(new_job(t, 1, Some("k1"), b"same"))
        .await
        .unwrap()
    {
        Created::Existing(j) => assert_eq!(j.id, first),
        Created::New(_) => panic!("a second job for the same key"),
    }
    assert!(matches!(
        store.create(new_job(t, 1, Some("k1"), b"other")).await,
        Err(CoreError::IdempotencyMismatch)
    ));
    // The same key under another tenant is another job.
    let other = tenant(&db, "globex").await;
    create(&store, new_job(other, 1, Some("k1"), b"same")).await;
}

#[tokio::test]
async fn listing_is_newest_first_paginated_filtered_and_per_tenant() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let queue = Queue::new(db.pool.clone(), fast_settings());
    let t = tenant(&db, "acme").await;
    let other = tenant(&db, "globex").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create(&store, new_job(t, 1, None, b"h")).await);
    }
    let foreign = create(&store, new_job(other, 1, None, b"h")).await;

    let page1 = store.list(t, None, None, 2).await.unwrap();
    assert_eq!(
        page1.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        [ids[4], ids[3]]
    );
    let page2 = store.list(t, None, page1.next_cursor, 2).await.unwrap();
    assert_eq!(
        page2.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        [ids[2], ids[1]]
    );
    let page3 = store.list(t, None, page2.next_cursor, 2).await.unwrap();
    assert_eq!(
        page3.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        [ids[0]]
    );
    assert_eq!(page3.next_cursor, None);

    let c = queue.claim().await.unwrap().unwrap();
    queue.succeed(&c.lease).await.unwrap();
    let done = store
        .list(t, Some(JobStatus::Succeeded), None, 10)
        .await
        .unwrap();
    assert_eq!(done.jobs.len(), 1);
    assert_eq!(done.jobs[0].id, c.job.id);

    assert!(matches!(
        store.get(t, foreign).await,
        Err(CoreError::NotFound)
    ));
    assert!(matches!(
        store.cancel(t, foreign).await,
        Err(CoreError::NotFound)
    ));
    assert!(matches!(
        store.delete(t, foreign).await,
        Err(CoreError::NotFound)
    ));
}

#[tokio::test]
async fn review_edit_and_approve() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let queue = Queue::new(db.pool.clone(), fast_settings());
    let t = tenant(&db, "acme").await;
    let mut job = new_job(t, 2, None, b"h");
    job.spec = spec(true);
    let id = create(&store, job).await;

    assert!(matches!(
        store.edit_descriptions(t, id, &[(0, "x".into())]).await,
        Err(CoreError::Conflict(_))
    ));
    // The refusal rolled its transaction back: the job is not left locked for the claim.
    let c = queue.claim().await.unwrap().unwrap();
    for idx in 0..2 {
        let problem = (idx == 1).then(|| serde_json::json!({"code": "describes_subject"}));
        queue
            .save_description(
                &c.lease,
                &NewDescription {
                    idx,
                    text: format!("a photo of sks dog {idx}"),
                    case: DescriptionCase::Sid,
                    model: "m".into(),
                    instruction: "i".into(),
                    instruction_version: "1".into(),
                    problem,
                },
            )
            .await
            .unwrap();
    }
    queue
        .complete_stage(&c.lease, Stage::Describe, None)
        .await
        .unwrap();
    queue.await_review(&c.lease).await.unwrap();
    assert_eq!(
        store.get(t, id).await.unwrap().status,
        JobStatus::AwaitingReview
    );

    assert!(matches!(
        store.approve(t, id).await,
        Err(CoreError::Conflict(_))
    ));
    let edited = store
        .edit_descriptions(t, id, &[(1, "a photo of sks dog on a red rug".into())])
        .await
        .unwrap();
    assert!(edited[1].edited && edited[1].problem.is_none());
    assert!(matches!(
        store.edit_descriptions(t, id, &[(5, "nope".into())]).await,
        Err(CoreError::Conflict(_))
    ));
    let approved = store.approve(t, id).await.unwrap();
    assert_eq!(approved.status, JobStatus::Queued);
    let again = queue.claim().await.unwrap().unwrap();
    assert_eq!(again.job.id, id);
    assert_eq!(
        again.job.next_stage(),
        None,
        "describe is not redone after approval"
    );
}

#[tokio::test]
async fn a_tenant_at_its_running_limit_waits_while_others_run() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let busy = tenant(&db, "busy").await;
    let other = tenant(&db, "other").await;
    let first = create(&store, new_job(busy, 1, None, b"1")).await;
    let second = create(&store, new_job(busy, 1, None, b"2")).await;
    let theirs = create(&store, new_job(other, 1, None, b"3")).await;
    // One at a time for every tenant by default; `busy` keeps that, `other` may run two.
    let queue = Queue::new(
        db.pool.clone(),
        QueueSettings {
            max_running_jobs: 1,
            ..fast_settings()
        },
    );
    sidbooth_core::quotas::QuotaStore::new(db.pool.clone())
        .set_overrides(
            "other",
            &sidbooth_core::quotas::LimitOverrides {
                max_running_jobs: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let extra = create(&store, new_job(other, 1, None, b"4")).await;

    let a = queue.claim().await.unwrap().unwrap();
    assert_eq!(a.job.id, first);
    let b = queue.claim().await.unwrap().unwrap();
    assert_eq!(
        b.job.id, theirs,
        "busy's second job waits; other's goes ahead"
    );
    let c = queue.claim().await.unwrap().unwrap();
    assert_eq!(c.job.id, extra, "other's own limit is 2");
    assert!(
        queue.claim().await.unwrap().is_none(),
        "everyone is at the limit"
    );

    queue.succeed(&a.lease).await.unwrap();
    let d = queue.claim().await.unwrap().unwrap();
    assert_eq!(
        d.job.id, second,
        "busy's next job starts once its first ended"
    );
}

#[tokio::test]
async fn succeed_and_claim_hands_over_the_next_job_fenced_and_within_limits() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let t = tenant(&db, "chain").await;
    // One running job per tenant: the finishing job must not count against the next one.
    let queue = Queue::new(
        db.pool.clone(),
        QueueSettings {
            max_running_jobs: 1,
            ..fast_settings()
        },
    );
    let first = create(&store, new_job(t, 0, None, b"1")).await;
    let second = create(&store, new_job(t, 0, None, b"2")).await;

    let a = queue.claim().await.unwrap().unwrap();
    assert_eq!(a.job.id, first);
    let (done, next) = queue.succeed_and_claim(&a.lease).await.unwrap();
    assert_eq!(done.id, first);
    assert_eq!(done.status, JobStatus::Succeeded);
    assert!(done.finished_at.is_some());
    let b = next.expect("the tenant's next job, claimed with the success");
    assert_eq!(b.job.id, second);
    assert_eq!(b.job.status, JobStatus::Running);
    assert_eq!(b.job.attempts, 1);
    assert_eq!(b.lease.tenant_id, t);
    // The handed-over lease is a real one: it renews, and a stale copy of it is fenced out.
    queue.heartbeat(&b.lease).await.unwrap();
    let stale = sidbooth_core::Lease {
        epoch: b.lease.epoch - 1,
        ..b.lease
    };
    assert!(matches!(
        queue.succeed_and_claim(&stale).await,
        Err(CoreError::LeaseLost)
    ));

    // A fenced-out success claims nothing: the third job stays queued for a live worker.
    let third = create(&store, new_job(t, 0, None, b"3")).await;
    assert!(matches!(
        queue.succeed_and_claim(&a.lease).await,
        Err(CoreError::LeaseLost)
    ));
    assert_eq!(store.get(t, third).await.unwrap().status, JobStatus::Queued);
    assert_eq!(
        store.get(t, second).await.unwrap().status,
        JobStatus::Running
    );

    let (done, next) = queue.succeed_and_claim(&b.lease).await.unwrap();
    assert_eq!(done.id, second);
    let c = next.expect("the third job");
    assert_eq!(c.job.id, third);
    let (done, next) = queue.succeed_and_claim(&c.lease).await.unwrap();
    assert_eq!(done.id, third);
    assert!(next.is_none(), "the queue is empty");

    // Each job has its own status events, claimed and succeeded, as with claim and succeed.
    for id in [first, second, third] {
        let statuses: Vec<String> = store
            .events_since(id, 0)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "status")
            .map(|e| e.data["status"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(statuses, ["queued", "running", "succeeded"], "job {id}");
    }
}

async fn expect_wake(events: &mut sqlx::postgres::PgListener, id: Uuid, what: &str) {
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap_or_else(|_| panic!("the {what} wakes the job's followers"))
        .unwrap();
    assert_eq!(event.payload(), id.to_string(), "{what}");
}

#[tokio::test]
async fn a_change_wakes_its_listeners_after_it_commits() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let queue = Queue::new(db.pool.clone(), fast_settings());
    let t = tenant(&db, "wake").await;
    let mut events = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    events
        .listen(sidbooth_core::events::EVENTS_CHANNEL)
        .await
        .unwrap();
    let mut workers = queue.listen().await.unwrap();

    let id = create(&store, new_job(t, 0, None, b"w")).await;
    let woken = tokio::time::timeout(Duration::from_secs(5), workers.recv())
        .await
        .expect("a new job wakes the workers")
        .unwrap();
    assert_eq!(woken.channel(), sidbooth_core::events::QUEUE_CHANNEL);
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("its status event wakes its followers")
        .unwrap();
    assert_eq!(event.payload(), id.to_string());

    // Each change wakes the followers once it committed. (Wakes that wait together go out in
    // one statement, and Postgres folds identical notifications of one transaction, so changes
    // in quick succession may wake them once: they then read every event since their last.)
    let claimed = queue.claim().await.unwrap().unwrap();
    expect_wake(&mut events, id, "claim").await;
    queue
        .progress(&claimed.lease, Stage::Describe, 0.5, serde_json::json!({}))
        .await
        .unwrap();
    expect_wake(&mut events, id, "progress").await;
    queue.succeed(&claimed.lease).await.unwrap();
    expect_wake(&mut events, id, "success").await;
}

#[tokio::test]
async fn slots_finishing_together_each_get_their_own_next_job() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let t = tenant(&db, "slots").await;
    let queue = Queue::new(db.pool.clone(), fast_settings());
    let mut ids = Vec::new();
    for i in 0..7u8 {
        ids.push(create(&store, new_job(t, 0, None, &[i])).await);
    }
    let running: Vec<_> = futures_claims(&queue, 4).await;
    // A stale lease among them: fenced out, it claims nothing, and the others are unaffected.
    let stale = sidbooth_core::Lease {
        epoch: running[3].lease.epoch + 1,
        ..running[3].lease
    };
    let (a, b, c, d) = tokio::join!(
        queue.succeed_and_claim(&running[0].lease),
        queue.succeed_and_claim(&running[1].lease),
        queue.succeed_and_claim(&running[2].lease),
        queue.succeed_and_claim(&stale),
    );
    assert!(matches!(d, Err(CoreError::LeaseLost)), "{d:?}");
    let mut next = Vec::new();
    for (result, finished) in [a, b, c].into_iter().zip(&running) {
        let (done, claimed) = result.unwrap();
        assert_eq!(done.id, finished.job.id);
        assert_eq!(done.status, JobStatus::Succeeded);
        next.push(claimed.expect("a next job for every slot that finished"));
    }
    let mut next_ids: Vec<Uuid> = next.iter().map(|c| c.job.id).collect();
    next_ids.sort();
    next_ids.dedup();
    assert_eq!(next_ids.len(), 3, "three different jobs");
    for claimed in &next {
        assert!(!running.iter().any(|r| r.job.id == claimed.job.id));
        assert_eq!(claimed.job.status, JobStatus::Running);
        queue.heartbeat(&claimed.lease).await.unwrap();
    }
    assert_eq!(
        store.get(t, running[3].job.id).await.unwrap().status,
        JobStatus::Running,
        "the job behind the stale lease is untouched"
    );
    // Seven jobs: three succeeded, four running (one from the start, three handed over), none
    // queued: nobody claimed more than was asked for.
    let counts = store.status_counts().await.unwrap();
    let count = |s: JobStatus| counts.iter().find(|(c, _)| *c == s).map_or(0, |(_, n)| *n);
    assert_eq!(count(JobStatus::Succeeded), 3);
    assert_eq!(count(JobStatus::Running), 4);
    assert_eq!(count(JobStatus::Queued), 0);
}

async fn futures_claims(queue: &Queue, n: usize) -> Vec<sidbooth_core::Claimed> {
    let mut claimed = Vec::new();
    for _ in 0..n {
        claimed.push(queue.claim().await.unwrap().expect("a job to claim"));
    }
    claimed
}

/// Settings under which every job counts as quick, whatever the machine's load.
fn claim_ahead_settings() -> QueueSettings {
    QueueSettings {
        quick_job_secs: 30.0,
        ..fast_settings()
    }
}

async fn count_status(store: &JobStore, status: JobStatus) -> i64 {
    let counts = store.status_counts().await.unwrap();
    counts
        .iter()
        .find(|(s, _)| *s == status)
        .map_or(0, |(_, n)| *n)
}

#[tokio::test]
async fn quick_jobs_get_their_next_claimed_ahead_and_an_unused_one_is_given_back() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let t = tenant(&db, "ahead").await;
    let queue = Queue::new(db.pool.clone(), claim_ahead_settings());
    for i in 0..6u8 {
        create(&store, new_job(t, 0, None, &[i])).await;
    }
    // A job claimed on its own was not handed out by the chain: its success claims just one.
    let first = queue.claim().await.unwrap().unwrap();
    let second = queue.finish_and_claim(&first.lease).await.unwrap().unwrap();
    assert_eq!(count_status(&store, JobStatus::Running).await, 1);
    // The second was handed out by the chain and finished quickly: its success claims one
    // more, kept ready.
    let third = queue
        .finish_and_claim(&second.lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count_status(&store, JobStatus::Succeeded).await, 2);
    assert_eq!(count_status(&store, JobStatus::Running).await, 2);
    // The ready one comes at once; the third's success is recorded by the next statement.
    let fourth = queue.finish_and_claim(&third.lease).await.unwrap().unwrap();
    assert_ne!(fourth.job.id, third.job.id);
    queue.flush().await;
    assert_eq!(
        store.get(t, third.job.id).await.unwrap().status,
        JobStatus::Succeeded
    );
    // Flushing gave back what was claimed ahead and not handed out: only the fourth runs, and
    // the given-back job's try was not counted.
    assert_eq!(count_status(&store, JobStatus::Succeeded).await, 3);
    assert_eq!(count_status(&store, JobStatus::Running).await, 1);
    let queued: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM jobs WHERE status = 'queued'")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(queued, vec![0, 0]);
    // Unused and not flushed: given back when it has waited a second (a quarter of the lease
    // at most).
    let fifth = queue
        .finish_and_claim(&fourth.lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count_status(&store, JobStatus::Running).await, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count_status(&store, JobStatus::Running).await, 1);
    assert_eq!(count_status(&store, JobStatus::Queued).await, 1);
    queue.heartbeat(&fifth.lease).await.unwrap();
}

#[tokio::test]
async fn slots_with_quick_jobs_run_every_job_once_and_every_success_is_recorded() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let t = tenant(&db, "quick").await;
    let queue = Queue::new(db.pool.clone(), claim_ahead_settings());
    let jobs = 40;
    for i in 0..jobs {
        create(&store, new_job(t, 0, None, &[i as u8])).await;
    }
    let mut slots = Vec::new();
    for _ in 0..3 {
        let queue = queue.clone();
        slots.push(tokio::spawn(async move {
            let mut ran = Vec::new();
            let mut next = queue.claim().await.unwrap();
            while let Some(claimed) = next {
                ran.push(claimed.job.id);
                next = queue.finish_and_claim(&claimed.lease).await.unwrap();
            }
            ran
        }));
    }
    let mut ran = Vec::new();
    for slot in slots {
        ran.extend(slot.await.unwrap());
    }
    queue.flush().await;
    ran.sort();
    ran.dedup();
    assert_eq!(ran.len(), jobs, "every job ran, none twice");
    assert_eq!(
        count_status(&store, JobStatus::Succeeded).await,
        jobs as i64
    );
    // Each job: claimed once (one try), one 'running' and one 'succeeded' status event.
    let tries: i64 = sqlx::query_scalar("SELECT sum(attempts) FROM jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tries, jobs as i64);
    let events: Vec<(String, i64)> = sqlx::query_as(
        "SELECT data->>'status', count(*) FROM job_events WHERE kind = 'status'
         GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        events,
        vec![
            ("queued".to_string(), jobs as i64),
            ("running".to_string(), jobs as i64),
            ("succeeded".to_string(), jobs as i64),
        ]
    );
}

#[tokio::test]
async fn a_stale_lease_finishing_is_refused_and_claims_nothing() {
    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let t = tenant(&db, "stale").await;
    let queue = Queue::new(db.pool.clone(), claim_ahead_settings());
    for i in 0..3u8 {
        create(&store, new_job(t, 0, None, &[i])).await;
    }
    let claimed = queue.claim().await.unwrap().unwrap();
    let stale = sidbooth_core::Lease {
        epoch: claimed.lease.epoch + 1,
        ..claimed.lease
    };
    let refused = queue.finish_and_claim(&stale).await;
    assert!(matches!(refused, Err(CoreError::LeaseLost)), "{refused:?}");
    assert_eq!(count_status(&store, JobStatus::Running).await, 1);
    assert_eq!(count_status(&store, JobStatus::Queued).await, 2);
    queue.heartbeat(&claimed.lease).await.unwrap();
}
