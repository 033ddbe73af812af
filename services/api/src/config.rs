//! The API's own settings, from flags and environment.

use std::{net::SocketAddr, time::Duration};

use sidbooth_core::{quotas::QuotaSettings, QueueSettings};
pub use sidbooth_webhooks::WebhookSettings;

pub use crate::events_url::SigningKey;

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
    /// Origins whose pages may call the API from a browser (CORS), comma-separated, e.g.
    /// `https://app.example.com,http://localhost:5173`; `*` allows every origin. Unset: none.
    #[arg(
        long,
        env = "SIDBOOTH_CORS_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_parser = parse_origin
    )]
    pub cors_allowed_origins: Vec<String>,
    /// Key that signs event-stream URLs (`POST /v1/jobs/{id}/events-url`), at least 32
    /// characters; every API replica needs the same. Unset: a key made at start, so URLs hold
    /// only on the process that made them.
    #[arg(long, env = "SIDBOOTH_EVENTS_URL_KEY", hide_env_values = true)]
    pub events_url_key: Option<SigningKey>,
    /// How long a signed event-stream URL can be opened, in seconds.
    #[arg(long, env = "SIDBOOTH_EVENTS_URL_TTL_SECS", default_value_t = 3600)]
    pub events_url_ttl_secs: u64,
    /// Delete jobs (rows and stored objects) this many hours after they finished, or after
    /// they were left awaiting review. 0 keeps them until deleted.
    #[arg(long, env = "SIDBOOTH_RETENTION_HOURS", default_value_t = 0.0)]
    pub retention_hours: f64,
    /// How often the retention sweeper looks for expired jobs, in seconds.
    #[arg(long, env = "SIDBOOTH_RETENTION_SWEEP_SECS", default_value_t = 300.0)]
    pub retention_sweep_secs: f64,
    /// Default limits per tenant (`sidbooth tenants limits` overrides them for one tenant).
    #[command(flatten)]
    pub quotas: QuotaSettings,
    /// Webhook endpoints and delivery.
    #[command(flatten)]
    pub webhooks: WebhookSettings,
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
            cors_allowed_origins: Vec::new(),
            events_url_key: None,
            events_url_ttl_secs: 3600,
            retention_hours: 0.0,
            retention_sweep_secs: 300.0,
            quotas: QuotaSettings::default(),
            webhooks: WebhookSettings::default(),
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

    /// How long finished jobs are kept; `None`: until deleted.
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_hours > 0.0).then(|| Duration::from_secs_f64(self.retention_hours * 3600.0))
    }

    pub fn retention_sweep(&self) -> Duration {
        Duration::from_secs_f64(self.retention_sweep_secs.max(1.0))
    }

    pub fn events_url_ttl(&self) -> Duration {
        Duration::from_secs(self.events_url_ttl_secs)
    }

    /// The largest pixel count accepted.
    pub fn max_pixels(&self) -> u64 {
        (self.max_image_megapixels * 1_000_000.0) as u64
    }
}

/// A CORS origin: `*`, or `scheme://host[:port]` without a path, as browsers send it.
pub fn parse_origin(raw: &str) -> Result<String, String> {
    let origin = raw.trim().trim_end_matches('/');
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let (scheme, rest) = origin
        .split_once("://")
        .ok_or_else(|| format!("{raw:?} is not an origin like https://app.example.com"))?;
    let fine = matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
        && axum::http::HeaderValue::from_str(origin).is_ok();
    if !fine {
        return Err(format!(
            "{raw:?} is not an origin like https://app.example.com (scheme, host, optional port)"
        ));
    }
    Ok(origin.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        assert_eq!(
            parse_origin("https://app.example.com/").unwrap(),
            "https://app.example.com"
        );
        assert_eq!(
            parse_origin("http://localhost:5173").unwrap(),
            "http://localhost:5173"
        );
        assert_eq!(parse_origin("*").unwrap(), "*");
        for bad in [
            "app.example.com",
            "https://a.com/path",
            "ftp://a.com",
            "https://",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }
}
