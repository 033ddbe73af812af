//! The whole service for end-to-end tests: a database of its own, s3s-fs on a temporary
//! folder, the fake VLM, the API served on a free port, and workers.

pub mod browser;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use sidbooth_core::{
    testing::{TestDb, TestStorage},
    QueueSettings,
};
use sidbooth_describe::fake::FakeVlm;
use sidbooth_worker::{Worker, WorkerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod process;

/// Photos from the shared DreamBooth folder beside the checkout.
pub fn dataset_photos(subject: &str, count: usize) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/datasets/dreambooth")
        .join(subject);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    assert!(
        files.len() >= count,
        "{} has fewer than {count} photos",
        dir.display()
    );
    files
        .into_iter()
        .take(count)
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Queue timing fast enough for tests: short leases, quick heartbeats and retries.
pub fn fast_queue() -> QueueSettings {
    QueueSettings {
        lease_secs: 2.0,
        heartbeat_secs: 0.2,
        poll_secs: 0.2,
        max_attempts: 4,
        retry_base_secs: 0.1,
        retry_max_secs: 0.5,
        ..QueueSettings::default()
    }
}

pub struct Stack {
    pub db: TestDb,
    pub storage: TestStorage,
    pub vlm: FakeVlm,
    pub api_url: String,
    pub key: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    workers: Vec<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A stack whose API settings `adjust` changes first (CORS origins, limits...).
    pub async fn start_with(adjust: impl FnOnce(&mut sidbooth_api::ApiConfig)) -> Self {
        let db = TestDb::new().await;
        let storage = TestStorage::start().await;
        let vlm = FakeVlm::start().await;
        let key = sidbooth_core::tenants::create_key(&db.pool, "e2e")
            .await
            .unwrap()
            .secret;

        let mut config = sidbooth_api::ApiConfig {
            queue: fast_queue(),
            sse_keepalive_secs: 1,
            ..sidbooth_api::ApiConfig::default()
        };
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_url = format!("http://{}", listener.local_addr().unwrap());
        let state = sidbooth_api::AppState::new(db.pool.clone(), storage.store.clone(), config);
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            sidbooth_api::serve(listener, state, async move { token.cancelled().await })
                .await
                .unwrap()
        });
        Self {
            db,
            storage,
            vlm,
            api_url,
            key,
            http: reqwest::Client::new(),
            shutdown,
            workers: Vec::new(),
        }
    }

    /// Worker settings that talk to this stack's fake VLM.
    pub fn worker_config(&self) -> WorkerConfig {
        let mut config = WorkerConfig {
            queue: fast_queue(),
            ..WorkerConfig::default()
        };
        config.vlm.vlm_base_url = Some(self.vlm.base_url());
        config.vlm.vlm_api_key = Some("vlm-test-key".parse().unwrap());
        config.vlm.vlm_model = "fake-gpt".into();
        config
    }

    /// Starts an in-process worker; returns its index for [`Stack::stop_worker`].
    pub fn start_worker(&mut self, config: WorkerConfig) -> usize {
        let worker = Worker::new(self.db.pool.clone(), self.storage.store.clone(), config).unwrap();
        let token = CancellationToken::new();
        let handle = tokio::spawn(worker.run(token.clone()));
        self.workers.push((token, handle));
        self.workers.len() - 1
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_url)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(&self.key)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(&self.key)
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.put(self.url(path)).bearer_auth(&self.key)
    }

    /// POST /v1/jobs with a spec and photos; returns the job JSON after asserting 202.
    pub async fn submit(
        &self,
        spec: serde_json::Value,
        photos: &[(String, Vec<u8>)],
    ) -> serde_json::Value {
        self.submit_with_masks(spec, photos, &[]).await
    }

    /// POST /v1/jobs with a spec, photos and subject masks (`masks` parts, PNG).
    pub async fn submit_with_masks(
        &self,
        spec: serde_json::Value,
        photos: &[(String, Vec<u8>)],
        masks: &[(String, Vec<u8>)],
    ) -> serde_json::Value {
        let mut form = reqwest::multipart::Form::new().part(
            "spec",
            reqwest::multipart::Part::text(spec.to_string())
                .mime_str("application/json")
                .unwrap(),
        );
        for (name, bytes) in photos {
            form = form.part(
                "images",
                reqwest::multipart::Part::bytes(bytes.clone())
                    .file_name(name.clone())
                    .mime_str("image/jpeg")
                    .unwrap(),
            );
        }
        for (name, bytes) in masks {
            form = form.part(
                "masks",
                reqwest::multipart::Part::bytes(bytes.clone())
                    .file_name(name.clone())
                    .mime_str("image/png")
                    .unwrap(),
            );
        }
        let response = self.post("/v1/jobs").multipart(form).send().await.unwrap();
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{body}");
        body
    }

    pub async fn job(&self, id: &str) -> serde_json::Value {
        let response = self.get(&format!("/v1/jobs/{id}")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Polls the job until its status is `want`; panics on another final status or after
    /// `timeout`.
    pub async fn wait_for(&self, id: &str, want: &str, timeout: Duration) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let job = self.job(id).await;
            let status = job["status"].as_str().unwrap().to_owned();
            if status == want {
                return job;
            }
            if ["succeeded", "failed", "canceled", "awaiting_review"].contains(&status.as_str()) {
                panic!("job reached {status}, waiting for {want}: {job}");
            }
            if started.elapsed() > timeout {
                panic!("job still {status} after {timeout:?}, waiting for {want}: {job}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for (token, handle) in &self.workers {
            token.cancel();
            handle.abort();
        }
    }
}
