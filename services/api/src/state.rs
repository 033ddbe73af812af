//! What every handler shares: the job store, the artifact store, the configuration, the event
//! fan-out and the shutdown signal.

use std::sync::Arc;

use sidbooth_core::{quotas::QuotaStore, webhooks::WebhookStore, ArtifactStore, JobStore};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    config::ApiConfig,
    events::EventHub,
    events_url::EventsUrlSigner,
    key_cache::KeyCache,
    rate_limit::{Buckets, Rate},
    upload::UploadLimits,
};

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    jobs: JobStore,
    webhooks: WebhookStore,
    storage: ArtifactStore,
    config: ApiConfig,
    events: EventHub,
    keys: KeyCache,
    events_urls: EventsUrlSigner,
    /// Failed authentications per client address.
    auth_failures: Option<(Buckets<std::net::IpAddr>, Rate)>,
    /// Job submissions per tenant (each tenant's rate may differ).
    job_posts: Buckets<uuid::Uuid>,
    quotas: QuotaStore,
    shutdown: CancellationToken,
}

impl AppState {
    pub fn new(pool: PgPool, storage: ArtifactStore, config: ApiConfig) -> Self {
        let shutdown = CancellationToken::new();
        Self {
            inner: Arc::new(Inner {
                jobs: JobStore::new(pool.clone()),
                webhooks: WebhookStore::new(pool.clone()),
                events: EventHub::new(pool.clone(), shutdown.clone()),
                keys: KeyCache::new(config.auth_cache()),
                events_urls: EventsUrlSigner::new(
                    config.events_url_key.as_ref(),
                    config.events_url_ttl(),
                ),
                auth_failures: Rate::per_minute(config.auth_failures_per_minute)
                    .map(|rate| (Buckets::new(), rate)),
                job_posts: Buckets::new(),
                quotas: QuotaStore::new(pool.clone()),
                pool,
                storage,
                config,
                shutdown,
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn jobs(&self) -> &JobStore {
        &self.inner.jobs
    }

    pub fn webhooks(&self) -> &WebhookStore {
        &self.inner.webhooks
    }

    pub fn storage(&self) -> &ArtifactStore {
        &self.inner.storage
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub fn upload_limits(&self) -> UploadLimits {
        let config = &self.inner.config;
        UploadLimits {
            max_file_bytes: config.max_file_bytes,
            max_request_bytes: config.max_request_bytes,
            max_pixels: config.max_pixels(),
        }
    }

    pub(crate) fn key_cache(&self) -> &KeyCache {
        &self.inner.keys
    }

    pub(crate) fn events_urls(&self) -> &EventsUrlSigner {
        &self.inner.events_urls
    }

    pub(crate) fn auth_failures(&self) -> Option<(&Buckets<std::net::IpAddr>, Rate)> {
        self.inner
            .auth_failures
            .as_ref()
            .map(|(b, rate)| (b, *rate))
    }

    pub(crate) fn job_posts(&self) -> &Buckets<uuid::Uuid> {
        &self.inner.job_posts
    }

    pub fn quotas(&self) -> &QuotaStore {
        &self.inner.quotas
    }

    pub(crate) fn events(&self) -> &EventHub {
        &self.inner.events
    }

    /// Cancelled when the server starts draining: long-lived responses (SSE) end on it.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }
}
