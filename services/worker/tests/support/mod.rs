//! Shared set-up of the worker tests: a database, an embedded S3 server and a fake VLM per test,
//! jobs created directly through the job store with real photos, and waiting helpers.

#![allow(dead_code)]

use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use sidbooth_core::{
    jobs::{Created, NewImage, NewJob},
    keys, tenants,
    testing::{TestDb, TestStorage},
    Description, JobRecord, JobStore, QueueSettings,
};
use sidbooth_describe::{fake::FakeVlm, VlmClient, VlmConfig};
use sidbooth_domain::{JobSpec, JobStatus};
use sidbooth_worker::{config::default_vlm_args, ShutdownMode, Worker, WorkerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const IMAGE_MAX_PX: u32 = 256;

pub struct Env {
    pub db: TestDb,
    pub storage: TestStorage,
    pub vlm: FakeVlm,
    pub jobs: JobStore,
    pub tenant: Uuid,
}

/// Fast queue timings: a worker killed mid-stage is taken over about a second later.
pub fn queue_settings() -> QueueSettings {
    QueueSettings {
        lease_secs: 1.0,
        heartbeat_secs: 0.2,
        poll_secs: 0.2,
        max_attempts: 3,
        retry_base_secs: 0.05,
        retry_max_secs: 0.2,
        ..QueueSettings::default()
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sidbooth_worker=debug,warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Env {
    pub async fn new() -> Env {
        init_tracing();
        let db = TestDb::new().await;
        let storage = TestStorage::start().await;
        let vlm = FakeVlm::start().await;
        let jobs = JobStore::new(db.pool.clone());
        let tenant = tenants::create_key(&db.pool, "acme")
            .await
            .unwrap()
            .tenant_id;
        Env {
            db,
            storage,
            vlm,
            jobs,
            tenant,
        }
    }

    /// A VLM client for the fake server with quick retries.
    pub fn vlm_config(&self) -> VlmConfig {
        let mut c = VlmConfig::new(self.vlm.base_url()).with_api_key("test-key");
        c.model = "fake-model".into();
        c.image_max_px = IMAGE_MAX_PX;
        c.max_retries = 2;
        c.initial_backoff = Duration::from_millis(10);
        c.max_backoff = Duration::from_millis(50);
        c.request_timeout = Duration::from_secs(30);
        c
    }

    pub fn config(&self, mode: ShutdownMode) -> WorkerConfig {
        WorkerConfig {
            queue: queue_settings(),
            vlm: default_vlm_args(),
            engine: Default::default(),
            evaluate: Default::default(),
            upload_part_mib: 64,
            concurrency: 2,
            shutdown_mode: mode,
            shutdown_timeout_secs: None,
        }
    }

    pub fn worker_with(&self, config: WorkerConfig, vlm: VlmConfig) -> Worker {
        Worker::new(self.db.pool.clone(), self.storage.store.clone(), config)
            .unwrap()
            .with_vlm(VlmClient::new(vlm).unwrap())
    }

    pub fn worker(&self) -> Worker {
        self.worker_with(self.config(ShutdownMode::FinishStage), self.vlm_config())
    }

    /// Puts the first `n` photos of dog6 into storage and creates a queued job for them.
    pub async fn create_job(&self, spec: serde_json::Value, n: usize) -> Uuid {
        let spec: JobSpec = serde_json::from_value(spec).unwrap();
        spec.validate(n).unwrap();
        let id = Uuid::now_v7();
        let mut images = Vec::new();
        for (idx, (name, bytes)) in photos(n).into_iter().enumerate() {
            let object_key = keys::input(self.tenant, id, idx, &name);
            let (width, height) = image::load_from_memory(&bytes)
                .map(|i| (i.width(), i.height()))
                .unwrap();
            self.storage
                .store
                .put(&object_key, bytes.clone(), "image/jpeg")
                .await
                .unwrap();
            images.push(NewImage {
                file_name: name,
                object_key,
                content_type: "image/jpeg".into(),
                sha256: hex::encode(Sha256::digest(&bytes)),
                width,
                height,
                bytes: bytes.len() as u64,
                mask_object_key: None,
            });
        }
        let created = self
            .jobs
            .create(NewJob {
                id,
                tenant_id: self.tenant,
                spec,
                images,
                idempotency_key: None,
                request_hash: id.as_bytes().to_vec(),
                max_attempts: queue_settings().max_attempts,
            })
            .await
            .unwrap();
        assert!(matches!(created, Created::New(_)));
        id
    }

    pub async fn job(&self, id: Uuid) -> JobRecord {
        self.jobs.get(self.tenant, id).await.unwrap()
    }

    pub async fn descriptions(&self, id: Uuid) -> Vec<Description> {
        self.jobs.descriptions(id).await.unwrap()
    }

    /// Waits until the job has `status`; panics with the job's state after `within`.
    pub async fn wait_status(&self, id: Uuid, status: JobStatus, within: Duration) -> JobRecord {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let job = self.job(id).await;
            if job.status == status {
                return job;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "job {id} did not reach {status} within {within:?}: status {} stage {:?} error {:?} attempts {}",
                    job.status, job.stage, job.error, job.attempts
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `check` holds.
    pub async fn wait_until<F, Fut>(&self, what: &str, within: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + within;
        while !check().await {
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {within:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The SHA-256 of the copy of photo `idx` the VLM receives.
    pub fn sent_sha(idx: usize) -> String {
        let (_, bytes) = photos(idx + 1).remove(idx);
        let prepared = sidbooth_describe::prepare_photo(&bytes, IMAGE_MAX_PX).unwrap();
        let data = prepared.data_url.split_once(";base64,").unwrap().1;
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        hex::encode(Sha256::digest(&decoded))
    }

    /// The photo index of every image the VLM received, in arrival order.
    pub fn requested_photos(&self) -> Vec<usize> {
        let known: Vec<String> = (0..5).map(Env::sent_sha).collect();
        self.vlm
            .requests()
            .iter()
            .flat_map(|r| r.images.iter())
            .map(|img| {
                known
                    .iter()
                    .position(|sha| *sha == img.sha256)
                    .expect("the VLM received an image that is none of the job's photos")
            })
            .collect()
    }
}

/// The first `n` photos of the dog6 subject: (file name, bytes).
pub fn photos(n: usize) -> Vec<(String, Bytes)> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/dreambooth/dog6");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    names.sort();
    assert!(
        names.len() >= n,
        "dog6 has {} photos, {n} needed",
        names.len()
    );
    names
        .into_iter()
        .take(n)
        .map(|p| {
            let name = format!("photo-{}", p.file_name().unwrap().to_string_lossy());
            (name, Bytes::from(std::fs::read(&p).unwrap()))
        })
        .collect()
}

/// A worker running in its own task.
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

pub fn spawn(worker: Worker) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the worker stops")
            .unwrap()
            .unwrap();
    }
}
