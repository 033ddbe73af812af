//! Webhook settings, from flags and environment.

use std::time::Duration;

use crate::target::TargetPolicy;

#[derive(Debug, Clone, clap::Args)]
pub struct WebhookSettings {
    /// Let endpoints be loopback, private or link-local addresses. Off in production: a
    /// tenant could otherwise make the service call into its own network.
    #[arg(
        long = "webhook-allow-private-targets",
        env = "SIDBOOTH_WEBHOOK_ALLOW_PRIVATE_TARGETS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub allow_private_targets: bool,
    /// Endpoints one tenant may register.
    #[arg(long, env = "SIDBOOTH_WEBHOOK_MAX_ENDPOINTS", default_value_t = 20)]
    pub webhook_max_endpoints: usize,
    /// How long an endpoint has to answer one delivery, in seconds.
    #[arg(long, env = "SIDBOOTH_WEBHOOK_TIMEOUT_SECS", default_value_t = 15.0)]
    pub webhook_timeout_secs: f64,
    /// First retry delay after a failed delivery, in seconds; doubled after every failure.
    #[arg(long, env = "SIDBOOTH_WEBHOOK_RETRY_BASE_SECS", default_value_t = 5.0)]
    pub webhook_retry_base_secs: f64,
    /// Longest delay between two tries, in seconds.
    #[arg(
        long,
        env = "SIDBOOTH_WEBHOOK_RETRY_MAX_SECS",
        default_value_t = 3600.0
    )]
    pub webhook_retry_max_secs: f64,
    /// How long a message is retried after it was enqueued, in seconds (24 hours).
    #[arg(
        long,
        env = "SIDBOOTH_WEBHOOK_RETRY_WINDOW_SECS",
        default_value_t = 86400.0
    )]
    pub webhook_retry_window_secs: f64,
    /// Deliveries sent at once by one dispatcher.
    #[arg(long, env = "SIDBOOTH_WEBHOOK_CONCURRENCY", default_value_t = 16)]
    pub webhook_concurrency: usize,
    /// The dispatcher looks for due retries at this interval, in seconds (new messages wake it
    /// at once).
    #[arg(long, env = "SIDBOOTH_WEBHOOK_POLL_SECS", default_value_t = 1.0)]
    pub webhook_poll_secs: f64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allow_private_targets: false,
            webhook_max_endpoints: 20,
            webhook_timeout_secs: 15.0,
            webhook_retry_base_secs: 5.0,
            webhook_retry_max_secs: 3600.0,
            webhook_retry_window_secs: 86400.0,
            webhook_concurrency: 16,
            webhook_poll_secs: 1.0,
        }
    }
}

impl WebhookSettings {
    pub fn policy(&self) -> TargetPolicy {
        TargetPolicy {
            allow_private: self.allow_private_targets,
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.webhook_timeout_secs.max(0.1))
    }

    pub fn poll(&self) -> Duration {
        Duration::from_secs_f64(self.webhook_poll_secs.max(0.05))
    }

    pub fn retry_window(&self) -> Duration {
        Duration::from_secs_f64(self.webhook_retry_window_secs.max(0.0))
    }

    /// Delay after failed try `attempt` (1-based): exponential, capped.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let exp = (attempt.max(1) - 1).min(40);
        let secs = self.webhook_retry_base_secs * 2f64.powi(exp);
        Duration::from_secs_f64(secs.min(self.webhook_retry_max_secs).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let s = WebhookSettings {
            webhook_retry_base_secs: 5.0,
            webhook_retry_max_secs: 30.0,
            ..WebhookSettings::default()
        };
        let delays: Vec<u64> = (1..=5).map(|a| s.backoff(a).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 30, 30]);
    }
}
