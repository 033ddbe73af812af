//! Queue throughput: no-op jobs claimed and completed per second by concurrent queue workers.
//!
//! ```text
//! cargo run -p sidbooth-worker --example bench_queue -- [JOBS] [WORKERS] [--stage] [--separate]
//!     [--queue-per-worker]
//! ```
//!
//! Creates JOBS queued jobs (default 10000) in a fresh database on the test Postgres server
//! (SIDBOOTH_TEST_DATABASE_URL or postgres://postgres@127.0.0.1:5432), then runs WORKERS
//! (default 4) loops until the queue is empty, as the worker's slots run jobs: `Queue::claim`
//! once, then `Queue::finish_and_claim` for each job, which hands over the next (as the worker
//! does: while jobs are quick, claimed ahead). The loops
//! share one `Queue`, as the slots of a worker with `--concurrency WORKERS` do (and as
//! graphile-worker's runner at that concurrency does); with `--queue-per-worker` each loop has
//! its own, as separate worker processes would. With `--separate` each job is a `Queue::claim`
//! and a `Queue::succeed` (two statements, two commits). With `--stage` each job also goes
//! through `Queue::complete_stage`, as a one-stage job run by the worker does.

use std::time::Instant;

use sidbooth_core::{jobs::NewJob, tenants, testing::TestDb, JobStore, Queue, QueueSettings};
use sidbooth_domain::{JobSpec, JobStatus, Stage};
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let with_stage = args.iter().any(|a| a == "--stage");
    let separate = args.iter().any(|a| a == "--separate");
    let queue_per_worker = args.iter().any(|a| a == "--queue-per-worker");
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let jobs_n = numbers.first().copied().unwrap_or(10_000);
    let workers = numbers.get(1).copied().unwrap_or(4);

    let db = TestDb::new().await;
    let store = JobStore::new(db.pool.clone());
    let tenant = tenants::create_key(&db.pool, "bench").await?.tenant_id;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({"subject_class": "dog"}))?;

    let started = Instant::now();
    let creators = 8;
    let mut tasks = Vec::new();
    for c in 0..creators {
        let store = store.clone();
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (c..jobs_n).step_by(creators) {
                let id = Uuid::now_v7();
                store
                    .create(NewJob {
                        id,
                        tenant_id: tenant,
                        spec: spec.clone(),
                        images: Vec::new(),
                        idempotency_key: None,
                        request_hash: Vec::new(),
                        max_attempts: 3,
                    })
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "created {jobs_n} jobs in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    let settings = QueueSettings::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    let shared = Queue::new(db.pool.clone(), settings.clone());
    for _ in 0..workers {
        let queue = if queue_per_worker {
            Queue::new(db.pool.clone(), settings.clone())
        } else {
            shared.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            let mut next = queue.claim().await?;
            while let Some(claimed) = next {
                if with_stage {
                    queue
                        .complete_stage(&claimed.lease, Stage::Describe, None)
                        .await?;
                }
                next = if separate {
                    queue.succeed(&claimed.lease).await?;
                    queue.claim().await?
                } else {
                    queue.finish_and_claim(&claimed.lease).await?
                };
                done += 1;
            }
            // Successes still to be recorded (finish_and_claim records them with the next
            // statement) are in before the clock stops.
            queue.flush().await;
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let succeeded = store
        .status_counts()
        .await?
        .into_iter()
        .find(|(s, _)| *s == JobStatus::Succeeded)
        .map_or(0, |(_, n)| n);
    assert_eq!(
        succeeded as usize, jobs_n,
        "every job succeeded exactly once"
    );
    assert_eq!(total, jobs_n);
    println!(
        "{workers} {}: {total} jobs claimed and completed{}{} in {secs:.2}s = {:.0} jobs/s",
        if queue_per_worker {
            "workers with a queue each"
        } else {
            "slots of one worker"
        },
        if separate {
            " (claim and succeed apart)"
        } else {
            " (finish_and_claim)"
        },
        if with_stage {
            " (with complete_stage)"
        } else {
            ""
        },
        total as f64 / secs
    );
    Ok(())
}
