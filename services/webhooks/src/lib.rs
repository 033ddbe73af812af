//! Webhooks after the Standard Webhooks specification: signing ([`sign`]), which endpoint URLs
//! may be called ([`target`]) and the dispatcher that delivers the outbox ([`dispatcher`]).
//! The endpoints, outbox and delivery log themselves live in `sidbooth_core::webhooks`.

pub mod config;
pub mod dispatcher;
pub mod sign;
pub mod target;
#[cfg(feature = "test-support")]
pub mod testing;

pub use config::WebhookSettings;
pub use dispatcher::Dispatcher;
pub use target::{TargetError, TargetPolicy};
