//! The retention sweeper against real Postgres and a real S3 server: expired jobs leave nothing
//! behind, others are untouched, and sweeping again is harmless.

use std::time::Duration;

use bytes::Bytes;
use sidbooth_core::{
    jobs::Created,
    keys,
    retention::{Sweeper, Swept},
    tenants,
    testing::{TestDb, TestStorage},
    JobStore,
};
use uuid::Uuid;

async fn job_with_objects(db: &TestDb, storage: &TestStorage, tenant: Uuid) -> Uuid {
    let job = sidbooth_core::testing::new_job(tenant, &["dog.jpg"]);
    let id = job.id;
    for (key, content_type) in [
        (job.images[0].object_key.clone(), "image/jpeg"),
        (keys::artifact(tenant, id, "images/0.png"), "image/png"),
    ] {
        storage
            .store
            .put(&key, Bytes::from_static(b"bytes"), content_type)
            .await
            .unwrap();
    }
    match JobStore::new(db.pool.clone()).create(job).await.unwrap() {
        Created::New(j) => j.id,
        Created::Existing(_) => panic!("a new job"),
    }
}

async fn finish(db: &TestDb, id: Uuid, status: &str, ago_secs: f64) {
    sqlx::query(
        "UPDATE jobs SET status = $2, finished_at = now() - make_interval(secs => $3),
                updated_at = now() - make_interval(secs => $3) WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(ago_secs)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn count(db: &TestDb, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn expired_jobs_are_deleted_with_everything_they_own() {
    let db = TestDb::new().await;
    let storage = TestStorage::start().await;
    let tenant = tenants::create_key(&db.pool, "t").await.unwrap().tenant_id;
    let day = 86_400.0;

    let old_done = job_with_objects(&db, &storage, tenant).await;
    finish(&db, old_done, "succeeded", 3.0 * day).await;
    let old_failed = job_with_objects(&db, &storage, tenant).await;
    finish(&db, old_failed, "failed", 2.0 * day).await;
    let abandoned_review = job_with_objects(&db, &storage, tenant).await;
    sqlx::query("UPDATE jobs SET status = 'awaiting_review', updated_at = now() - interval '3 days' WHERE id = $1")
        .bind(abandoned_review)
        .execute(&db.pool)
        .await
        .unwrap();
    let recent = job_with_objects(&db, &storage, tenant).await;
    finish(&db, recent, "succeeded", 60.0).await;
    // Queued long ago but never finished: not swept.
    let waiting = job_with_objects(&db, &storage, tenant).await;
    sqlx::query("UPDATE jobs SET created_at = now() - interval '9 days' WHERE id = $1")
        .bind(waiting)
        .execute(&db.pool)
        .await
        .unwrap();

    let sweeper = Sweeper::new(
        db.pool.clone(),
        storage.store.clone(),
        Duration::from_secs_f64(day),
    );
    let swept = sweeper.sweep().await.unwrap();
    assert_eq!(
        swept,
        Swept {
            jobs: 3,
            objects: 6
        }
    );

    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, vec![recent, waiting]);
    for table in ["job_images", "job_events"] {
        let orphans: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE job_id <> ALL($1)"
        ))
        .bind(&left)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(orphans, 0, "{table} rows of swept jobs");
    }
    let mut keys_left = storage.all_keys().await;
    keys_left.sort();
    let mut expected: Vec<String> = [recent, waiting]
        .iter()
        .flat_map(|j| {
            [
                keys::input(tenant, *j, 0, "dog.jpg"),
                keys::artifact(tenant, *j, "images/0.png"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(keys_left, expected, "only the kept jobs' objects are left");
    assert_eq!(count(&db, "job_images").await, 2);

    // Again: nothing more to do, and no error.
    assert_eq!(sweeper.sweep().await.unwrap(), Swept::default());
}

#[tokio::test]
async fn a_sweep_repeated_after_a_partial_one_finishes_the_job() {
    let db = TestDb::new().await;
    let storage = TestStorage::start().await;
    let tenant = tenants::create_key(&db.pool, "t").await.unwrap().tenant_id;
    let job = job_with_objects(&db, &storage, tenant).await;
    finish(&db, job, "canceled", 7200.0).await;
    // A sweep that died after deleting some objects but before the rows went.
    storage
        .store
        .delete(&keys::input(tenant, job, 0, "dog.jpg"))
        .await
        .unwrap();
    let sweeper = Sweeper::new(
        db.pool.clone(),
        storage.store.clone(),
        Duration::from_secs(3600),
    );
    assert_eq!(
        sweeper.sweep().await.unwrap(),
        Swept {
            jobs: 1,
            objects: 1
        }
    );
    assert_eq!(count(&db, "jobs").await, 0);
    assert!(storage.all_keys().await.is_empty());
}
