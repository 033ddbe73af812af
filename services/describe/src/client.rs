//! The VLM client: one chat-completions request per photo against any OpenAI-compatible
//! endpoint, with a concurrency limit, per-request timeouts, retries with backoff that honours
//! `Retry-After`, and validation of every answer with corrective follow-up requests.
//!
//! # Why async-openai's types but our own HTTP call
//! async-openai 0.28 retries 429 and 5xx inside `Client::execute_raw` with its own
//! `backoff::ExponentialBackoff`, always passing `retry_after: None`: the `Retry-After` header is
//! never read, the response headers and the HTTP status are dropped (a 5xx becomes an
//! `ApiError` carrying only the body), a 429 whose body is not an OpenAI error object becomes a
//! permanent `JSONDeserialize` error, and the number of attempts is not observable. We need all
//! of these (honour `Retry-After`, report rate limiting and server errors as such, count
//! attempts for metrics). So requests and responses use async-openai's typed
//! `CreateChatCompletionRequest` / `CreateChatCompletionResponse`, and the request is sent with
//! a plain `reqwest` call and a retry loop of our own.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::types::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestMessage, ChatCompletionRequestMessageContentPartImage,
    ChatCompletionRequestMessageContentPartText, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionRequestUserMessageContentPart,
    CreateChatCompletionRequest, CreateChatCompletionResponse, ImageUrl,
};
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use sidbooth_domain::{DescriptionCase, Mode, SubjectClass};
use tokio::sync::Semaphore;

use crate::photo::prepare_photo;
use crate::subject_box::{
    box_correction, box_instruction, parse_subject_box, BoxProblem, NormalizedBox,
};
use crate::validate::{validate_description, DescriptionProblem, DescriptionRules};

/// The model used when none is configured.
pub const DEFAULT_MODEL: &str = "gpt-4o";
/// OpenAI's own endpoint, used when only an API key is configured.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// An API key. `Debug` never shows it; [`ApiKey::expose`] does, for the request header only.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl FromStr for ApiKey {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

/// Client configuration. Build it with [`VlmConfig::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct VlmConfig {
    /// Base URL of the OpenAI-compatible API, including the version path, e.g.
    /// `https://api.openai.com/v1` or `http://localhost:11434/v1`. Requests go to
    /// `{base_url}/chat/completions`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<ApiKey>,
    /// Default [`DEFAULT_MODEL`].
    pub model: String,
    /// Longest side, in pixels, of the copy of each photo sent to the model. Default 512.
    pub image_max_px: u32,
    /// Requests in flight at once, across all calls on one client. Default 4.
    pub concurrency: usize,
    /// Limit for one HTTP request, connect to last byte. Default 60 s.
    pub request_timeout: Duration,
    /// Retries of one request after a 429, 408, 5xx, timeout, connection error or malformed
    /// response (so at most `max_retries + 1` attempts). Default 3.
    pub max_retries: u32,
    /// First backoff delay; doubled after each failed attempt. Default 1 s.
    pub initial_backoff: Duration,
    /// Upper bound of the computed backoff. Default 30 s.
    pub max_backoff: Duration,
    /// Upper bound on a server's `Retry-After`. Default 120 s.
    pub max_retry_after: Duration,
    /// Follow-up requests asking for a corrected description after one fails validation.
    /// Default 2.
    pub max_corrections: u32,
}

impl VlmConfig {
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            model: DEFAULT_MODEL.to_owned(),
            image_max_px: 512,
            concurrency: 4,
            request_timeout: Duration::from_secs(60),
            max_retries: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
            max_corrections: 2,
        }
    }

    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(ApiKey::new(key));
        self
    }

    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }

    /// The delay before retry number `retry` (1-based) when the server gave no `Retry-After`:
    /// `initial_backoff * 2^(retry-1)`, capped at `max_backoff`, plus up to 20 % jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let jitter = RandomState::new().build_hasher().finish() % 1000;
        base + base.mul_f64(0.2 * jitter as f64 / 1000.0)
    }
}

/// Flags and environment variables for the VLM client, to `#[command(flatten)]` into a binary's
/// arguments.
#[cfg(feature = "clap")]
#[derive(Debug, Clone, clap::Args)]
pub struct VlmArgs {
    /// Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1. Without it and
    /// without an API key, no VLM is configured.
    #[arg(long = "vlm-base-url", env = "SIDBOOTH_VLM_BASE_URL")]
    pub vlm_base_url: Option<String>,
    /// API key for the VLM endpoint (sent as a bearer token).
    #[arg(
        long = "vlm-api-key",
        env = "SIDBOOTH_VLM_API_KEY",
        hide_env_values = true
    )]
    pub vlm_api_key: Option<ApiKey>,
    /// Model name.
    #[arg(long = "vlm-model", env = "SIDBOOTH_VLM_MODEL", default_value = DEFAULT_MODEL)]
    pub vlm_model: String,
    /// Longest side in pixels of the photos sent to the model.
    #[arg(
        long = "vlm-image-max-px",
        env = "SIDBOOTH_VLM_IMAGE_MAX_PX",
        default_value_t = 512
    )]
    pub vlm_image_max_px: u32,
    /// Requests to the model in flight at once.
    #[arg(
        long = "vlm-concurrency",
        env = "SIDBOOTH_VLM_CONCURRENCY",
        default_value_t = 4
    )]
    pub vlm_concurrency: usize,
    /// Timeout of one request, in seconds.
    #[arg(
        long = "vlm-timeout-secs",
        env = "SIDBOOTH_VLM_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub vlm_timeout_secs: u64,
    /// Retries of one request after 429, 5xx, timeouts and connection errors.
    #[arg(
        long = "vlm-max-retries",
        env = "SIDBOOTH_VLM_MAX_RETRIES",
        default_value_t = 3
    )]
    pub vlm_max_retries: u32,
}

#[cfg(feature = "clap")]
impl VlmArgs {
    /// The configuration, or `None` when neither a base URL nor an API key is given.
    pub fn config(&self) -> Option<VlmConfig> {
        if self.vlm_base_url.is_none() && self.vlm_api_key.is_none() {
            return None;
        }
        let mut c = VlmConfig::new(
            self.vlm_base_url
                .clone()
                .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned()),
        );
        c.api_key = self.vlm_api_key.clone();
        c.model = self.vlm_model.clone();
        c.image_max_px = self.vlm_image_max_px;
        c.concurrency = self.vlm_concurrency;
        c.request_timeout = Duration::from_secs(self.vlm_timeout_secs);
        c.max_retries = self.vlm_max_retries;
        Some(c)
    }
}

/// A failure to get any answer from the model. Messages never contain the API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VlmError {
    #[error("the VLM did not answer within {timeout:?} ({attempts} attempts)")]
    Timeout { timeout: Duration, attempts: u32 },
    #[error("the VLM kept answering 429 Too Many Requests ({attempts} attempts)")]
    RateLimited { attempts: u32 },
    #[error("the VLM answered HTTP {status} ({attempts} attempts): {message}")]
    Server {
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("the VLM endpoint could not be reached ({attempts} attempts): {message}")]
    Connection { attempts: u32, message: String },
    /// A 4xx other than 408/429 (wrong key, unknown model, request refused); not retried.
    #[error("the VLM refused the request with HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error(
        "the VLM sent a response that is not a chat completion ({attempts} attempts): {message}"
    )]
    BadResponse { attempts: u32, message: String },
    #[error("{0}")]
    Photo(#[from] crate::photo::PhotoError),
    #[error("invalid VLM configuration: {0}")]
    Config(String),
}

impl VlmError {
    /// Whether trying again later may succeed (the worker's job-level retry).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            VlmError::Timeout { .. }
                | VlmError::RateLimited { .. }
                | VlmError::Server { .. }
                | VlmError::Connection { .. }
                | VlmError::BadResponse { .. }
        )
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            VlmError::Timeout { .. } => "vlm_timeout",
            VlmError::RateLimited { .. } => "vlm_rate_limited",
            VlmError::Server { .. } => "vlm_server_error",
            VlmError::Connection { .. } => "vlm_connection",
            VlmError::Rejected { .. } => "vlm_rejected",
            VlmError::BadResponse { .. } => "vlm_bad_response",
            VlmError::Photo(_) => "vlm_photo",
            VlmError::Config(_) => "vlm_config",
        }
    }
}

/// What became of one photo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A description that passed validation.
    Described {
        text: String,
        /// The configured model; empty for `class_only`, which asks no model.
        model: String,
        /// The instruction text sent.
        instruction: String,
        instruction_version: &'static str,
        /// Answers received from the model (1 + corrections); 0 for `class_only`.
        attempts: u32,
    },
    /// Every answer failed validation; the worker sends this to review or fails the job.
    Problem {
        /// The last answer, as received; `None` if it was empty.
        last_text: Option<String>,
        problem: DescriptionProblem,
        attempts: u32,
    },
}

impl Outcome {
    pub fn text(&self) -> Option<&str> {
        match self {
            Outcome::Described { text, .. } => Some(text),
            Outcome::Problem { .. } => None,
        }
    }
}

/// What the model said about where the subject is.
#[derive(Debug, Clone, PartialEq)]
pub enum BoxOutcome {
    Found(NormalizedBox),
    /// The model sees no subject of this class in the photo.
    NotFound,
    /// Every answer failed to parse; the last one and why.
    Problem {
        problem: BoxProblem,
        last_text: String,
    },
}

/// One finished photo, as reported to the `on_progress` callback of
/// [`VlmClient::describe_all`].
#[derive(Debug)]
pub struct Progress<'a> {
    /// Index of the photo in the input.
    pub index: usize,
    /// Photos finished so far, this one included.
    pub done: usize,
    pub total: usize,
    pub result: &'a Result<Outcome, VlmError>,
}

/// The key under which a description is cached: the same photo, case, mode, model and
/// instruction version give the same description. The description embeds the identifier token
/// and class; they are not part of the key, so re-validate a cached text with
/// [`validate_description`] before using it (a different token or class fails validation).
pub fn cache_key(
    image_sha256_hex: &str,
    case: DescriptionCase,
    mode: Mode,
    model: &str,
    instruction_version: &str,
) -> String {
    format!(
        "sid/1/{}/{}/{}/{}/{}",
        image_sha256_hex.to_ascii_lowercase(),
        case.as_str(),
        mode.as_str(),
        instruction_version,
        model
    )
}

/// The client. Cheap to share behind an `Arc`; the concurrency limit applies to all calls.
#[derive(Debug, Clone)]
pub struct VlmClient {
    config: Arc<VlmConfig>,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
}

/// Why one HTTP attempt failed.
#[derive(Debug)]
enum Failure {
    Timeout,
    Connection(String),
    RateLimited,
    Server(u16, String),
    Rejected(u16, String),
    BadResponse(String),
}

impl Failure {
    fn retryable(&self) -> bool {
        !matches!(self, Failure::Rejected(..))
    }

    fn metric_label(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Connection(_) => "connection",
            Failure::RateLimited => "rate_limited",
            Failure::Server(..) => "server_error",
            Failure::Rejected(..) => "rejected",
            Failure::BadResponse(_) => "bad_response",
        }
    }

    fn into_error(self, attempts: u32, timeout: Duration) -> VlmError {
        match self {
            Failure::Timeout => VlmError::Timeout { timeout, attempts },
            Failure::Connection(message) => VlmError::Connection { attempts, message },
            Failure::RateLimited => VlmError::RateLimited { attempts },
            Failure::Server(status, message) => VlmError::Server {
                status,
                attempts,
                message,
            },
            Failure::Rejected(status, message) => VlmError::Rejected { status, message },
            Failure::BadResponse(message) => VlmError::BadResponse { attempts, message },
        }
    }
}

impl VlmClient {
    pub fn new(config: VlmConfig) -> Result<Self, VlmError> {
        let url = reqwest::Url::parse(&config.endpoint())
            .map_err(|e| VlmError::Config(format!("base_url {:?}: {e}", config.base_url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(VlmError::Config(format!(
                "base_url {:?} must be http or https",
                config.base_url
            )));
        }
        if config.concurrency == 0 {
            return Err(VlmError::Config("concurrency must be at least 1".into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| VlmError::Config(e.to_string()))?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(config.concurrency)),
            config: Arc::new(config),
            http,
        })
    }

    pub fn config(&self) -> &VlmConfig {
        &self.config
    }

    /// Describes one photo: prepares it, asks the model, validates the answer and, while it
    /// fails, asks again with the problem stated (up to `max_corrections` times).
    ///
    /// `Ok(Outcome::Problem)` when every answer failed validation; `Err` when no answer came
    /// (after retries) or the photo cannot be read. `class_only` sends no request.
    #[tracing::instrument(
        name = "vlm.describe",
        skip_all,
        fields(case = rules.case.as_str(), mode = rules.mode.as_str(), model = %self.config.model)
    )]
    pub async fn describe_one(
        &self,
        image: &[u8],
        rules: &DescriptionRules,
    ) -> Result<Outcome, VlmError> {
        let instruction = rules.instruction();
        if let Some(text) = rules.fixed_description() {
            return Ok(Outcome::Described {
                text,
                model: String::new(),
                instruction: instruction.text,
                instruction_version: instruction.version,
                attempts: 0,
            });
        }

        let max_px = self.config.image_max_px;
        let bytes = image.to_vec();
        let photo = tokio::task::spawn_blocking(move || prepare_photo(&bytes, max_px))
            .await
            .map_err(|e| VlmError::Photo(crate::photo::PhotoError(e.to_string())))??;

        let mut messages = vec![photo_message(&instruction.text, photo.data_url)];

        let mut attempts = 0;
        loop {
            let request = CreateChatCompletionRequest {
                model: self.config.model.clone(),
                messages: messages.clone(),
                ..Default::default()
            };
            let reply = self.complete(&request).await?;
            attempts += 1;
            match validate_description(&reply, rules) {
                Ok(text) => {
                    tracing::debug!(attempts, "description accepted");
                    return Ok(Outcome::Described {
                        text,
                        model: self.config.model.clone(),
                        instruction: instruction.text,
                        instruction_version: instruction.version,
                        attempts,
                    });
                }
                Err(problem) => {
                    tracing::info!(code = problem.code(), attempts, "description refused");
                    metrics::counter!("sidbooth_vlm_descriptions_refused_total", "code" => problem.code())
                        .increment(1);
                    if attempts > self.config.max_corrections {
                        return Ok(Outcome::Problem {
                            last_text: (!reply.trim().is_empty()).then_some(reply),
                            problem,
                            attempts,
                        });
                    }
                    messages.push(ChatCompletionRequestMessage::Assistant(
                        ChatCompletionRequestAssistantMessage {
                            content: Some(ChatCompletionRequestAssistantMessageContent::Text(
                                reply,
                            )),
                            ..Default::default()
                        },
                    ));
                    messages.push(ChatCompletionRequestMessage::User(
                        ChatCompletionRequestUserMessage {
                            content: ChatCompletionRequestUserMessageContent::Text(correction(
                                &problem, rules,
                            )),
                            name: None,
                        },
                    ));
                }
            }
        }
    }

    /// Asks for the bounding box of the subject (see [`crate::subject_box`]), asking again with
    /// the problem stated while an answer fails to parse (up to `max_corrections` times).
    #[tracing::instrument(name = "vlm.subject_box", skip_all, fields(model = %self.config.model))]
    pub async fn subject_box(
        &self,
        image: &[u8],
        class: &SubjectClass,
    ) -> Result<BoxOutcome, VlmError> {
        let max_px = self.config.image_max_px;
        let bytes = image.to_vec();
        let photo = tokio::task::spawn_blocking(move || prepare_photo(&bytes, max_px))
            .await
            .map_err(|e| VlmError::Photo(crate::photo::PhotoError(e.to_string())))??;
        let mut messages = vec![photo_message(&box_instruction(class), photo.data_url)];
        let mut attempts = 0;
        loop {
            let request = CreateChatCompletionRequest {
                model: self.config.model.clone(),
                messages: messages.clone(),
                ..Default::default()
            };
            let reply = self.complete(&request).await?;
            attempts += 1;
            let problem = match parse_subject_box(&reply) {
                Ok(Some(found)) => return Ok(BoxOutcome::Found(found)),
                Ok(None) => return Ok(BoxOutcome::NotFound),
                Err(problem) => problem,
            };
            tracing::info!(code = problem.code(), attempts, "subject box refused");
            if attempts > self.config.max_corrections {
                return Ok(BoxOutcome::Problem {
                    problem,
                    last_text: reply,
                });
            }
            messages.push(ChatCompletionRequestMessage::Assistant(
                ChatCompletionRequestAssistantMessage {
                    content: Some(ChatCompletionRequestAssistantMessageContent::Text(reply)),
                    ..Default::default()
                },
            ));
            messages.push(ChatCompletionRequestMessage::User(
                ChatCompletionRequestUserMessage {
                    content: ChatCompletionRequestUserMessageContent::Text(box_correction(
                        &problem,
                    )),
                    name: None,
                },
            ));
        }
    }

    /// Describes all photos concurrently (under the client's concurrency limit) and yields each
    /// as soon as it is finished, with its index in `images`. Dropping the stream cancels the
    /// requests still running.
    pub fn describe_stream<'a, I>(
        &'a self,
        images: &'a [I],
        rules: &'a DescriptionRules,
    ) -> impl Stream<Item = (usize, Result<Outcome, VlmError>)> + Send + 'a
    where
        I: AsRef<[u8]> + Sync,
    {
        images
            .iter()
            .enumerate()
            .map(|(index, image)| async move {
                (index, self.describe_one(image.as_ref(), rules).await)
            })
            .collect::<FuturesUnordered<_>>()
    }

    /// Describes all photos concurrently, calls `on_progress` for each as soon as it is
    /// finished, and returns the results in input order.
    pub async fn describe_all<I, F>(
        &self,
        images: &[I],
        rules: &DescriptionRules,
        mut on_progress: F,
    ) -> Vec<Result<Outcome, VlmError>>
    where
        I: AsRef<[u8]> + Sync,
        F: FnMut(Progress<'_>),
    {
        let total = images.len();
        let mut results: Vec<Option<Result<Outcome, VlmError>>> = vec![None; total];
        let mut stream = std::pin::pin!(self.describe_stream(images, rules));
        let mut done = 0;
        while let Some((index, result)) = stream.next().await {
            done += 1;
            on_progress(Progress {
                index,
                done,
                total,
                result: &result,
            });
            results[index] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.expect("every photo yields exactly one result"))
            .collect()
    }

    /// Sends one chat completion with retries; returns the reply text.
    async fn complete(&self, request: &CreateChatCompletionRequest) -> Result<String, VlmError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| VlmError::Config(format!("request cannot be encoded: {e}")))?;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| VlmError::Config("client closed".into()))?;
                self.send_once(&body).await
            };
            let outcome = match &result {
                Ok(_) => "ok",
                Err((failure, _)) => failure.metric_label(),
            };
            metrics::histogram!("sidbooth_vlm_request_duration_seconds", "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("sidbooth_vlm_requests_total", "outcome" => outcome).increment(1);

            let (failure, retry_after) = match result {
                Ok(text) => return Ok(text),
                Err(e) => e,
            };
            if !failure.retryable() || attempt > self.config.max_retries {
                return Err(failure.into_error(attempt, self.config.request_timeout));
            }
            let delay = retry_after
                .map(|d| d.min(self.config.max_retry_after))
                .unwrap_or_else(|| self.config.backoff(attempt));
            tracing::warn!(
                attempt,
                failure = failure.metric_label(),
                delay_ms = delay.as_millis() as u64,
                "VLM request failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn send_once(&self, body: &[u8]) -> Result<String, (Failure, Option<Duration>)> {
        let mut req = self
            .http
            .post(self.config.endpoint())
            .timeout(self.config.request_timeout)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(key) = &self.config.api_key {
            req = req.header(AUTHORIZATION, format!("Bearer {}", key.expose()));
        }
        let response = req
            .send()
            .await
            .map_err(|e| (self.transport_failure(&e), None))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| (self.transport_failure(&e), retry_after))?;

        if status.as_u16() == 429 {
            return Err((Failure::RateLimited, retry_after));
        }
        if status.is_server_error() || status.as_u16() == 408 {
            return Err((
                Failure::Server(status.as_u16(), self.excerpt(&bytes)),
                retry_after,
            ));
        }
        if !status.is_success() {
            return Err((
                Failure::Rejected(status.as_u16(), self.excerpt(&bytes)),
                None,
            ));
        }
        reply_text(&bytes).map_err(|m| (Failure::BadResponse(self.redact(&m)), None))
    }

    fn transport_failure(&self, e: &reqwest::Error) -> Failure {
        if e.is_timeout() {
            Failure::Timeout
        } else {
            // reqwest's message names the URL, never headers; redact anyway.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            Failure::Connection(self.redact(&msg))
        }
    }

    /// A short, key-free excerpt of an error body: the OpenAI error message if there is one.
    fn excerpt(&self, bytes: &[u8]) -> String {
        let text = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
        let mut text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.chars().count() > 300 {
            text = text.chars().take(300).collect::<String>() + "…";
        }
        self.redact(&text)
    }

    fn redact(&self, text: &str) -> String {
        match &self.config.api_key {
            Some(key) if !key.expose().is_empty() => text.replace(key.expose(), "<redacted>"),
            _ => text.to_owned(),
        }
    }
}

/// The text of the first choice. Parsed as async-openai's `CreateChatCompletionResponse`; some
/// OpenAI-compatible servers leave out fields that type requires (`id`, `created`, `object`,
/// `role`), so a response that only has `choices[0].message.content` is accepted too.
fn reply_text(bytes: &[u8]) -> Result<String, String> {
    match serde_json::from_slice::<CreateChatCompletionResponse>(bytes) {
        Ok(response) => {
            let choice = response
                .choices
                .into_iter()
                .next()
                .ok_or_else(|| "no choices".to_owned())?;
            Ok(choice.message.content.unwrap_or_default())
        }
        Err(typed) => {
            let value: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
            match &value["choices"][0]["message"]["content"] {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Null if value["choices"][0]["message"].is_object() => {
                    Ok(String::new())
                }
                _ => Err(format!("not a chat completion: {typed}")),
            }
        }
    }
}

/// `Retry-After` in seconds (integer or decimal), or `retry-after-ms` as some OpenAI-compatible
/// services send. HTTP dates are not supported and are ignored (backoff applies).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    get("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| get("retry-after").map(Duration::from_secs_f64))
}

/// The first message of a conversation: the instruction and the photo.
fn photo_message(text: &str, data_url: String) -> ChatCompletionRequestMessage {
    ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
        content: ChatCompletionRequestUserMessageContent::Array(vec![
            ChatCompletionRequestUserMessageContentPart::Text(
                ChatCompletionRequestMessageContentPartText {
                    text: text.to_owned(),
                },
            ),
            ChatCompletionRequestUserMessageContentPart::ImageUrl(
                ChatCompletionRequestMessageContentPartImage {
                    image_url: ImageUrl {
                        url: data_url,
                        detail: None,
                    },
                },
            ),
        ]),
        name: None,
    })
}

/// The follow-up message after a refused answer.
fn correction(problem: &DescriptionProblem, rules: &DescriptionRules) -> String {
    format!(
        "That description cannot be used: {problem}. Write it again following every rule of \
         the first message. Start with exactly \"{prefix}\" and reply with the description \
         only.",
        prefix = rules.prefix()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn debug_never_shows_the_key() {
        let c = VlmConfig::new("http://localhost/v1").with_api_key("sk-secret-123");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-secret-123"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn defaults() {
        let c = VlmConfig::new("http://localhost/v1/");
        assert_eq!(c.model, "gpt-4o");
        assert_eq!(c.image_max_px, 512);
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.endpoint(), "http://localhost/v1/chat/completions");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut c = VlmConfig::new("http://x/v1");
        c.initial_backoff = Duration::from_millis(100);
        c.max_backoff = Duration::from_millis(1000);
        let within = |d: Duration, base: u64| {
            d >= Duration::from_millis(base) && d <= Duration::from_millis(base * 12 / 10)
        };
        assert!(within(c.backoff(1), 100));
        assert!(within(c.backoff(2), 200));
        assert!(within(c.backoff(3), 400));
        assert!(within(c.backoff(10), 1000));
        assert!(within(c.backoff(40), 1000));
    }

    #[test]
    fn retry_after_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
    }

    #[test]
    fn cache_key_separates_every_part() {
        let k = |sha: &str, case, mode, model: &str, v: &str| cache_key(sha, case, mode, model, v);
        let base = k("ab", DescriptionCase::Sid, Mode::Object, "gpt-4o", "1");
        assert_eq!(base, "sid/1/ab/sid/object/1/gpt-4o");
        assert_eq!(
            k("AB", DescriptionCase::Sid, Mode::Object, "gpt-4o", "1"),
            base
        );
        for other in [
            k("ac", DescriptionCase::Sid, Mode::Object, "gpt-4o", "1"),
            k("ab", DescriptionCase::Full, Mode::Object, "gpt-4o", "1"),
            k("ab", DescriptionCase::Sid, Mode::Style, "gpt-4o", "1"),
            k("ab", DescriptionCase::Sid, Mode::Object, "llava:13b", "1"),
            k("ab", DescriptionCase::Sid, Mode::Object, "gpt-4o", "2"),
        ] {
            assert_ne!(other, base);
        }
    }

    #[test]
    fn reply_text_accepts_typed_and_lenient_responses() {
        let full = br#"{"id":"x","object":"chat.completion","created":1,"model":"m",
            "choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
        assert_eq!(reply_text(full).unwrap(), "hi");
        let lean = br#"{"choices":[{"message":{"content":"hello"}}]}"#;
        assert_eq!(reply_text(lean).unwrap(), "hello");
        assert!(reply_text(b"{not json").is_err());
        assert!(reply_text(br#"{"choices":[]}"#).is_err());
        assert!(reply_text(br#"{"error":{"message":"x"}}"#).is_err());
    }
}
