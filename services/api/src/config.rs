//! The API's own settings, from flags and environment.

use std::{net::SocketAddr, time::Duration};

use sidbooth_core::QueueSettings;

/// HTTP server settings and input limits.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiConfig {
    /// Address the HTTP server listens on.
    #[arg(
        long = "bind",
        env = "SIDBOOTH_API_BIND",
        default_value = "127.0.0.1:8080"
    )]
    pub bind: SocketAddr,
    /// Largest accepted image file, in bytes (20 MiB).
    #[arg(long, env = "SIDBOOTH_MAX_FILE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_file_bytes: u64,
    /// Largest accepted request body, in bytes (100 MiB).
    #[arg(long, env = "SIDBOOTH_MAX_REQUEST_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub max_request_bytes: u64,
    /// Largest accepted image, in megapixels; checked from the header before decoding.
    #[arg(long, env = "SIDBOOTH_MAX_IMAGE_MEGAPIXELS", default_value_t = 40.0)]
    pub max_image_megapixels: f64,
    /// Queue settings; the API uses `max_attempts` for new jobs. In one process with a worker
    /// (`sidbooth dev`) pass this same value to the worker rather than flattening it twice.
    #[command(flatten)]
    pub queue: QueueSettings,
    /// Interval of SSE keep-alive comments, in seconds.
    #[arg(long, env = "SIDBOOTH_SSE_KEEPALIVE_SECS", default_value_t = 15)]
    pub sse_keepalive_secs: u64,
    /// How long a key that authenticated is trusted without asking the database again, in
    /// seconds; also how long a revoked key may keep working. 0 asks every time.
    #[arg(long, env = "SIDBOOTH_AUTH_CACHE_SECS", default_value_t = 10)]
    pub auth_cache_secs: u64,
    /// Failed authentications a client address may make per minute (a burst of as many, then
    /// one every 60/N seconds); beyond it every request from the address is answered 429 until
    /// the budget refills. 0 turns the limit off.
    #[arg(long, env = "SIDBOOTH_AUTH_FAILURES_PER_MINUTE", default_value_t = 20)]
    pub auth_failures_per_minute: u32,
    /// Take the client address from this request header's first entry (e.g.
    /// `x-forwarded-for`) instead of the TCP peer. Set it only behind a proxy that writes the
    /// header itself; otherwise clients choose their own address.
    #[arg(long, env = "SIDBOOTH_CLIENT_ADDRESS_HEADER")]
    pub client_address_header: Option<String>,
    /// Timeout of each readiness check, in milliseconds.
    #[arg(long, env = "SIDBOOTH_READY_TIMEOUT_MS", default_value_t = 2000)]
    pub ready_timeout_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_file_bytes: 20 * 1024 * 1024,
            max_request_bytes: 100 * 1024 * 1024,
            max_image_megapixels: 40.0,
            queue: QueueSettings::default(),
            sse_keepalive_secs: 15,
            auth_cache_secs: 10,
            auth_failures_per_minute: 20,
            client_address_header: None,
            ready_timeout_ms: 2000,
        }
    }
}

impl ApiConfig {
    pub fn sse_keepalive(&self) -> Duration {
        Duration::from_secs(self.sse_keepalive_secs.max(1))
    }

    pub fn auth_cache(&self) -> Duration {
        Duration::from_secs(self.auth_cache_secs)
    }

    pub fn ready_timeout(&self) -> Duration {
        Duration::from_millis(self.ready_timeout_ms)
    }

    /// The largest pixel count accepted.
    pub fn max_pixels(&self) -> u64 {
        (self.max_image_megapixels * 1_000_000.0) as u64
    }
}
