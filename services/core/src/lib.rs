//! The service's backbone below HTTP: the job store and queue on Postgres, the artifact store on
//! S3-compatible storage, tenants and API keys, and their configuration.
//!
//! Everything here is async I/O on sqlx and aws-sdk-s3; nothing knows about axum or candle.

mod columns;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod jobs;
pub mod keys;
pub mod multipart;
pub mod queue;
pub mod quotas;
pub mod retention;
pub mod storage;
pub mod tenants;
pub mod view;
pub mod webhooks;

pub use config::{DatabaseArgs, QueueSettings, StorageArgs};
pub use error::CoreError;
pub use jobs::{
    mask_artifact_name, Artifact, Created, Description, JobError, JobImage, JobRecord, JobStore,
    JobWarning, ListPage, NewArtifact, NewDescription, NewImage, NewJob, SubjectMask,
};
pub use queue::{Claimed, Heartbeat, Lease, Queue, RetryDecision};
pub use storage::ArtifactStore;

#[cfg(feature = "test-support")]
pub mod testing;
