//! Delivers the webhook outbox: claims due deliveries, signs and posts them, and records every
//! try. Delivery is at least once: a dispatcher that dies after sending but before recording
//! leaves the claim to lapse, and the next one sends again under the same `webhook-id`, which
//! receivers use to drop duplicates.

use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{stream, StreamExt};
use rand::Rng;
use reqwest::{header, redirect, Url};
use sidbooth_core::{
    webhooks::{DueDelivery, NextStep, TryResult, WebhookStore},
    CoreError,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{config::WebhookSettings, sign};

/// Longest error text kept in the log of a try.
const MAX_ERROR_CHARS: usize = 500;

pub const DELIVERIES_TOTAL: &str = "sidbooth_webhook_deliveries_total";

#[derive(Clone)]
pub struct Dispatcher {
    store: WebhookStore,
    settings: WebhookSettings,
    client: reqwest::Client,
}

impl Dispatcher {
    pub fn new(pool: PgPool, settings: WebhookSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout())
            // A redirect could lead to an address the policy refuses; a 3xx counts as failed.
            .redirect(redirect::Policy::none())
            .dns_resolver(settings.policy().resolver())
            .user_agent(concat!("sidbooth-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            store: WebhookStore::new(pool),
            settings,
            client,
        })
    }

    /// Delivers until `shutdown`; the tries in flight then finish (each within the timeout).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = None;
        while !shutdown.is_cancelled() {
            let batch = self.settings.webhook_concurrency.max(1);
            match self.dispatch_due().await {
                // A full batch: more may be due at once.
                Ok(n) if n >= batch => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "webhook dispatch failed; retrying"),
            }
            if listener.is_none() {
                listener = self.store.listen().await.ok();
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.settings.poll()) => {}
                notified = async {
                    match listener.as_mut() {
                        Some(l) => l.recv().await.map(drop),
                        None => std::future::pending().await,
                    }
                } => {
                    if notified.is_err() {
                        listener = None;
                    }
                }
            }
        }
    }

    /// Claims what is due (one batch), sends it and records the results; the count sent.
    pub async fn dispatch_due(&self) -> Result<usize, CoreError> {
        let batch = self.settings.webhook_concurrency.max(1);
        // Held past the timeout, so a slow endpoint's delivery is not claimed twice.
        let hold = self.settings.timeout() + Duration::from_secs(30);
        let due = self.store.claim_due(batch as i64, hold).await?;
        let count = due.len();
        let results: Vec<Result<(), CoreError>> = stream::iter(due)
            .map(|d| async move {
                let result = self.attempt(&d).await;
                let outcome = match result.next {
                    NextStep::Delivered => "delivered",
                    NextStep::RetryAfter(_) => "retry",
                    NextStep::GiveUp => "failed",
                };
                metrics::counter!(DELIVERIES_TOTAL, "outcome" => outcome).increment(1);
                if result.next != NextStep::Delivered {
                    tracing::info!(
                        delivery = d.id,
                        message = %d.message_id,
                        attempt = d.attempt,
                        status = ?result.response_status,
                        error = ?result.error,
                        outcome,
                        "webhook not delivered"
                    );
                }
                self.store.record_attempt(&d, &result).await.map(drop)
            })
            .buffer_unordered(batch)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(count)
    }

    /// One try: sign, post, and decide what comes next.
    async fn attempt(&self, due: &DueDelivery) -> TryResult {
        let started = Instant::now();
        let (response_status, error) = match self.post(due).await {
            Ok(status) if (200..300).contains(&status) => (Some(status), None),
            Ok(status) => (
                Some(status),
                Some(format!("the endpoint answered {status}")),
            ),
            Err(e) => (None, Some(e)),
        };
        let next = if error.is_none() {
            NextStep::Delivered
        } else {
            self.after_failure(due)
        };
        TryResult {
            response_status,
            error,
            duration: started.elapsed(),
            next,
        }
    }

    async fn post(&self, due: &DueDelivery) -> Result<u16, String> {
        let url = Url::parse(&due.url).map_err(|e| format!("the URL is not valid: {e}"))?;
        self.settings
            .policy()
            .check_literal(&url)
            .map_err(|e| e.to_string())?;
        let body = due.body.as_ref().map_err(Clone::clone)?;
        let body = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let timestamp = Utc::now().timestamp();
        let signature = sign::signature(&due.secret, &due.message_id, timestamp, &body)
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &due.message_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        Ok(response.status().as_u16())
    }

    /// Retry with exponential backoff (and a little jitter, so endpoints that come back are not
    /// hit by every retry at once) while the retry window lasts.
    fn after_failure(&self, due: &DueDelivery) -> NextStep {
        let delay = self
            .settings
            .backoff(due.attempt)
            .mul_f64(rand::thread_rng().gen_range(1.0..1.1));
        let retry_at = Utc::now() + delay;
        let window = chrono::Duration::from_std(self.settings.retry_window())
            .unwrap_or(chrono::Duration::MAX);
        if retry_at > due.created_at + window {
            NextStep::GiveUp
        } else {
            NextStep::RetryAfter(delay)
        }
    }
}

/// An error with its causes (reqwest's own message alone says only "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.len() > MAX_ERROR_CHARS {
        let cut = (0..=MAX_ERROR_CHARS)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
    }
    text
}
