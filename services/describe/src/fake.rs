//! A local OpenAI-compatible chat-completions server for tests (feature `fake-vlm`).
//!
//! It binds 127.0.0.1 on a free port, records every request it receives (headers, model,
//! instruction, every text, and each `image_url` data URL decoded: bytes, SHA-256, size) and
//! answers from a queue of scripted [`Behaviour`]s; when the queue is empty it answers with a
//! valid description built from the prefix quoted in the instruction, e.g.
//! "a photo of sks dog sitting in front of an orange wall, with a grey wooden floor beneath."
//!
//! ```no_run
//! # async fn demo() {
//! use sidbooth_describe::fake::{Behaviour, FakeVlm};
//! let fake = FakeVlm::start().await;
//! fake.push(Behaviour::RateLimited { retry_after_secs: Some(1) });
//! let config = sidbooth_describe::VlmConfig::new(fake.base_url()).with_api_key("test-key");
//! // ... run the code under test, then:
//! assert_eq!(fake.requests().len(), 2);
//! # }
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;

use crate::subject_box::BOX_INSTRUCTION_START;

/// What the server does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// 200 with this text as the assistant's message.
    Reply(String),
    /// 200 with `content: null`.
    EmptyContent,
    /// 429 with an OpenAI-style error body and, if given, `Retry-After: <secs>`.
    RateLimited { retry_after_secs: Option<u64> },
    /// This status with an OpenAI-style error body.
    Status(u16),
    /// 200 with a body that is not JSON.
    MalformedJson,
    /// Waits, then behaves as the inner behaviour.
    Delay(Duration, Box<Behaviour>),
    /// The default responder (a valid description built from the instruction).
    Default,
}

impl Behaviour {
    pub fn reply(text: impl Into<String>) -> Self {
        Behaviour::Reply(text.into())
    }

    pub fn server_error() -> Self {
        Behaviour::Status(500)
    }

    pub fn delayed(delay: Duration, then: Behaviour) -> Self {
        Behaviour::Delay(delay, Box::new(then))
    }
}

/// One image found in a request's `image_url` content parts.
#[derive(Debug, Clone)]
pub struct RecordedImage {
    /// The media type of the data URL, e.g. `image/jpeg`.
    pub mime: String,
    /// The decoded bytes of the data URL.
    pub bytes: Vec<u8>,
    /// Lower-case hex SHA-256 of `bytes`.
    pub sha256: String,
    /// Width and height when the bytes decode as an image.
    pub dimensions: Option<(u32, u32)>,
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub model: String,
    /// The text parts of the first user message.
    pub instruction: String,
    /// The text of every message in order (user texts, earlier assistant answers, follow-ups).
    pub texts: Vec<String>,
    /// Images of all messages, in order.
    pub images: Vec<RecordedImage>,
    /// Number of messages in the conversation.
    pub message_count: usize,
    /// Whether the body parsed as async-openai's `CreateChatCompletionRequest`.
    pub typed_ok: bool,
    pub body: serde_json::Value,
    pub received_at: Instant,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn authorization(&self) -> Option<&str> {
        self.header("authorization")
    }
}

#[derive(Default)]
struct Shared {
    queue: Mutex<VecDeque<Behaviour>>,
    /// Scripted answers to subject-box requests, kept apart so that tests scripting
    /// descriptions are not disturbed by the box requests of the same job.
    box_queue: Mutex<VecDeque<Behaviour>>,
    requests: Mutex<Vec<RecordedRequest>>,
    base_delay: Mutex<Duration>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The running server; stops when dropped.
pub struct FakeVlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeVlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeVlm").field("addr", &self.addr).finish()
    }
}

impl FakeVlm {
    /// Starts the server on 127.0.0.1 and a free port.
    pub async fn start() -> FakeVlm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/chat/completions", post(handle))
            .layer(DefaultBodyLimit::max(256 << 20))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeVlm { addr, shared, task }
    }

    /// `http://127.0.0.1:<port>/v1`, to use as the client's base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a behaviour for the next request that finds the queue non-empty.
    pub fn push(&self, behaviour: Behaviour) {
        self.shared.queue.lock().unwrap().push_back(behaviour);
    }

    /// Queues the behaviour for the next subject-box request (see [`DEFAULT_BOX_REPLY`] for
    /// what an empty box queue answers).
    pub fn push_box(&self, behaviour: Behaviour) {
        self.shared.box_queue.lock().unwrap().push_back(behaviour);
    }

    /// Queues several behaviours.
    pub fn push_all(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.shared.queue.lock().unwrap().extend(behaviours);
    }

    /// Behaviours queued and not used yet.
    pub fn pending(&self) -> usize {
        self.shared.queue.lock().unwrap().len()
    }

    /// A delay applied to every request before its behaviour (e.g. to measure concurrency).
    pub fn set_base_delay(&self, delay: Duration) {
        *self.shared.base_delay.lock().unwrap() = delay;
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The most requests that were being handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for FakeVlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The default answer to a subject-box request: the middle of the photo, as a subject usually
/// is.
pub const DEFAULT_BOX_REPLY: &str = r#"{"box": [0.2, 0.15, 0.8, 0.95]}"#;

/// The description the default responder writes for an instruction: the prefix quoted in it,
/// then a short description of a made-up background. `None` when the instruction quotes no
/// prefix.
pub fn default_reply(instruction: &str) -> Option<String> {
    let prefix = ["\"a photo of ", "\"a painting in the style of "]
        .iter()
        .filter_map(|start| {
            let at = instruction.find(start)? + 1;
            let len = instruction[at..].find('"')?;
            Some(&instruction[at..at + len])
        })
        .next()?;
    if instruction.starts_with("Reply with exactly these words") {
        return Some(prefix.to_owned());
    }
    Some(if prefix.starts_with("a photo of ") {
        format!("{prefix} sitting in front of an orange wall, with a grey wooden floor beneath.")
    } else {
        format!("{prefix} showing a harbour with three fishing boats under a cloudy sky.")
    })
}

struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&shared);
    let recorded = record(&uri, &headers, &body);
    let instruction = recorded.instruction.clone();
    let typed_ok = recorded.typed_ok;
    shared.requests.lock().unwrap().push(recorded);

    let base_delay = *shared.base_delay.lock().unwrap();
    if !base_delay.is_zero() {
        tokio::time::sleep(base_delay).await;
    }
    if !typed_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "request is not a chat completion request",
        );
    }
    let is_box = instruction.starts_with(BOX_INSTRUCTION_START);
    let queue = if is_box {
        &shared.box_queue
    } else {
        &shared.queue
    };
    let mut behaviour = queue
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Behaviour::Default);
    loop {
        match behaviour {
            Behaviour::Delay(delay, then) => {
                tokio::time::sleep(delay).await;
                behaviour = *then;
            }
            Behaviour::Default if is_box => return completion(Some(DEFAULT_BOX_REPLY)),
            Behaviour::Default => {
                let text = default_reply(&instruction)
                    .unwrap_or_else(|| "I cannot tell what to describe.".to_owned());
                return completion(Some(&text));
            }
            Behaviour::Reply(text) => return completion(Some(&text)),
            Behaviour::EmptyContent => return completion(None),
            Behaviour::RateLimited { retry_after_secs } => {
                let mut response = error(StatusCode::TOO_MANY_REQUESTS, "Rate limit reached");
                if let Some(secs) = retry_after_secs {
                    response
                        .headers_mut()
                        .insert("retry-after", secs.to_string().parse().unwrap());
                }
                return response;
            }
            Behaviour::Status(code) => {
                let status =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return error(status, "scripted failure");
            }
            Behaviour::MalformedJson => {
                return (
                    StatusCode::OK,
                    [("content-type", "application/json")],
                    "{\"choices\": [ this is not json",
                )
                    .into_response()
            }
        }
    }
}

fn completion(text: Option<&str>) -> Response {
    let body = serde_json::json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000u32,
        "model": "fake-vlm",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({
        "error": {"message": message, "type": "fake_error", "param": null, "code": null}
    });
    (status, axum::Json(body)).into_response()
}

fn record(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> RecordedRequest {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let typed_ok =
        serde_json::from_slice::<async_openai::types::CreateChatCompletionRequest>(body).is_ok();
    let mut texts = Vec::new();
    let mut images = Vec::new();
    let mut instruction = None;
    let messages = value["messages"].as_array().cloned().unwrap_or_default();
    for message in &messages {
        let mut message_texts = Vec::new();
        match &message["content"] {
            serde_json::Value::String(s) => message_texts.push(s.clone()),
            serde_json::Value::Array(parts) => {
                for part in parts {
                    match part["type"].as_str() {
                        Some("text") => {
                            message_texts.push(part["text"].as_str().unwrap_or_default().into())
                        }
                        Some("image_url") => {
                            if let Some(url) = part["image_url"]["url"].as_str() {
                                images.extend(decode_data_url(url));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if instruction.is_none() && message["role"] == "user" {
            instruction = Some(message_texts.join("\n"));
        }
        texts.extend(message_texts);
    }
    RecordedRequest {
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        model: value["model"].as_str().unwrap_or_default().to_owned(),
        instruction: instruction.unwrap_or_default(),
        texts,
        images,
        message_count: messages.len(),
        typed_ok,
        body: value,
        received_at: Instant::now(),
    }
}

fn decode_data_url(url: &str) -> Option<RecordedImage> {
    let rest = url.strip_prefix("data:")?;
    let (mime, data) = rest.split_once(";base64,")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()?;
    let dimensions = image::load_from_memory(&bytes)
        .ok()
        .map(|img| (img.width(), img.height()));
    Some(RecordedImage {
        mime: mime.to_owned(),
        sha256: crate::photo::sha256_hex(&bytes),
        bytes,
        dimensions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_reply_uses_the_quoted_prefix() {
        let i = "Begin the caption with exactly these words: \"a photo of ohwx cat\". Then ...";
        assert_eq!(
            default_reply(i).unwrap(),
            "a photo of ohwx cat sitting in front of an orange wall, with a grey wooden floor beneath."
        );
        let s = "Begin with exactly these words: \"a painting in the style of sks art\".";
        assert!(default_reply(s)
            .unwrap()
            .starts_with("a painting in the style of sks art showing"));
        assert_eq!(default_reply("describe the photo"), None);
    }
}
