//! A running API on 127.0.0.1:0 with its own database and embedded S3 server, and helpers to
//! talk to it over real HTTP.

use std::{path::PathBuf, time::Duration};

use reqwest::{
    multipart::{Form, Part},
    Method, RequestBuilder, Response, StatusCode,
};
use serde_json::Value;
use sidbooth_api::{ApiConfig, AppState};
use sidbooth_core::{
    testing::{TestDb, TestStorage},
    Claimed, NewDescription, Queue, QueueSettings,
};
use sidbooth_domain::DescriptionCase;
use tokio::{sync::oneshot, task::JoinHandle};
use uuid::Uuid;

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub storage: TestStorage,
    pub key: String,
    pub tenant: Uuid,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    pub async fn start() -> Self {
        Self::with_config(ApiConfig::default()).await
    }

    pub async fn with_config(config: ApiConfig) -> Self {
        let db = TestDb::new().await;
        let storage = TestStorage::start().await;
        let state = AppState::new(db.pool.clone(), storage.store.clone(), config);
        Self::serve(db, storage, state).await
    }

    /// Serves `state`, which may point at other storage than `storage` (readiness tests).
    pub async fn serve(db: TestDb, storage: TestStorage, state: AppState) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(sidbooth_api::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        let issued = sidbooth_core::tenants::create_key(&db.pool, "tenant-a")
            .await
            .unwrap();
        Self {
            base,
            client: reqwest::Client::new(),
            db,
            storage,
            key: issued.secret,
            tenant: issued.tenant_id,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the server and waits for it to drain.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("the server drains")
                .unwrap()
                .unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request with this app's key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&self.key)
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    pub async fn other_tenant_key(&self) -> String {
        sidbooth_core::tenants::create_key(&self.db.pool, "tenant-b")
            .await
            .unwrap()
            .secret
    }

    /// POST /v1/jobs with a spec and images.
    pub async fn post_job(&self, spec: &Value, images: Vec<(String, Vec<u8>)>) -> Response {
        self.post_job_with(spec, images, None).await
    }

    pub async fn post_job_with(
        &self,
        spec: &Value,
        images: Vec<(String, Vec<u8>)>,
        idempotency_key: Option<&str>,
    ) -> Response {
        let mut request = self
            .request(Method::POST, "/v1/jobs")
            .multipart(form(spec.to_string(), images));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.unwrap()
    }

    /// Creates a job from `n` dog photos and returns its body.
    pub async fn create_job(&self, n: usize) -> Value {
        let response = self.post_job(&dog_spec(), dog_photos(n)).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.json().await.unwrap()
    }

    pub async fn job_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// A refused request left nothing behind.
    pub async fn assert_nothing_stored(&self) {
        assert_eq!(self.job_rows().await, 0, "no job rows");
        let images: i64 = sqlx::query_scalar("SELECT count(*) FROM job_images")
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
        assert_eq!(images, 0, "no image rows");
        assert_eq!(
            self.storage.all_keys().await,
            Vec::<String>::new(),
            "no objects"
        );
    }

    pub fn queue(&self) -> Queue {
        Queue::new(self.db.pool.clone(), QueueSettings::default())
    }

    /// Does what a worker does up to review: claims the job, writes one description per image
    /// and parks it awaiting review.
    pub async fn to_awaiting_review(&self, job_id: Uuid, texts: &[&str]) -> (Queue, Claimed) {
        let queue = self.queue();
        let claimed = queue.claim().await.unwrap().expect("a job to claim");
        assert_eq!(claimed.job.id, job_id);
        for (idx, text) in texts.iter().enumerate() {
            let description = NewDescription {
                idx: idx as i32,
                text: (*text).to_owned(),
                case: DescriptionCase::Sid,
                model: "test-model".into(),
                instruction: "describe".into(),
                instruction_version: "1".into(),
                problem: None,
            };
            queue
                .save_description(&claimed.lease, &description)
                .await
                .unwrap();
        }
        queue.await_review(&claimed.lease).await.unwrap();
        (queue, claimed)
    }
}

pub fn form(spec: String, images: Vec<(String, Vec<u8>)>) -> Form {
    let mut form = Form::new().part(
        "spec",
        Part::text(spec).mime_str("application/json").unwrap(),
    );
    for (name, bytes) in images {
        form = form.part("images", Part::bytes(bytes).file_name(name));
    }
    form
}

/// A multipart/form-data body built by hand, for requests streamed without a length.
pub fn multipart_body(boundary: &str, spec: &str, images: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"\r\n\
             Content-Type: application/json\r\n\r\n{spec}\r\n"
        )
        .as_bytes(),
    );
    for (name, bytes) in images {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; \
                 filename=\"{name}\"\r\nContent-Type: image/jpeg\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

pub fn dog_spec() -> Value {
    serde_json::json!({ "subject_class": "dog" })
}

/// ../shared beside the repository (the same place in CI).
pub fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

pub fn dog_photo(i: usize) -> Vec<u8> {
    let path = shared_dir().join(format!("datasets/dreambooth/dog6/{i:02}.jpg"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn dog_photos(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("{:02}.jpg", i % 5), dog_photo(i % 5)))
        .collect()
}

/// Asserts a problem response and returns its body.
pub async fn assert_problem(response: Response, status: StatusCode, slug: &str) -> Value {
    assert_eq!(response.status(), status, "status for {slug}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "content type for {slug}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["type"],
        format!("https://sidbooth.dev/problems/{slug}"),
        "problem: {body}"
    );
    assert_eq!(body["status"], status.as_u16());
    assert!(body["title"].is_string() && body["detail"].is_string());
    body
}

/// Reads Server-Sent Events from a streaming response.
pub struct SseReader {
    response: Response,
    buffer: String,
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseReader {
    pub fn new(response: Response) -> Self {
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped); None when the stream ended.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        tokio::time::timeout(timeout, async {
            loop {
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut event = SseEvent {
                        id: None,
                        event: None,
                        data: String::new(),
                    };
                    let mut has_field = false;
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            event.id = Some(v.trim().to_owned());
                            has_field = true;
                        } else if let Some(v) = line.strip_prefix("event:") {
                            event.event = Some(v.trim().to_owned());
                            has_field = true;
                        } else if let Some(v) = line.strip_prefix("data:") {
                            event.data.push_str(v.trim_start());
                            has_field = true;
                        }
                    }
                    if has_field {
                        return Some(event);
                    }
                }
                match self.response.chunk().await.unwrap() {
                    Some(chunk) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                    None => return None,
                }
            }
        })
        .await
        .expect("an SSE event or the end of the stream in time")
    }
}
